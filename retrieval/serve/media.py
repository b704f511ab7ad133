"""Image bytes: thumbnails (WebP, cached by content hash) and originals of indexed files only.

    GET /thumb/{id}?size=small|large    a thumbnail, made on first request
    GET /image/{id}                     the original file
    GET /file/{absolute path}           the original, named by its indexed path (local files only)

A row indexed from a URL (`media.remote`) is read through fsspec for its thumbnail and its
original, with the same refusals as a file (`files.checked_object`); `/file/` names local paths.
The thumbnail URL carries the content hash (`?v=`), so browsers may keep it
for a year; a re-indexed file gets a new hash and so a new URL.
"""

from __future__ import annotations

import mimetypes
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response

from retrieval.media.images import ImageError
from retrieval.serve import catalog
from retrieval.serve.files import Refused, checked_object, checked_path, is_remote, row_for_path
from retrieval.serve.models import RowId

# Plain `def` routes: FastAPI runs them in its thread pool, so a SQLite read or a decode never
# stalls the event loop that every other connection shares.
router = APIRouter(tags=["images"])
IMMUTABLE = "private, max-age=31536000, immutable"
ORIGINAL_CACHE = "private, max-age=3600"


def _state(request: Request):
    return request.app.state.serve


def _checked(check, *args):
    """`check(*args)`, with a refusal as the HTTP answer it names."""
    try:
        return check(*args)
    except Refused as exc:
        raise HTTPException(exc.status, str(exc)) from None


def thumbnail_url(row, size: str = "small") -> str:
    return f"/thumb/{row.id}?size={size}&v={row.content_hash[:16]}"


@router.get("/thumb/{image_id}", summary="A WebP thumbnail of an indexed image")
def thumbnail(image_id: RowId, request: Request,
                    size: Annotated[Literal["small", "large"], Query()] = "small",
                    v: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    state = _state(request)
    with state.read() as conn:
        row = catalog.image(conn, image_id)
        if row is None:
            raise HTTPException(404, "no such image")
        cached = state.thumbs.path_for(row.content_hash, size)
        read = None
        if cached.exists():
            original = None
        elif is_remote(row):  # fetched on a miss only, under the thumbnail's lock
            original, read = row.path, lambda: checked_object(row)
        else:
            original = _checked(checked_path, conn, row)
    etag = f'"{row.content_hash[:32]}-{size}"'
    if request.headers.get("if-none-match") == etag and cached.exists():
        return Response(status_code=304, headers={"etag": etag, "cache-control": IMMUTABLE})
    if original is not None:
        try:
            cached, _ = _checked(state.thumbs.get, row.content_hash, size, original, read)
        except ImageError as exc:
            raise HTTPException(422, f"cannot make a thumbnail: {exc}") from None
    return FileResponse(cached, media_type="image/webp",
                        headers={"etag": etag, "cache-control": IMMUTABLE if v else ORIGINAL_CACHE})


def _original(conn, row) -> Response:
    # a chained URL names its archive last (`zip://a.jpg::file:///x.zip`): the type is the first part's
    name = row.path.split("::", 1)[0] if is_remote(row) else row.path
    media_type = mimetypes.guess_type(name)[0] or f"image/{(row.format or 'octet-stream').lower()}"
    if not media_type.startswith("image/"):
        media_type = "application/octet-stream"
    headers = {"cache-control": ORIGINAL_CACHE, "x-content-type-options": "nosniff"}
    if is_remote(row):
        return Response(_checked(checked_object, row), media_type=media_type, headers=headers)
    return FileResponse(_checked(checked_path, conn, row), media_type=media_type, headers=headers)


@router.get("/image/{image_id}", summary="The original file of an indexed image")
def original(image_id: RowId, request: Request) -> Response:
    with _state(request).read() as conn:
        row = catalog.image(conn, image_id)
        if row is None:
            raise HTTPException(404, "no such image")
        if not is_remote(row):
            return _original(conn, row)
    return _original(None, row)  # a slow object store holds no database connection


@router.get("/file/{path:path}", summary="The original, by its absolute indexed path")
def by_path(path: str, request: Request) -> Response:
    """Local files only: a URL row has no absolute path (ask for it by id, `/image/{id}`)."""
    with _state(request).read() as conn:
        try:
            row = row_for_path(conn, "/" + path)
        except Refused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return _original(conn, row)
