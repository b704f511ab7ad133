"""Who may talk to the server: the token, as a bearer header or as a cookie set by one login URL.

The server's pages list your photo paths and show your photos, so every
request carries the token: scripts and the CLI send `Authorization: Bearer
TOKEN` (the token is in serve.json, mode 0600); a browser opens the login URL
printed at start (`/login?token=TOKEN`) once and gets an HttpOnly,
SameSite=Strict cookie, so another site cannot make your browser send it
(no cross-site request forgery). Requests that change something and come
with a cookie must also come from this server's own pages (Origin check).
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs, quote, urlsplit

COOKIE = "clipfind_token"
PUBLIC_PREFIXES = ("/static/", "/login", "/favicon.ico")


def token_matches(supplied: str | None, token: str) -> bool:
    return bool(supplied) and hmac.compare_digest(supplied.encode(), token.encode())


def _cookies(header: bytes) -> dict[str, str]:
    out = {}
    for part in header.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


def login_headers(token: str, target: str) -> list[tuple[bytes, bytes]]:
    """A 303 to `target` that sets the session cookie."""
    cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
    return [(b"location", target.encode()), (b"set-cookie", cookie.encode()),
            (b"cache-control", b"no-store"), (b"content-length", b"0")]


def safe_next(value: str | None) -> str:
    """Only a path on this server (never `//evil.example` or a full URL) may follow a login."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


class TokenGuard:
    """ASGI middleware: everything except static files and /login needs the token."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        if path == "/login":
            await self._login(scope, send)
            return
        if path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        bearer = headers.get(b"authorization", b"").decode("latin-1")
        by_header = bearer.startswith("Bearer ") and token_matches(bearer[7:].strip(), self.token)
        by_cookie = token_matches(_cookies(headers.get(b"cookie", b"")).get(COOKIE), self.token)
        if not (by_header or by_cookie):
            await self._refuse(scope, send, headers)
            return
        if by_cookie and not by_header and scope["method"] not in ("GET", "HEAD") and not _same_origin(headers):
            await _json(send, 403, {"error": "cross-site request refused"})
            return
        await self.app(scope, receive, send)

    async def _login(self, scope, send) -> None:
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        supplied = (params.get("token") or [""])[-1]
        if not token_matches(supplied, self.token):
            await _html(send, 403, "<h1>Wrong token</h1><p>Open the login URL that "
                        "<code>clipfind serve</code> printed.</p>")
            return
        target = safe_next((params.get("next") or ["/"])[-1])
        await send({"type": "http.response.start", "status": 303, "headers": login_headers(self.token, target)})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope, send, headers) -> None:
        accepts_html = b"text/html" in headers.get(b"accept", b"")
        if accepts_html and scope["method"] == "GET":
            await _html(send, 401, "<h1>Log in first</h1><p>Open the login URL that "
                        "<code>clipfind serve</code> printed (it ends in <code>/login?token=…</code>), "
                        f"then come back to <code>{quote(scope['path'])}</code>.</p>")
            return
        await _json(send, 403, {"error": "missing or wrong token (see serve.json in the library, "
                                         "or the login URL clipfind serve printed)"})


def _same_origin(headers: dict) -> bool:
    """No Origin (not a browser's cross-site request), or an Origin naming this very host."""
    origin = headers.get(b"origin")
    if origin is None:
        return True
    return urlsplit(origin.decode("latin-1")).netloc == headers.get(b"host", b"").decode("latin-1")


async def _json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _html(send, status: int, fragment: str) -> None:
    body = f"<!doctype html><meta charset=utf-8><title>clipfind</title>{fragment}".encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
