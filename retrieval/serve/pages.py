"""The HTML pages: search, one photo, tags, status. Jinja2 with autoescape on, no front-end build.

Every page is a GET whose URL holds its whole state (query, images, filters,
page), so a search can be bookmarked, shared and reloaded; the small script in
`static/app.js` only adds uploads, keyboard navigation and run progress.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from retrieval.errors import ClipfindError, InputError
from retrieval.media.remote import is_url
from retrieval.query.render import human_size
from retrieval.serve import catalog
from retrieval.serve.media import thumbnail_url
from retrieval.serve.models import MAX_K, RowId
from retrieval.serve.querybox import parse_box

router = APIRouter(include_in_schema=False)
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined)


def search_link(form: dict, img: list[int], upload: list[str], **changes) -> str:
    """The search page's URL for this query and filters, with `changes` applied (a new page starts at 1)."""
    params = {**form, **{k: v for k, v in changes.items() if k != "page"}}
    pairs = [(k, v) for k, v in params.items() if v not in ("", None)]
    pairs += [("img", i) for i in img] + [("upload", h) for h in upload]
    if changes.get("page", 1) != 1:
        pairs.append(("page", changes["page"]))
    return "/?" + urlencode(pairs)


_env.globals.update(thumb=thumbnail_url, human_size=human_size, urlencode=urlencode, link=search_link)
templates = Jinja2Templates(env=_env)
PER_PAGE = 60
FACET_WINDOW = 200  # the sidebar's counts are over this many best results


def _state(request: Request):
    return request.app.state.serve


def _render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    state = _state(request)
    context.setdefault("title", "clipfind")
    context.update(library=str(state.root), model=state.searcher.model_label,
                   random_weights=state.searcher.random_weights)
    return templates.TemplateResponse(request, name, context, status_code=status_code,
                                      headers={"cache-control": "no-store"})


def _date(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InputError(f"{name} must be a date (YYYY-MM-DD)") from None


@router.get("/", response_class=HTMLResponse)
def search_page(request: Request, q: Annotated[str, Query(max_length=1000)] = "",
                img: Annotated[list[RowId], Query(max_length=16)] = [],  # noqa: B006 - FastAPI reads the default
                upload: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006
                folder: str = "", after: str = "", before: str = "", tag: str = "",
                min_score: Annotated[str, Query(max_length=20)] = "",
                page: Annotated[int, Query(ge=1, le=100)] = 1) -> HTMLResponse:
    from retrieval.query.types import Filters
    from retrieval.query.types import Query as SearchQuery

    state = _state(request)
    form = {"q": q, "folder": folder, "after": after, "before": before, "tag": tag, "min_score": min_score}
    context = {"form": form, "img": img, "upload": upload, "page": page, "results": [], "error": None,
               "warnings": [], "facets": None, "has_next": False, "took_ms": None, "query_images": []}
    with state.read() as conn:
        context["tag_choices"] = catalog.tag_counts(conn)
        context["query_images"] = [r for r in catalog.images(conn, img).values()]
    if not (q.strip() or img or upload):
        with state.read() as conn:
            context["recent"] = catalog.recent(conn, PER_PAGE)
        return _render(request, "search.html", **context)
    status_code = 200
    try:
        box = parse_box(q)
        images = [r.path for r in context["query_images"]] + [str(state.uploads.path(h)) for h in upload]
        if len(context["query_images"]) != len(img):
            raise InputError("an image of the query is no longer in the library")
        query = SearchQuery.build(box.texts, images, box.negatives)
        score = float(min_score) if min_score else None
        if score is not None and not -1 <= score <= 1:
            raise InputError("the minimum score must be between -1 and 1")
        if folder and not (os.path.isabs(folder) or is_url(folder)):
            raise InputError("the folder must be an absolute path or a URL prefix")
        filters = Filters(path=folder or None, after=_date(after, "after"), before=_date(before, "before"),
                          tags=(tag,) if tag else (), min_score=score)
        k = min(MAX_K, max(page * PER_PAGE + 1, FACET_WINDOW))
        response = state.search(query, k, filters)
    except ValueError:
        context["error"], status_code = "the minimum score must be a number", 400
    except ClipfindError as exc:
        context["error"], status_code = str(exc), 400
    else:
        with state.read() as conn:
            rows = catalog.images(conn, [r.image_id for r in response.results])
            window = [rows[r.image_id] for r in response.results[:FACET_WINDOW] if r.image_id in rows]
            context["facets"] = catalog.facet_counts(window, catalog.labels_by_image(conn, list(rows)))
        start = (page - 1) * PER_PAGE
        context["results"] = [(r, rows[r.image_id]) for r in response.results[start:start + PER_PAGE]
                              if r.image_id in rows]
        context["has_next"] = len(response.results) > start + PER_PAGE
        context["warnings"] = response.warnings
        context["took_ms"] = response.timings.get("total")
        context["total"] = len(response.results)
    return _render(request, "search.html", status_code, title=f"clipfind: {q or 'image search'}", **context)


@router.get("/photo/{image_id}", response_class=HTMLResponse)
def photo_page(image_id: RowId, request: Request, q: Annotated[str, Query(max_length=1000)] = "") -> HTMLResponse:
    state = _state(request)
    with state.read() as conn:
        row = catalog.image(conn, image_id)
        if row is None:
            raise HTTPException(404, "no such image")
        tags = catalog.tags_of(conn, image_id)
    similar, problem = [], None
    try:
        response = state.similar(row.path, 12)
        with state.read() as conn:
            rows = catalog.images(conn, [r.image_id for r in response.results])
        similar = [(r, rows[r.image_id]) for r in response.results if r.image_id in rows]
    except ClipfindError as exc:
        problem = str(exc)
    return _render(request, "photo.html", title=f"clipfind: {os.path.basename(row.shown_path)}", row=row,
                   tags=tags, similar=similar, problem=problem, q=q)


@router.get("/tags", response_class=HTMLResponse)
def tags_page(request: Request) -> HTMLResponse:
    state = _state(request)
    with state.read() as conn:
        counts = catalog.tag_counts(conn)
        previews = {label: catalog.tagged(conn, label, 6) for label, _ in counts[:40]}
    return _render(request, "tags.html", title="clipfind: tags", counts=counts, previews=previews)


@router.get("/tags/{label}", response_class=HTMLResponse)
def tag_page(label: str, request: Request, page: Annotated[int, Query(ge=1, le=1000)] = 1) -> HTMLResponse:
    state = _state(request)
    with state.read() as conn:
        hits = catalog.tagged(conn, label, PER_PAGE + 1, (page - 1) * PER_PAGE)
    return _render(request, "tag.html", title=f"clipfind: {label}", label=label, hits=hits[:PER_PAGE],
                   page=page, has_next=len(hits) > PER_PAGE)


@router.get("/status", response_class=HTMLResponse)
def status_page(request: Request) -> HTMLResponse:
    state = _state(request)
    with state.read() as conn:
        recent = catalog.recent(conn, 24)
        root = catalog.common_root(conn)
    return _render(request, "status.html", title="clipfind: status", status=state.status(), recent=recent,
                   default_folder=root or "")
