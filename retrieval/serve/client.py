"""The CLI's side of `clipfind serve`: find the library's running server and ask it.

Imports nothing heavy (no FastAPI, no torch): a cold `clipfind search` only
parses flags, reads `serve.json`, sends one request and prints. While a server
runs it announces itself in `serve.json` in the library directory (URL, pid
and token, mode 0600); see `retrieval.serve.runner`.

    POST /search   {"query": {...Query}, "filters": {...Filters}, "k": 10}
                   or shorthand {"text": "red circle", "k": 5}
    GET  /search?q=red+circle&k=5
    POST /similar  {"path": "/abs/file.jpg", "filters": {...}, "k": 10}
    GET  /health
Every request needs `Authorization: Bearer TOKEN` (or the login cookie).
Errors a user caused come back as {"error": message, "exit_code": n} with status 400.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval import errors
from retrieval.errors import ClipfindError

if TYPE_CHECKING:
    from retrieval.query.types import SearchResponse

SERVE_FILE = "serve.json"
# A busy or wedged server must not hold a CLI query for long: the CLI falls back to
# searching locally, which costs a model load (seconds), not a minute.
DEFAULT_TIMEOUT = 30.0
# What `ask` (the CLI's search and similar) waits on each step (connect, send, each read): a
# warm server answers in milliseconds, so one silent for longer is busy or wedged (issue 15).
ASK_TIMEOUT = 2.0
_ERRORS_BY_CODE = {cls.exit_code: cls for cls in
                   (errors.UsageError, errors.ModelError, errors.LibraryError, errors.InputError,
                    errors.VerifyError)}


class ServerUnavailable(Exception):
    """No usable server (none announced, gone, or not answering): search locally instead."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def find_server(library_root: str | os.PathLike) -> dict | None:
    """The announced server of this library if its process is alive, else None."""
    try:
        info = json.loads((Path(library_root) / SERVE_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if isinstance(info.get("url"), str) and info.get("token") else None


def call(info: dict, endpoint: str, payload: dict | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """POST (or GET without payload) to a server; ClipfindErrors come back as themselves."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(info["url"] + endpoint, data=data,
                                     headers={"Authorization": f"Bearer {info['token']}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())
        except ValueError:
            detail = {}
        if not isinstance(detail, dict):
            detail = {}
        if exc.code == 400 and "exit_code" in detail:
            raise _ERRORS_BY_CODE.get(detail["exit_code"], ClipfindError)(detail["error"]) from None
        reason = detail.get("error") or detail.get("detail") or exc.reason
        raise ServerUnavailable(f"server answered {exc.code}: {reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServerUnavailable(str(exc)) from None


def ask(info: dict, kind: str, subject, filters, k: int) -> SearchResponse:
    """The server's answer to Searcher.search(query, ...) (kind "search") or .similar(path, ...)."""
    from retrieval.query.types import SearchResponse

    payload = {"filters": filters.to_dict(), "k": k}
    if kind == "search":
        payload["query"] = subject.to_dict()
    else:
        payload["path"] = os.path.abspath(subject)
    return SearchResponse.from_dict(call(info, f"/{kind}", payload, timeout=ASK_TIMEOUT))
