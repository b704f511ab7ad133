"""Search parameters for a built index, tuned on held-out queries against exact search.

`nprobe` (IVF) or `efSearch` (HNSW) and, for PQ codes, how many candidates to
re-rank exactly from the stored vectors: the cheapest setting, in measured
time, whose recall@k reaches the target. The result is recorded in index.json
and used by every search, so "0.95 recall" is a measured fact about this
index rather than a default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np

from retrieval.store.mapped_lists import MappedLists

if TYPE_CHECKING:
    from retrieval.store.index_builder import VectorSource

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024)
# candidates re-ranked exactly = refine * k. The long tail is for dense collections: on 10M
# clustered vectors in OPQ64 codes, re-ranking the best 160 candidates gave recall@10 0.59 and
# the best 1,600 gave 0.96, at 16 probes as at 64 (bench/scale.py --full); 1M needed 80.
REFINES = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 256)
PLATEAU = 0.002  # a probe ladder stops once doubling nprobe gains less recall than this
HELD_OUT = 500
RERANK_ROWS = 65_536  # candidate vectors fetched at once (128 MB of 512-d floats)


@dataclass
class SearchSetting:
    """How a search runs; stored in index.json (`tuned`) and read back by `VectorIndex.search`."""

    nprobe: int = 0
    efsearch: int = 0
    refine: int = 1
    recall: float | None = None  # recall@k measured at this setting
    k: int = 10
    target: float | None = None
    queries: int = 0
    ms_per_query: float | None = None  # batch time / queries while tuning (all cores)

    def to_dict(self) -> dict:
        return asdict(self)


def search_params(index: faiss.Index, setting: SearchSetting, selector: faiss.IDSelector | None = None):
    """FAISS search parameters for `index` (IVF, HNSW, behind an ID map or an OPQ transform)."""
    inner = index
    wrapped = None
    if isinstance(inner, faiss.IndexPreTransform):
        wrapped, inner = "pretransform", faiss.downcast_index(inner.index)
    elif isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(nprobe=max(1, setting.nprobe or 1))
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=max(16, setting.efsearch or 16))
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    if wrapped:
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        outer.keep = params  # FAISS holds raw pointers: keep the inner object alive with the outer
        return outer
    return params


def search_index(index: faiss.Index, queries: np.ndarray, k: int, setting: SearchSetting,
                 selector: faiss.IDSelector | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` under `setting`; an on-disk IVF reads exactly its probed lists (see mapped_lists)."""
    lists = MappedLists.find(index)
    if lists is None:
        return index.search(queries, k, params=search_params(index, setting, selector))
    return lists.search(queries, k, search_params(lists.ivf, setting, selector))


