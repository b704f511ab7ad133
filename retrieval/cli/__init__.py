"""clipfind command line: a thin click shell over `retrieval`.

Each command family is a module beside this one; `group` assembles them into
`clipfind` and turns user mistakes into one line on stderr with a documented exit
code. The console script points at `main` here, which first lets `quick` answer a
plain `clipfind search` through a running server without importing click; the
click group (`retrieval.cli.cli`) is imported when first used.
"""

from __future__ import annotations

import os
import sys

# The module beside this one that defines each command (its COMMANDS list): `clipfind X`
# imports only X's module, so a fresh `search` skips the other commands' imports (render,
# shutil, the tagging options...). tests/test_light_imports.py checks this against the modules.
COMMAND_MODULES = {
    "demo": "demo", "models": "models", "ingest": "engine_cmds", "concept": "concept_cmds",
    **dict.fromkeys(["index", "status", "verify", "remove", "reindex", "backup"], "library_cmds"),
    **dict.fromkeys(["search", "similar", "serve"], "search_cmds"),
    **dict.fromkeys(["tag", "tags", "eval", "prompts"], "tag_cmds"),
}


def main() -> None:
    from retrieval.cli import quick

    args = sys.argv[1:]
    try:
        status = quick.answer(args)  # may append --no-server to `args`
    except KeyboardInterrupt:
        status = 130
        print("interrupted: everything committed so far is kept; run again to resume", file=sys.stderr)
    if status is not None:
        sys.stdout.flush()
        sys.exit(status)
    from retrieval.cli.group import cli

    try:
        cli.main(args=args, prog_name="clipfind")
    except SystemExit as exc:
        if quick.answered and exc.code in (0, None):
            # Done, and everything written: the library and the text cache are closed, the
            # results printed. Tearing down the interpreter (ONNX Runtime's sessions, FAISS,
            # numpy, every module) cost 0.1 s more of a fresh query's wall time (2 busy cores).
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except OSError:
                raise exc from None  # the interpreter's own exit reports it
            os._exit(0)
        raise


def __getattr__(name: str):
    """`cli` and `ClipfindGroup` live in `retrieval.cli.group` (click): imported when first asked for."""
    if name in ("cli", "ClipfindGroup"):
        from retrieval.cli import group

        return getattr(group, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
