"""Rows changed since a frozen index was built, searched exactly beside it.

A built index (HNSW, or IVF lists memory-mapped read-only) is never edited in
place: writing into a mapped file is not atomic, so a crash would corrupt it.
Instead every image id logged in `vector_log` after the index's watermark is
hidden from the index's answers, and the rows that still exist are scored
exactly from their stored vectors. The delta's memory is its changed rows
only; `clipfind reindex` folds it back into a fresh index.
"""

from __future__ import annotations

import faiss
import numpy as np

from retrieval.store.reads import Reads, in_list
from retrieval.store.rows import blobs_to_matrix
from retrieval.store.sql import in_chunks

_CHANGED = "SELECT DISTINCT image_id FROM vector_log WHERE seq > :since AND seq <= :upto"


class Delta:
    """Changed ids (`hidden` from the frozen index) and the current vectors of those still present."""

    def __init__(self, hidden: np.ndarray, ids: np.ndarray, x: np.ndarray) -> None:
        self.hidden = np.asarray(hidden, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.x = x
        self._keep: list = []  # FAISS selectors hold raw pointers to each other

    @classmethod
    def empty(cls, dim: int) -> Delta:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32))

    @classmethod
    def from_log(cls, reads: Reads, since: int, upto: int, dim: int) -> Delta:
        hidden = sorted(reads.column(_CHANGED, {"since": since, "upto": upto}))
        rows: list = []
        for part in in_chunks(hidden):
            listed, params = in_list(part)
            rows += reads.all(f"SELECT id, embedding FROM images WHERE id IN {listed}", params)
        return cls(np.array(hidden, dtype=np.int64), np.array([r[0] for r in rows], dtype=np.int64),
                   blobs_to_matrix([r[1] for r in rows], dim))

    def __len__(self) -> int:
        return len(self.hidden)

    def selector(self, allowed_ids: np.ndarray | None) -> faiss.IDSelector | None:
        """What the frozen index may return: allowed (if filtered) and not changed since it was built."""
        self._keep = []
        parts = []
        if len(self.hidden):
            batch = faiss.IDSelectorBatch(self.hidden)
            parts.append(faiss.IDSelectorNot(batch))
            self._keep.append(batch)
        if allowed_ids is not None:
            parts.append(faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)))
        self._keep += parts
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        both = faiss.IDSelectorAnd(parts[0], parts[1])
        self._keep.append(both)
        return both

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the delta's rows (padded with -1 / -inf like FAISS)."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        keep = np.ones(len(self.ids), bool) if allowed_ids is None else np.isin(self.ids, allowed_ids)
        if not keep.any():
            return scores, ids
        cand_ids, cand_x = self.ids[keep], self.x[keep]
        exact = queries @ cand_x.T
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores[:, :top.shape[1]] = np.take_along_axis(exact, top, 1)
        ids[:, :top.shape[1]] = cand_ids[top]
        return scores, ids


def merge_top_k(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of two (scores, ids) answers per query, by inner product (higher is better)."""
    scores = np.hstack([a[0], b[0]])
    ids = np.hstack([a[1], b[1]])
    scores = np.where(ids < 0, -np.inf, scores)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