def rerank(queries: np.ndarray, candidates: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products over each query's candidate ids (-1 = none), best k first.

    Queries go in groups whose candidates stay under RERANK_ROWS: the tuner's 500 held-out
    queries x 2,560 candidates fetched at once were 2.6 GB, most of a 10M build's peak memory."""
    step = max(1, RERANK_ROWS // max(1, candidates.shape[1]))
    if len(queries) > step:
        parts = [rerank(queries[i:i + step], candidates[i:i + step], fetch, k)
                 for i in range(0, len(queries), step)]
        return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    flat = np.unique(candidates[candidates >= 0])
    if not len(flat):
        return scores, ids
    vectors = fetch(flat)
    row_of = {int(i): r for r, i in enumerate(flat)}
    for q, (query, row) in enumerate(zip(queries, candidates)):
        found = row[row >= 0]
        exact = vectors[[row_of[int(i)] for i in found]] @ query
        order = np.argsort(-exact, kind="stable")[:k]
        scores[q, :len(order)], ids[q, :len(order)] = exact[order], found[order]
    return scores, ids


def exact_neighbours(source: VectorSource, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    """Exact top-k ids by inner product, streaming the source (memory: one chunk)."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for ids, x in source.chunks(chunk):
        s, rows = faiss.knn(queries, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        all_s = np.hstack([best_s, s])
        all_i = np.hstack([best_i, ids[rows]])
        top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's true top-k that the search returned in its top-k."""
    hits = sum(len(np.intersect1d(f[:k][f[:k] >= 0], t[:k][t[:k] >= 0])) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def held_out_queries(source: VectorSource, n: int = HELD_OUT, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Stored vectors drawn apart from the training sample's seed; their own ids are left out of both lists."""
    return source.sample(n, seed=seed)


def tune(index: faiss.Index, source: VectorSource, target: float, k: int = 10, uses_codes: bool = False,
         queries: np.ndarray | None = None, query_ids: np.ndarray | None = None) -> SearchSetting:
    """The fastest setting whose recall@k against exact search reaches `target`, with two
    standard errors of the held-out measurement to spare (`sampling_margin`).

    Without `queries`, stored vectors are used as queries and each one's own id is
    excluded from both the exact and the approximate answer (finding yourself is
    not recall). `uses_codes` (PQ) also tries re-ranking more candidates exactly.
    """
    if queries is None:
        query_ids, queries = held_out_queries(source)
    needed = min(1.0, target + sampling_margin(target, len(queries), k))
    skip = query_ids if query_ids is not None else np.full(len(queries), -1, dtype=np.int64)
    truth = _drop_self(exact_neighbours(source, queries, k + 1), skip, k)
    knob, ladder = _ladder(index)
    best: SearchSetting | None = None
    for refine in (REFINES if uses_codes else (1,)):
        if best is not None and best.recall >= needed:  # more re-ranking only pays with fewer probes
            ladder = tuple(v for v in ladder if v < getattr(best, knob))
        previous = None
        for value in ladder:
            setting = SearchSetting(**{knob: value}, refine=refine, k=k, target=target, queries=len(queries))
            started = time.perf_counter()
            found = run_search(index, queries, k + 1, setting, source.fetch if refine > 1 else None)
            setting.ms_per_query = round((time.perf_counter() - started) * 1000 / len(queries), 4)
            setting.recall = round(recall_at_k(_drop_self(found, skip, k), truth, k), 4)
            if best is None or _better(setting, best, needed):
                best = setting
            if setting.recall >= needed:
                break  # more probes only cost time
            if refine > 1 and previous is not None and setting.recall < previous + PLATEAU:
                break  # the codes' ordering, not the probes, is what misses: re-rank more instead
            previous = setting.recall
    assert best is not None
    return best


def sampling_margin(target: float, queries: int, k: int) -> float:
    """Two standard errors of a recall measured on `queries` x `k` neighbours: what the tuner
    asks for above the target, so that new queries reach it too. On 10M vectors, a setting
    tuned to 0.9506 on 500 held-out queries gave 0.941 on 1,000 new ones."""
    return 2 * (target * (1 - target) / max(1, queries * k)) ** 0.5


def run_search(index: faiss.Index, queries: np.ndarray, k: int, setting: SearchSetting,
               fetch: Callable[[np.ndarray], np.ndarray] | None = None,
               selector: faiss.IDSelector | None = None) -> np.ndarray:
    """Ids of the top-k under `setting`, re-ranked exactly from `fetch` when refine > 1."""
    want = k * setting.refine if fetch is not None else k
    want = max(1, min(want, int(index.ntotal)))
    _, ids = search_index(index, queries, want, setting, selector)
    if fetch is None or setting.refine <= 1:
        return ids
    return rerank(queries, ids, fetch, k)[1]


def _ladder(index: faiss.Index) -> tuple[str, tuple[int, ...]]:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", tuple(p for p in NPROBES if p <= ivf.nlist)
    return "efsearch", EF_SEARCHES


def _better(new: SearchSetting, old: SearchSetting, target: float) -> bool:
    """Reaching the target beats not; among those that reach it, faster wins; else higher recall."""
    new_ok, old_ok = new.recall >= target, old.recall >= target
    if new_ok != old_ok:
        return new_ok
    if new_ok:
        return new.ms_per_query < old.ms_per_query
    return new.recall > old.recall


def _drop_self(ids: np.ndarray, skip: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for q, (row, own) in enumerate(zip(ids, skip)):
        kept = row[(row != own) & (row >= 0)][:k]
        out[q, :len(kept)] = kept
    return out
