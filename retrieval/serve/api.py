"""The JSON API: what `clipfind search` / `similar` send, and what the pages' scripts call.

Routes are plain `def`s: FastAPI runs them in its thread pool, and the
searcher's lock (`ServeState.search`) keeps torch and FAISS to one query at a
time. Mistakes come back as 400 `{"error", "exit_code"}` (see `app.py`).
"""

from __future__ import annotations

import os
import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request

from retrieval.errors import InputError
from retrieval.serve import catalog
from retrieval.serve.files import Refused, checked_path
from retrieval.serve.models import MAX_K, JobRequest, RowId, SearchRequest, SimilarRequest

router = APIRouter()


def _state(request: Request):
    return request.app.state.serve


def _answer(response) -> dict:
    out = response.to_dict()
    out["served_by"] = {"pid": os.getpid(), "warm": True}
    return out


@router.post("/search", tags=["search"], summary="Search by texts and/or images (the CLI's query)")
def search_post(body: SearchRequest, request: Request) -> dict:
    filters = body.filters.to_filters() if body.filters else None
    return _answer(_state(request).search(body.to_query(), body.k, filters))


@router.get("/search", tags=["search"], summary="Search by one text")
def search_get(request: Request, q: Annotated[str, Query(min_length=1, max_length=1000)],
               k: Annotated[int, Query(ge=1, le=MAX_K)] = 10) -> dict:
    from retrieval.query.types import Query as SearchQuery

    return _answer(_state(request).search(SearchQuery.build(q), k))


@router.post("/similar", tags=["search"], summary="Images most like an indexed (or readable) file")
def similar(body: SimilarRequest, request: Request) -> dict:
    filters = body.filters.to_filters() if body.filters else None
    return _answer(_state(request).similar(body.path, body.k, filters))


@router.get("/health", tags=["status"], summary="Liveness, library and model")
def health(request: Request) -> dict:
    state = _state(request)
    return {"ok": True, "library": str(state.root), "model": state.searcher.model_label,
            "uptime_s": round(time.time() - state.started, 1), "queries": state.queries}


@router.get("/api/status", tags=["status"], summary="Counts, model, index, runs, skipped files")
def status(request: Request) -> dict:
    return _state(request).status()


@router.get("/api/images/{image_id}", tags=["images"], summary="One image's facts and tags")
def image_info(image_id: RowId, request: Request) -> dict:
    state = _state(request)
    with state.read() as conn:
        row = catalog.image(conn, image_id)
        if row is None:
            raise HTTPException(404, "no such image")
        return {**row.to_dict(), "tags": catalog.tags_of(conn, image_id)}


@router.post("/api/upload", tags=["search"], summary="Upload a query image (raw bytes); answers its hash",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload(request: Request) -> dict:
    data = await request.body()
    state = _state(request)
    import anyio

    return await anyio.to_thread.run_sync(state.uploads.add, data)


@router.post("/api/jobs", tags=["jobs"], summary="Start an index run (folders) or a tagging run (labels)")
def start_job(body: JobRequest, request: Request) -> dict:
    state = _state(request)
    if bool(body.folders) == bool(body.labels):
        raise InputError("give either folders (an index run) or labels (a tagging run)")
    if body.folders:
        job = state.jobs.start_index(body.folders, state.count_images())
    else:
        job = state.jobs.start_tag(body.labels, state.count_images())
    return job.to_dict(state.count_images())


@router.get("/api/jobs/{job_id}", tags=["jobs"], summary="A run's progress (poll it)")
def job_progress(job_id: RowId, request: Request) -> dict:
    state = _state(request)
    try:
        job = state.jobs.get(job_id)
    except KeyError:
        raise HTTPException(404, "no such run") from None
    return job.to_dict(state.count_images())


def served_file(state, image_id: int) -> str:
    """The checked path of an indexed image, or HTTPException with the refusal's status."""
    with state.read() as conn:
        row = catalog.image(conn, image_id)
        if row is None:
            raise HTTPException(404, "no such image")
        try:
            return checked_path(conn, row)
        except Refused as exc:
            raise HTTPException(exc.status, str(exc)) from None
