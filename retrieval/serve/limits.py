"""Request bodies: bounded in size and time, JSON bounded in depth, before any route sees them.

A pure ASGI middleware, so it sees the bytes as they arrive: a body longer than
its route's limit is refused with 413 whether or not it declared its length (a
chunked body is counted), a body that stops arriving is refused with 408, and a
JSON body nested deeper than `MAX_JSON_DEPTH` is refused with 400 before
Python's parser would hit its recursion limit (which FastAPI reports as a 500).
Refusals close the connection, so bytes of a refused body are never read as
the next request, and so is a request carrying both Content-Length and
Transfer-Encoding (h11 would let the latter win and read on). The rest of HTTP
framing (negative or doubled Content-Length) is h11's job: it answers 400 and closes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

MAX_JSON_DEPTH = 64
BODY_TIMEOUT_S = 10.0  # a body must keep arriving; a stalled one is a held-open connection

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


async def refuse(send: Send, status: int, message: str, exit_code: int = 5) -> None:
    """A JSON error in the API's shape, and the connection closed after it."""
    body = json.dumps({"error": message, "exit_code": exit_code}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def json_depth_exceeds(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if brackets outside strings nest deeper than `limit` (a linear scan, no parsing)."""
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class BodyLimits:
    """Wraps an ASGI app; `limit_for(path)` says how many body bytes a route may receive and
    whether that body is JSON (then it must parse, whatever Content-Type the client sent)."""

    def __init__(self, app, limit_for: Callable[[str], tuple[int, bool]],
                 body_timeout: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self.limit_for = limit_for
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if b"transfer-encoding" in headers and b"content-length" in headers:
            # RFC 9112 6.3: the classic smuggling shape; answer and close the connection.
            await refuse(send, 400, "Content-Length together with Transfer-Encoding")
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit, is_json = self.limit_for(scope["path"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            status = 413 if declared.isdigit() else 400
            await refuse(send, status, f"request body larger than {limit} bytes" if status == 413
                         else "bad Content-Length")
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                await refuse(send, 408, f"request body did not arrive within {self.body_timeout:g} s")
                return
            if message["type"] == "http.disconnect":
                return  # the client hung up: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await refuse(send, 413, f"request body larger than {limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if is_json and body:
            problem = _json_problem(body)
            if problem:
                await refuse(send, 400, problem)
                return
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        await self.app(scope, _replay(body, receive), send)


def _json_problem(body: bytes) -> str | None:
    """Why this body is not a usable JSON object, or None."""
    if json_depth_exceeds(body):
        return f"request body nests deeper than {MAX_JSON_DEPTH} levels"
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return f"request body is not JSON: {exc}"
    if not isinstance(data, dict):
        return "request body must be a JSON object"
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the buffered body over once, then waits for the disconnect."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
