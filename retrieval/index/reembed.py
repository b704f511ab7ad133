"""`clipfind reindex --precision P`: encode every stored image again, at one precision.

Why: a library whose vectors were made at different precisions ranks on
slightly different embeddings (`clipfind verify` reports it). Re-embedding is
an indexing run with a plan of its own (every stored row whose file is still
as it was) driven through the indexer's public stages, so it decodes in the
same workers, commits per batch and records its run the same way.
"""

from __future__ import annotations

import os
import time

from sqlalchemy import text

from retrieval.index.indexer import IndexOptions, IndexStages
from retrieval.index.planner import Plan, Work
from retrieval.index.refresh import refresh_vectors
from retrieval.media.scan import FileEntry
from retrieval.store.library import Library
from retrieval.store.runs import vectors_by_precision
from retrieval.store.schema import path_from_db


def reembed_plan(library: Library) -> tuple[Plan, int]:
    """(plan, stale): every stored row whose file still has its size and mtime, to encode again.

    Copies of the same bytes share one encoding (`late_copies`). Files gone or
    changed on disk are only counted (`stale`): they keep their old vector.
    """
    plan, stale = Plan(), 0
    first_of: dict[str, int] = {}
    with library.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, path, path_bytes, size, mtime_ns, content_hash "
                                 "FROM images ORDER BY id")).all()
    for r in rows:
        path = path_from_db(r.path, r.path_bytes)
        try:
            st = os.stat(path)
        except OSError:
            stale += 1
            continue
        if (st.st_size, st.st_mtime_ns) != (r.size, r.mtime_ns):
            stale += 1
            continue
        work = Work(FileEntry(path, r.size, r.mtime_ns), r.content_hash, row_id=r.id)
        if r.content_hash in first_of:
            plan.late_copies.append(work)
        else:
            first_of[r.content_hash] = r.id
            plan.encode.append(work)
    plan.scanned = len(rows)
    return plan, stale


def reembed(library: Library, precision: str = "fp32", device: str = "auto",
            batch_size: int | None = None, workers: int | None = None, progress: bool = False,
            wait: bool = False) -> dict:
    """Re-encode every stored image at one precision, through the indexer's stages.

    One transaction per batch, then the FAISS cache catches up. Files gone or
    changed on disk keep their old vector and are counted: `clipfind index`
    their folders first. Resumable in the sense that matters: a killed run
    leaves each row either old or new, both valid.
    """
    if library.model_record is None or library.image_count() == 0:
        raise library.empty_error()
    started = time.perf_counter()
    with library.write_lock(wait=wait):
        plan, stale = reembed_plan(library)
        encoder = library.encoder(device=device, precision=precision)
        if precision != "auto" and encoder.precision != precision:
            encoder.set_precision(precision)
        options = IndexOptions(workers=workers, batch_size=batch_size, progress=progress)
        with library.run("reembed") as run:
            stages = IndexStages(library, run.id, options, None, device, precision)
            try:
                stages.encode(plan)
                stages.copy_late(plan)
            finally:
                run.stats = {"images": plan.scanned, "encoded": stages.stats["encoded"],
                             "reembedded": stages.stats["indexed"], "stale": stale,
                             "skipped": len(stages.skipped), "precision": encoder.precision,
                             "seconds": round(time.perf_counter() - started, 3)}
                run.stats["faiss"] = refresh_vectors(library)
    return {**run.stats, "vectors_by_precision": vectors_by_precision(library.engine)}
