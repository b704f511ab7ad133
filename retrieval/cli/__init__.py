"""clipfind command line: a thin click shell over `retrieval`.

Each command family is a module beside this one; this file assembles them
into `clipfind` and turns user mistakes into one line on stderr with a
documented exit code. The console script points at `main` here.
"""

from __future__ import annotations

import sqlite3
import sys

import click

from retrieval.errors import EXIT_CODES_HELP, ClipfindError


def _storage_error(exc: Exception) -> bool:
    """sqlite3/OS errors, or SQLAlchemy's DBAPIError when SQLAlchemy is loaded at all: looked up
    lazily, so that a command that never touches a database (`search` through a running
    server) does not import SQLAlchemy just to name the exception."""
    dbapi = getattr(sys.modules.get("sqlalchemy.exc"), "DBAPIError", None)
    return isinstance(exc, (sqlite3.Error, OSError)) or (dbapi is not None and isinstance(exc, dbapi))


class ClipfindGroup(click.Group):
    """Runs subcommands so that a ClipfindError is one line, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ClipfindError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except Exception as exc:  # damaged, read-only or full storage
            if not _storage_error(exc):
                raise
            from retrieval.store.integrity import library_error_for

            known = library_error_for(exc)
            if known is None:
                raise
            click.echo(f"error: {known}", err=True)
            ctx.exit(known.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: everything committed so far is kept; run again to resume", err=True)
            ctx.exit(130)
        finally:
            from retrieval import config

            config.use_database(None)  # --db belongs to this command only (tests run many in one process)


@click.group(cls=ClipfindGroup, epilog=EXIT_CODES_HELP,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="clipfind")
def cli() -> None:
    """Search and auto-tag image collections with CLIP.

    \b
    Quick start (no network needed):
      clipfind demo                          # make a sample collection, index it, search it
      clipfind index ~/Pictures              # build or update a library
      clipfind search "a dog on a beach"     # text -> image
      clipfind search --image query.jpg      # image -> image
    """


def _register() -> None:
    from retrieval.cli import (
        concept_cmds,
        demo,
        engine_cmds,
        library_cmds,
        models,
        search_cmds,
        tag_cmds,
    )

    for module in (demo, models, library_cmds, engine_cmds, search_cmds, tag_cmds, concept_cmds):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli.main(prog_name="clipfind")


if __name__ == "__main__":
    sys.exit(main())
