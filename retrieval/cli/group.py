"""The `clipfind` click group: loads a subcommand's module when it is asked for, and turns
user mistakes into one line on stderr with a documented exit code."""

from __future__ import annotations

import importlib
import sqlite3
import sys

import click

from retrieval.cli import COMMAND_MODULES
from retrieval.errors import EXIT_CODES_HELP, ClipfindError


def _storage_error(exc: Exception) -> bool:
    """sqlite3/OS errors, or SQLAlchemy's DBAPIError when SQLAlchemy is loaded at all: looked up
    lazily, so that a command that never touches a database (`search` through a running
    server) does not import SQLAlchemy just to name the exception."""
    dbapi = getattr(sys.modules.get("sqlalchemy.exc"), "DBAPIError", None)
    return isinstance(exc, (sqlite3.Error, OSError)) or (dbapi is not None and isinstance(exc, dbapi))


class ClipfindGroup(click.Group):
    """Loads a subcommand's module when it is asked for, and runs subcommands so that a
    ClipfindError is one line, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMAND_MODULES) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            for command in importlib.import_module(f"retrieval.cli.{module}").COMMANDS:
                self.add_command(command)
        return self.commands.get(cmd_name)

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
