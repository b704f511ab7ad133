"""`clipfind search TEXT...` answered by a running `clipfind serve`, without importing click.

The everyday question ("these words, the top k, as a table, JSON or paths") is the
one a warm server answers in a tenth of a second, so a fresh client's start-up is
most of what the user waits for: click and the command modules it loads are a third
of it. This path takes only argument lists it reads exactly as the click command
does: texts, -k/--top N, -L/--library DIR, one of --json/--paths/--paths0 (--null,
-0), --server. Anything else (another flag, --help, a text that starts with "-"),
no server, or a server that does not answer goes to the click command, which then
gives the same answer, error or help as always.
"""

from __future__ import annotations

import os
import sys

answered = False  # set once a search or similar has written its whole answer (retrieval.cli.main)
FORMATS = {"--json": "json", "--paths": "paths", "--paths0": "paths0", "--null": "paths0", "-0": "paths0"}
VALUED = ("-k", "--top", "-L", "--library")


def parse(args: list[str]) -> dict | None:
    """{"texts", "k", "library", "fmt"} for a plain `search` argument list, else None."""
    if not args or args[0] != "search":
        return None
    texts, k, library, fmts = [], None, None, []
    rest = iter(args[1:])
    for arg in rest:
        if arg in VALUED:
            value = next(rest, None)
            if value is None:
                return None
            if arg in ("-k", "--top"):
                if not value.isascii() or not value.isdigit() or int(value) < 1:
                    return None  # click says why
                k = int(value)
            else:
                library = value
        elif arg in FORMATS:
            fmts.append(FORMATS[arg])
        elif arg == "--server":
            continue
        elif arg.startswith("-") or not arg:
            return None
        else:
            texts.append(arg)
    if not texts or len(fmts) > 1:
        return None
    return {"texts": tuple(texts), "k": 10 if k is None else k,
            "library": library or os.environ.get("CLIPFIND_LIBRARY") or None,
            "fmt": fmts[0] if fmts else "table"}


def answer(args: list[str]) -> int | None:
    """The exit status of `clipfind ARGS` answered here by the library's server, or None when
    the click command must run it (what it is given is not a plain search, no server runs, or
    the server did not answer: then `--no-server` is appended, after the usual warning)."""
    parsed = parse(args)
    if parsed is None:
        return None
    from retrieval import config
    from retrieval.errors import ClipfindError
    from retrieval.serve.client import ServerUnavailable, ask, find_server

    info = find_server(config.library_path(parsed["library"]))
    if info is None:
        return None
    from retrieval.query.types import Filters, Query

    try:
        response = ask(info, "search", Query.build(parsed["texts"]), Filters(), parsed["k"])
    except ServerUnavailable as exc:
        warn(f"the clipfind server for this library did not answer ({exc}); searching here")
        args.append("--no-server")
        return None
    except ClipfindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    emit(response, parsed["fmt"])
    return 0


def warn(message: str) -> None:
    """As `retrieval.cli.common.warn` says it, without click."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def emit(response, fmt: str) -> None:
    """The response's warnings on stderr, its results on stdout (bytes: file names need not be UTF-8)."""
    from retrieval.query.render import write_output

    for message in response.warnings:
        warn(message)
    try:
        sys.stdout.flush()
        write_output(response, fmt, sys.stdout.buffer)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
