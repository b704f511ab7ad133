"""A seeded random sample of the library's stored vectors.

Used as learned concepts' negatives and as the background a query's scores
are calibrated against. Ids are read first (an index-only scan, sorted here) and only the
chosen rows' embeddings after, so a sample of 2,000 from 100,000 images
reads 2,000 blobs, not 100,000.
"""

from __future__ import annotations

import numpy as np

from retrieval.store.reads import Reads, in_list, reading
from retrieval.store.rows import blobs_to_matrix
from retrieval.store.sql import in_chunks


def sample_vectors(source, dim: int, n: int, seed: int = 0,
                   exclude: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of up to `n` stored rows drawn without replacement, none in `exclude`.

    `source`: what `reads.reading` takes (a library, or a SQLAlchemy Engine)."""
    with reading(source) as reads:
        ids = _all_ids(reads)
        if exclude:
            ids = ids[~np.isin(ids, np.fromiter(exclude, np.int64))]
        if len(ids) > n:
            ids = np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))
        rows = []
        for part in in_chunks(ids.tolist()):
            listed, params = in_list(part)
            rows += reads.all(f"SELECT id, embedding FROM images WHERE id IN {listed}", params)
    return np.asarray([r[0] for r in rows], np.int64), blobs_to_matrix([r[1] for r in rows], dim)


def _all_ids(reads: Reads) -> np.ndarray:
    """Every image id, ascending.

    Ids without gaps (no image ever removed) are just a range: MIN/MAX read the ends of the
    table's b-tree and COUNT(*) the smallest index. Otherwise they are read without ORDER BY,
    which lets SQLite scan a covering index instead of the table itself (with ORDER BY id it
    walked every row's embedding: 1.26 s at 100k rows, measured), and sorted here.
    """
    low, high, count = reads.first("SELECT MIN(id), MAX(id), COUNT(*) FROM images")
    if not count:
        return np.zeros(0, np.int64)
    if high - low + 1 == count:
        return np.arange(low, high + 1, dtype=np.int64)
    return np.sort(np.asarray(reads.column("SELECT id FROM images"), np.int64))
