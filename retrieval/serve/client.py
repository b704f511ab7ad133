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
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

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


class _BadReply(Exception):
    """The server's bytes are not an HTTP/1.1 answer this client reads."""


def call(info: dict, endpoint: str, payload: dict | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """POST (or GET without payload) to a server; ClipfindErrors come back as themselves."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    try:
        status, reason, body = exchange(info["url"], endpoint, data, info["token"], timeout)
    except (OSError, ValueError, _BadReply) as exc:
        raise ServerUnavailable(str(exc) or type(exc).__name__) from None
    try:
        detail = json.loads(body)
    except ValueError:
        if status == 200:
            raise ServerUnavailable("the server's answer is not JSON") from None
        detail = {}
    if status == 200:
        return detail
    if not isinstance(detail, dict):
        detail = {}
    if status == 400 and "exit_code" in detail:
        raise _ERRORS_BY_CODE.get(detail["exit_code"], ClipfindError)(detail["error"]) from None
    raise ServerUnavailable(f"server answered {status}: {detail.get('error') or detail.get('detail') or reason}")


def exchange(url: str, endpoint: str, data: bytes | None, token: str, timeout: float) -> tuple[int, str, bytes]:
    """One HTTP/1.1 request on a new connection: (status, reason, body).

    Plain sockets, not urllib or http.client: their imports (the email package) were half
    of a `clipfind search` client's start-up, and a client of its own local server needs
    neither proxies from the environment nor TLS (an https URL goes through http.client).
    `timeout` bounds each step (connect, send, each read)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + endpoint
    if parts.scheme != "http":
        return _exchange_http_client(parts, path, data, token, timeout)
    host = parts.hostname or "127.0.0.1"
    head = [f"{'GET' if data is None else 'POST'} {path} HTTP/1.1", f"Host: {parts.netloc}",
            f"Authorization: Bearer {token}", "Connection: close"]
    if data is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (data or b"")
    # A bytes host: socket.getaddrinfo encodes a str one with the idna codec, another import.
    address = (host.encode("ascii") if host.isascii() else host, parts.port or 80)
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(1 << 16):
            raw += chunk
            if _complete(raw):  # a server that keeps the connection open despite `close`
                break
    return _parse_reply(raw)


def _complete(raw: bytes) -> bool:
    """Whether `raw` holds a whole answer with a Content-Length (else: read until closed)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


def _parse_reply(raw: bytes) -> tuple[int, str, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if not sep or len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
        raise _BadReply(f"not an HTTP answer: {raw[:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _unchunk(body)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(body) < length:
            raise _BadReply(f"the answer was cut off ({len(body)} of {length} bytes)")
        body = body[:length]
    return int(status_line[1]), status_line[2] if len(status_line) > 2 else "", body


def _unchunk(body: bytes) -> bytes:
    out, at = [], 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            raise _BadReply("a chunked answer was cut off")
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2:end + 2 + size])
        if len(out[-1]) < size:
            raise _BadReply("a chunked answer was cut off")
        at = end + 2 + size + 2


def _exchange_http_client(parts, path: str, data: bytes | None, token: str, timeout: float):
    import http.client

    conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout) if parts.scheme == "https" \
        else http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET" if data is None else "POST", path, data,
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, reply.reason, reply.read()
    except http.client.HTTPException as exc:
        raise _BadReply(str(exc) or type(exc).__name__) from None
    finally:
        conn.close()


def ask(info: dict, kind: str, subject, filters, k: int) -> SearchResponse:
    """The server's answer to Searcher.search(query, ...) (kind "search") or .similar(path, ...)."""
    from retrieval.query.types import SearchResponse

    payload = {"filters": filters.to_dict(), "k": k}
    if kind == "search":
        payload["query"] = subject.to_dict()
    else:
        payload["path"] = os.path.abspath(subject)
    return SearchResponse.from_dict(call(info, f"/{kind}", payload, timeout=ASK_TIMEOUT))
