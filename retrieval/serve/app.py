"""The app factory: routes, error shapes, limits and the token guard around one `ServeState`.

    app = create_app(state)      # an ASGI app; `clipfind serve` runs it on uvicorn

Every mistake a client can make is a 4xx with `{"error": message}` (plus
`exit_code` where the CLI maps it back to its own exit code); a 500 means a
bug. Pages get the same message as HTML.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from retrieval.errors import EXIT_INPUT, ClipfindError
from retrieval.serve import api, media, pages
from retrieval.serve.limits import BodyLimits
from retrieval.serve.security import TokenGuard
from retrieval.serve.state import MAX_JSON_BODY, MAX_UPLOAD_BYTES, ServeState

STATIC = Path(__file__).parent / "static"
_PHRASES = {
    "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "float_type": "must be a number", "finite_number": "must be a finite number",
    "string_type": "must be a string", "list_type": "must be a list", "bool_type": "must be true or false",
    "bool_parsing": "must be true or false", "dict_type": "must be an object", "model_type": "must be an object", "model_attributes_type": "must be an object",
    "datetime_from_date_parsing": "must be a date (YYYY-MM-DD[THH:MM[:SS]])",
    "datetime_parsing": "must be a date (YYYY-MM-DD[THH:MM[:SS]])", "datetime_type": "must be a date",
    "extra_forbidden": "is not a known field", "missing": "is required", "literal_error": "is not one of the choices",
}


def body_limit(path: str) -> tuple[int, bool]:
    """Uploads may carry a photo; everything else is a small JSON body."""
    if path == "/api/upload":
        return MAX_UPLOAD_BYTES, False
    return MAX_JSON_BODY, True


def describe_validation(exc: RequestValidationError) -> str:
    """One line a person can act on: `k must be an integer`, `filters.after must be a date ...`."""
    parts = []
    for error in exc.errors()[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
        kind = error.get("type", "")
        if kind == "json_invalid":
            parts.append(f"request body is not JSON: {error.get('msg', '')}")
            continue
        phrase = _PHRASES.get(kind) or error.get("msg", "is not valid").lower()
        name = ".".join(p for p in loc if not p.isdigit()) or "request body"
        parts.append(f"{name} {phrase}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "") and not request.url.path.startswith("/api/")


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="clipfind", version="1", docs_url=None, redoc_url=None,
                  description="Search and tag an image library. Every request needs the token "
                              "(`Authorization: Bearer TOKEN`, or the cookie from `/login?token=TOKEN`).")
    app.state.serve = state

    @app.exception_handler(ClipfindError)
    async def clipfind_error(request: Request, exc: ClipfindError):
        return _error(request, 400, str(exc), exc.exit_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(request, 400, describe_validation(exc), EXIT_INPUT)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint {request.url.path}"
        return _error(request, exc.status_code, message, None, exc.headers)

    app.include_router(api.router)
    app.include_router(media.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_docs(app)
    app.add_middleware(BodyLimits, limit_for=body_limit)
    app.add_middleware(TokenGuard, token=state.token)
    app.add_middleware(ServerTiming)
    return app


class ServerTiming:
    """`Server-Timing: app;dur=MS` on every response: the server's own time, for benchmarks and devtools."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - started) * 1000
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"server-timing", f"app;dur={ms:.2f}".encode())]}
            await send(message)

        await self.app(scope, receive, timed)


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the `swagger-ui-bundle` package's files: no CDN, works offline."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path:
        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if not swagger_ui_path:
            return HTMLResponse("<p>The API schema is at <a href=/openapi.json>/openapi.json</a> "
                                "(pip install swagger-ui-bundle for a browsable page).</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="clipfind API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def _error(request: Request, status: int, message: str, exit_code: int | None, headers=None):
    if _wants_html(request):
        page = (f"<!doctype html><meta charset=utf-8><title>clipfind: error</title>"
                f"<link rel=stylesheet href=/static/app.css><main class=error><h1>{status}</h1>"
                f"<p>{html.escape(message)}</p><p><a href=/>Search</a></p></main>")
        return HTMLResponse(page, status, headers=headers)
    payload = {"error": message}
    if exit_code is not None:
        payload["exit_code"] = exit_code
    return JSONResponse(payload, status, headers=headers)
