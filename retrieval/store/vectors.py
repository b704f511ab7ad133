"""The FAISS index: a cache of `images.embedding`, keyed by image id.

The index file (`index.faiss`) and its state (`index.json`: the database it
was built from, the last `vector_log` seq it covers, its factory string, size)
are each written to a
temp file, fsynced and renamed, faiss first. A crash between the two leaves an
older watermark than the index really covers; catching up is idempotent
(remove the logged ids, re-add what the database still has), so that is safe.

The cache is bound to one database by the library's identity (a uuid written
into `meta` when the database is made): a database deleted and made again, a
zero-byte one, or another library's `index.*` files copied in all carry
another identity (or none), so the saved index is discarded and rebuilt
instead of answering for rows it never saw.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Engine

from retrieval.store.schema import blobs_to_matrix
from retrieval.store.sql import in_chunks

INDEX_FILE = "index.faiss"
STATE_FILE = "index.json"
EXACT_LIMIT = 100_000  # below this an exact inner-product scan is fast enough and perfect
DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of vectors we are willing to hold in RAM
_SELECT_EMBEDDINGS = text("SELECT id, embedding FROM images WHERE id IN :ids").bindparams(
    bindparam("ids", expanding=True)
)


def choose_factory(n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """Pick a FAISS index by collection size and memory, in FAISS's factory vocabulary.

    Exact search below ~100k vectors; an IVF over exact vectors above; IVF with
    product quantisation when the raw vectors would not fit the budget.
    """
    if n < EXACT_LIMIT:
        return "Flat"
    nlist = int(min(65536, max(256, 4 * math.sqrt(n))))
    if n * dim * 4 <= memory_budget:
        return f"IVF{nlist},Flat"
    m = next(m for m in (64, 48, 32, 16, 8) if dim % m == 0)
    return f"IVF{nlist},PQ{m}"


def _temp_name(path: Path, pid: int | str) -> Path:
    return path.with_name(f".{path.name}.tmp-{pid}")


def remove_temp_files(root: Path) -> None:
    """Delete the temp files a save killed half-way left behind (call under the write lock)."""
    for name in (INDEX_FILE, STATE_FILE):
        for stale in root.glob(_temp_name(root / name, "*").name):
            stale.unlink(missing_ok=True)


def _fsync_write(path: Path, write) -> None:
    tmp = _temp_name(path, os.getpid())
    write(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class IndexState:
    watermark: int = 0
    factory: str = "Flat"
    ntotal: int = 0
    nprobe: int = 16
    library_id: str | None = None  # the database this index was built from


class VectorIndex:
    """FAISS over the database's embeddings; `sync()` makes it agree with the database."""

    def __init__(self, root: Path, dim: int, library_id: str | None = None) -> None:
        self.root = Path(root)
        self.dim = dim
        self.library_id = library_id  # None (an old library opened read-only): not checked
        self.index_path = self.root / INDEX_FILE
        self.state_path = self.root / STATE_FILE
        self.index: faiss.Index | None = None
        self.state = IndexState()

    # -- persistence -----------------------------------------------------------------
    def load(self) -> bool:
        """Read the saved index; False (and nothing loaded) if it is missing, unreadable or
        was built from another database."""
        try:
            state = IndexState(**json.loads(self.state_path.read_text()))
            if self.library_id is not None and state.library_id != self.library_id:
                return False
            index = faiss.read_index(str(self.index_path))
        except (OSError, ValueError, TypeError, RuntimeError):
            return False
        if index.d != self.dim or index.ntotal != state.ntotal:
            return False
        self.index, self.state = index, state
        return True

    def save(self) -> None:
        assert self.index is not None
        self.state.ntotal = int(self.index.ntotal)
        _fsync_write(self.index_path, lambda tmp: faiss.write_index(self.index, str(tmp)))
        _fsync_write(self.state_path, lambda tmp: tmp.write_text(json.dumps(self.state.__dict__)))

    # -- building --------------------------------------------------------------------
    def _new_index(self, factory: str, sample: np.ndarray) -> faiss.Index:
        inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not inner.is_trained:
            inner.train(sample)
        return faiss.IndexIDMap2(inner)

    def rebuild(self, engine: Engine, factory: str | None = None, chunk: int = 50_000) -> None:
        """Build the index from every stored embedding (streamed in chunks)."""
        with engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM images")).scalar_one()
            watermark = _last_seq(conn)
            factory = factory or choose_factory(n, self.dim)
            sample = self._training_sample(conn, factory, n)
            index = self._new_index(factory, sample)
            last_id = 0
            while True:
                rows = conn.execute(
                    text("SELECT id, embedding FROM images WHERE id > :last ORDER BY id LIMIT :n"),
                    {"last": last_id, "n": chunk},
                ).all()
                if not rows:
                    break
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                index.add_with_ids(blobs_to_matrix([r[1] for r in rows], self.dim), ids)
                last_id = int(ids[-1])
        self.index = index
        self.state = IndexState(watermark=watermark, factory=factory, nprobe=self.state.nprobe,
                                library_id=self.library_id)

    def _training_sample(self, conn, factory: str, n: int) -> np.ndarray:
        if not factory.startswith(("IVF", "PQ", "OPQ")) or n == 0:
            return np.zeros((0, self.dim), np.float32)
        rows = conn.execute(
            text("SELECT embedding FROM images ORDER BY random() LIMIT :n"), {"n": min(n, 100_000)}
        ).all()
        return blobs_to_matrix([r[0] for r in rows], self.dim)

    def sync(self, engine: Engine, save: bool = True) -> str:
        """Make the index agree with the database; returns what it did ('ok', 'caught-up', 'rebuilt')."""
        if self.index is None and not self.load():
            self.rebuild(engine)
            self._save_quietly(save)
            return "rebuilt"
        with engine.connect() as conn:
            last = _last_seq(conn)
            if last == self.state.watermark and self._count_matches(conn):
                return "ok"
            if _log_has_gap(conn, self.state.watermark, last):
                action = None
            else:
                action = self._apply_log(conn, last)
        if action is None or self.index.ntotal != _count(engine):
            self.rebuild(engine, factory=self.state.factory)
            action = "rebuilt"
        self._save_quietly(save)
        return action

    def _apply_log(self, conn, last: int) -> str | None:
        ids = sorted({r[0] for r in conn.execute(
            text("SELECT image_id FROM vector_log WHERE seq > :w AND seq <= :last"),
            {"w": self.state.watermark, "last": last},
        )})
        if ids:
            id_array = np.array(ids, dtype=np.int64)
            try:
                self.index.remove_ids(id_array)
            except RuntimeError:  # e.g. HNSW cannot remove: rebuild instead
                return None
            for part in in_chunks(ids):
                rows = conn.execute(_SELECT_EMBEDDINGS, {"ids": part}).all()
                if rows:
                    self.index.add_with_ids(
                        blobs_to_matrix([r[1] for r in rows], self.dim),
                        np.array([r[0] for r in rows], dtype=np.int64),
                    )
        self.state.watermark = last
        return "caught-up"

    def _count_matches(self, conn) -> bool:
        return self.index.ntotal == conn.execute(text("SELECT count(*) FROM images")).scalar_one()

    def _save_quietly(self, save: bool) -> None:
        """Persist if we may; a read-only library still answers queries from memory."""
        if not save:
            return
        try:
            self.save()
        except OSError:
            pass

    # -- querying --------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products; `allowed_ids` restricts the search itself, so filters lose no recall."""
        assert self.index is not None
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(k, int(self.index.ntotal)))
        params = self._search_params(allowed_ids)
        if params is None:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=params)

    def _search_params(self, allowed_ids: np.ndarray | None):
        inner = faiss.downcast_index(self.index.index)
        is_ivf = isinstance(inner, faiss.IndexIVF)
        if allowed_ids is None and not is_ivf:
            return None
        params = faiss.SearchParametersIVF() if is_ivf else faiss.SearchParameters()
        if is_ivf:
            params.nprobe = self.state.nprobe
        if allowed_ids is not None:
            self._selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
            params.sel = self._selector  # keep a reference: FAISS does not own it
        return params

    def reconstruct(self, image_id: int) -> np.ndarray:
        assert self.index is not None
        return self.index.reconstruct(int(image_id))

    def prune_log(self, engine: Engine) -> None:
        """Drop log entries the saved index covers; only call while holding the write lock."""
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM vector_log WHERE seq <= :w"), {"w": self.state.watermark})


def _last_seq(conn) -> int:
    row = conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = 'vector_log'")).first()
    return int(row[0]) if row else 0


def _log_has_gap(conn, watermark: int, last: int) -> bool:
    """True when entries after our watermark were pruned: we cannot catch up, only rebuild."""
    if last <= watermark:
        return last < watermark  # the database went backwards (restored?): rebuild
    first = conn.execute(text("SELECT min(seq) FROM vector_log")).scalar_one()
    return first is None or first > watermark + 1


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM images")).scalar_one()
