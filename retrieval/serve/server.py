"""`clipfind serve`: a loopback JSON query server that keeps the model and index warm.

A CLI query pays for importing torch, loading the model and reading the FAISS
file every time; the server pays once. While it runs it announces itself in
`serve.json` in the library directory (URL, pid and a random token, mode
0600), and `clipfind search` / `similar` send their queries there, so a
cold CLI only parses flags, asks and prints. The token keeps other local
users off a port that lists your photo paths. Stdlib only: ThreadingHTTPServer,
one lock around the searcher (torch and the FAISS id selector are not
thread-safe), JSON in and out.

    POST /search   {"query": {...Query}, "filters": {...Filters}, "k": 10}
                   or shorthand {"text": "red circle", "k": 5}
    GET  /search?q=red+circle&k=5
    POST /similar  {"path": "/abs/file.jpg", "filters": {...}, "k": 10}
    GET  /health
Every request needs `Authorization: Bearer TOKEN` (the token is in serve.json).
Errors come back as {"error": message, "exit_code": n} with status 400.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval import errors
from retrieval.errors import ClipfindError, InputError
from retrieval.query.types import DEFAULT_TEMPLATES, Filters, Query, SearchResponse

if TYPE_CHECKING:
    from retrieval.query.search import Searcher

SERVE_FILE = "serve.json"
MAX_BODY = 1 << 20
_ERRORS_BY_CODE = {cls.exit_code: cls for cls in
                   (errors.ModelError, errors.LibraryError, errors.InputError, errors.VerifyError)}


class ServerUnavailable(Exception):
    """No usable server (none announced, gone, or not answering): search locally instead."""


# -- the server ---------------------------------------------------------------------------
class QueryServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, searcher: Searcher, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, log=None) -> None:
        super().__init__((host, port), _Handler)
        self.searcher = searcher
        self.token = token or secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.log = log
        self.started = time.time()
        self.queries = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def announce(self) -> Path:
        """Write serve.json (0600, atomically) so the CLI on this library can find us."""
        root = self.searcher.library.root
        target = root / SERVE_FILE
        tmp = root / f".{SERVE_FILE}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"url": self.url, "pid": os.getpid(), "token": self.token}, fh)
        os.replace(tmp, target)
        return target

    def withdraw(self) -> None:
        target = self.searcher.library.root / SERVE_FILE
        try:
            if json.loads(target.read_text()).get("pid") == os.getpid():
                target.unlink()
        except (OSError, ValueError):
            pass

    def warm_up(self) -> list[str]:
        """Load what the first queries would: the index, both towers, one text through its tower.

        Returns the runtime notices (e.g. ONNX unavailable, torch used) for the log."""
        self.searcher.fresh_vectors()
        notices: list[str] = []
        self.searcher.runtimes.warm_up(notices)
        notices += self.searcher.search(Query.build("a photo"), k=1).warnings
        return notices

    # -- request handling ----------------------------------------------------------------
    def handle_json(self, method: str, path: str, params: dict, body: dict) -> dict:
        if path == "/health":
            return {"ok": True, "library": str(self.searcher.library.root), "model": self.searcher.model_label,
                    "uptime_s": round(time.time() - self.started, 1), "queries": self.queries}
        k = _int(body.get("k", params.get("k", 10)), "k")
        filters = Filters.from_dict(body.get("filters"))
        if path == "/search":
            if "query" in body:
                query = Query.from_dict(body["query"])
            else:
                query = Query.build(body.get("text", params.get("q", ())), body.get("image", ()),
                                    body.get("not", ()), body.get("not_image", ()),
                                    raw=bool(body.get("raw", False)),
                                    templates=body.get("template", DEFAULT_TEMPLATES))
            with self.lock:
                self.queries += 1
                response = self.searcher.search(query, k, filters)
        elif path == "/similar":
            if not body.get("path"):
                raise InputError("similar needs a path")
            with self.lock:
                self.queries += 1
                response = self.searcher.similar(str(body["path"]), k, filters)
        else:
            raise _NotFound(path)
        out = response.to_dict()
        out["served_by"] = {"pid": os.getpid(), "warm": True}
        return out


class _NotFound(Exception):
    pass


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer") from None


class _Handler(BaseHTTPRequestHandler):
    server: QueryServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        supplied = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), self.server.token.encode()):
            self._send(403, {"error": "missing or wrong token (see serve.json in the library)"})
            return
        try:
            body = self._body() if method == "POST" else {}
            params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            self._send(200, self.server.handle_json(method, url.path, params, body))
        except _NotFound:
            self._send(404, {"error": f"no such endpoint {url.path}"})
        except ClipfindError as exc:
            self._send(400, {"error": str(exc), "exit_code": exc.exit_code})
        except Exception as exc:  # a bug: report it, keep serving
            self._send(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise InputError("bad Content-Length") from None
        if length > MAX_BODY:
            raise InputError("request too large")
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as exc:
            raise InputError(f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InputError("request body must be a JSON object")
        return data

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, default=str).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


# -- the client (what the CLI uses; imports nothing heavy) ---------------------------------
def find_server(library_root: str | os.PathLike) -> dict | None:
    """The announced server of this library if its process is alive, else None."""
    try:
        info = json.loads((Path(library_root) / SERVE_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if isinstance(info.get("url"), str) and info.get("token") else None


def call(info: dict, endpoint: str, payload: dict | None = None, timeout: float = 60.0) -> dict:
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
        if exc.code == 400 and "exit_code" in detail:
            raise _ERRORS_BY_CODE.get(detail["exit_code"], ClipfindError)(detail["error"]) from None
        raise ServerUnavailable(f"server answered {exc.code}: {detail.get('error', exc.reason)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServerUnavailable(str(exc)) from None


def ask(info: dict, kind: str, subject, filters, k: int) -> SearchResponse:
    """The server's answer to Searcher.search(query, ...) (kind "search") or .similar(path, ...)."""
    payload = {"filters": filters.to_dict(), "k": k}
    if kind == "search":
        payload["query"] = subject.to_dict()
    else:
        payload["path"] = os.path.abspath(subject)
    return SearchResponse.from_dict(call(info, f"/{kind}", payload))
