"""The last stage of every writing run: bring the FAISS cache up to the database.

`refresh_vectors` catches the saved index up from the database's change log
(or rebuilds it with another FAISS factory when asked, or when a flat index
outgrew exact search); `rebuild_index` is `clipfind reindex`, a recorded run of
just this stage. The database stays the truth throughout: FAISS is derived.
"""

from __future__ import annotations

import time

from retrieval.errors import InputError
from retrieval.store.library import Library
from retrieval.store.vectors import EXACT_LIMIT, choose_factory


def check_factory(factory: str, dim: int) -> None:
    """Refuse a FAISS factory string FAISS cannot build, before hours of encoding."""
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputError(f"--index-type {factory!r} is not a FAISS index factory string for "
                         f"{dim}-d vectors ({_faiss_reason(exc)})") from None


def _faiss_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def refresh_vectors(library: Library, factory: str | None = None) -> str:
    """Bring the FAISS cache up to the database, save it, and prune the change log.

    `factory` rebuilds with that index type and remembers it; otherwise a flat
    index that outgrew exact search is rebuilt with the size-based choice.
    Call only under the write lock.
    """
    if library.model_record is None:
        return "none"
    vectors = library.vectors(sync=False)
    if factory is None and library.get_meta("index_type") is None and vectors.load():
        n = library.image_count()
        if vectors.state.factory == "Flat" and n >= EXACT_LIMIT:
            factory = choose_factory(n, library.dim)
    if factory is not None:
        check_factory(factory, library.dim)
        try:
            vectors.rebuild(library.engine, factory)
        except RuntimeError as exc:
            raise InputError(f"cannot build a {factory!r} index over {library.image_count()} vectors: "
                             f"{_faiss_reason(exc)}") from None
        vectors.save()
        action = "rebuilt"
    else:
        action = vectors.sync(library.engine)
    vectors.prune_log(library.engine)
    return action


def rebuild_index(library: Library, factory: str | None = None, wait: bool = False) -> dict:
    """`clipfind reindex`: rebuild FAISS from the database (the same type unless told)."""
    if library.model_record is None or library.image_count() == 0:
        raise library.empty_error()
    with library.write_lock(wait=wait), library.run("reindex") as run:
        started = time.perf_counter()
        vectors = library.vectors(sync=False)
        current = vectors.state.factory if vectors.load() else None
        chosen = factory or library.get_meta("index_type") or current or choose_factory(
            library.image_count(), library.dim)
        refresh_vectors(library, chosen)
        if factory:
            library.set_meta("index_type", factory)
        run.stats = {"index_type": chosen, "vectors": int(vectors.index.ntotal),
                     "seconds": round(time.perf_counter() - started, 3)}
    return run.stats
