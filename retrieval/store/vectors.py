"""The FAISS index: a cache of `images.embedding`, keyed by image id.

The index file (`index.faiss`) and its state (`index.json`: the database it
was built from, the last `vector_log` seq it covers, its factory string, size)
are each written to a
temp file, fsynced and renamed, faiss first. A crash between the two leaves an
older watermark than the index really covers; catching up is idempotent
(remove the logged ids, re-add what the database still has), so that is safe.

An index built by `clipfind reindex --index-type auto` is *frozen*: HNSW in RAM
or IVF lists memory-mapped read-only (`index-*.ivfdata`), never edited in
place; rows changed since its watermark are served by `index_delta.Delta`.

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
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from retrieval.store.index_delta import Delta, merge_top_k
from retrieval.store.index_files import data_files, open_index
from retrieval.store.index_state import (  # noqa: F401 - re-exported: the cache's files and state
    EXACT_LIMIT,
    INDEX_FILE,
    STATE_FILE,
    IndexState,
    last_log_seq,
    temp_files,
    temp_name,
)
from retrieval.store.reads import Reads, in_list, reading
from retrieval.store.rows import blobs_to_matrix
from retrieval.store.sql import in_chunks
from retrieval.store.tuning import search_index

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retrieval.store.index_builder import BuiltIndex

DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of vectors we are willing to hold in RAM
READER_SAVE_ROWS = 10_000  # a searcher saves its catch-up once it has read this many rows (or 1/4 of the index)


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


def remove_temp_files(root: Path) -> None:
    """Delete the temp files a save killed half-way left behind (call under the write lock)."""
    for stale in temp_files(root):
        stale.unlink(missing_ok=True)


def fsync_write(path: Path, write) -> None:
    """Replace `path` atomically and durably: `write(tmp)` fills a temp file beside it, which is
    fsynced, renamed over `path`, and the folder fsynced (a crash leaves the old file or the new)."""
    tmp = temp_name(path, os.getpid())
    write(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class VectorIndex:
    """FAISS over the database's embeddings; `sync()` makes it agree with the database."""

    def __init__(self, root: Path, dim: int, library_id: str | None = None, mapped: bool = False) -> None:
        self.root = Path(root)
        self.mapped = mapped  # open a saved flat index memory-mapped (see index_files.open_index)
        self._index_is_mapped = False
        self.dim = dim
        self.library_id = library_id  # None (an old library opened read-only): not checked
        self.index_path = self.root / INDEX_FILE
        self.state_path = self.root / STATE_FILE
        self.index: faiss.Index | None = None
        self.state = IndexState()
        self.delta = Delta.empty(dim)
        self._delta_upto = -1
        self._unsaved = 0  # rows caught up from the log since the saved file

    # -- persistence -----------------------------------------------------------------
    def load(self) -> bool:
        """Read the saved index; False (and nothing loaded) if it is missing, unreadable or
        was built from another database."""
        try:
            state = IndexState(**json.loads(self.state_path.read_text()))
            if self.library_id is not None and state.library_id != self.library_id:
                return False
            index = open_index(self.index_path, state.on_disk, mapped=self.mapped)
        except (OSError, ValueError, TypeError, RuntimeError):
            return False
        if index.d != self.dim or index.ntotal != state.ntotal:
            return False
        self.index, self.state = index, state
        self._index_is_mapped = self.mapped and not state.on_disk
        self.delta, self._delta_upto = Delta.empty(self.dim), -1
        self._unsaved = 0
        return True

    def save(self) -> None:
        assert self.index is not None
        self._unsaved = 0
        self.state.ntotal = int(self.index.ntotal)
        if not self.state.frozen:
            fsync_write(self.index_path, lambda tmp: faiss.write_index(self.index, str(tmp)))
        fsync_write(self.state_path, lambda tmp: tmp.write_text(json.dumps(self.state.__dict__)))

    def install(self, built: BuiltIndex, state: IndexState) -> None:
        """Put a finished build in place of the current index (lists, index, then state), and open it.

        Only a writer (under the write lock) may call this: it deletes older builds' lists.
        """
        if built.data_file is not None:
            fsync_write(self.root / built.data_file.name, lambda tmp: os.replace(built.data_file, tmp))
        fsync_write(self.index_path, lambda tmp: os.replace(built.index_file, tmp))
        state.ntotal = built.ntotal
        state.data_file = built.data_file.name if built.data_file else None
        fsync_write(self.state_path, lambda tmp: tmp.write_text(json.dumps(state.__dict__)))
        shutil.rmtree(built.build_dir, ignore_errors=True)
        self.index, self.state = open_index(self.index_path, state.on_disk), state
        self._index_is_mapped = False
        self.delta, self._delta_upto = Delta.empty(self.dim), -1
        self.drop_unused_data_files()

    def drop_unused_data_files(self) -> None:
        """Delete older builds' lists (writers only); a reader still mapping one keeps it until it closes."""
        for path in data_files(self.root):
            if path.name != self.state.data_file:
                path.unlink(missing_ok=True)

    # -- building --------------------------------------------------------------------
    def _new_index(self, factory: str, sample: np.ndarray) -> faiss.Index:
        inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not inner.is_trained:
            inner.train(sample)
        return faiss.IndexIDMap2(inner)

    def rebuild(self, source, factory: str | None = None, chunk: int = 50_000) -> None:
        """Build the index from every stored embedding (streamed in chunks).

        `source`: what `reads.reading` takes (a library, or a SQLAlchemy Engine)."""
        with reading(source) as reads, reads.snapshot():
            n = reads.scalar("SELECT count(*) FROM images")
            watermark = last_log_seq(reads)
            factory = factory or choose_factory(n, self.dim)
            sample = self._training_sample(reads, factory, n)
            index = self._new_index(factory, sample)
            last_id = 0
            while True:
                rows = reads.all("SELECT id, embedding FROM images WHERE id > :last ORDER BY id LIMIT :n",
                                 {"last": last_id, "n": chunk})
                if not rows:
                    break
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                index.add_with_ids(blobs_to_matrix([r[1] for r in rows], self.dim), ids)
                last_id = int(ids[-1])
        self.index, self._index_is_mapped = index, False
        self.state = IndexState(watermark=watermark, factory=factory, nprobe=self.state.nprobe,
                                library_id=self.library_id)
        self.delta, self._delta_upto = Delta.empty(self.dim), -1

    def _training_sample(self, reads: Reads, factory: str, n: int) -> np.ndarray:
        if not factory.startswith(("IVF", "PQ", "OPQ")) or n == 0:
            return np.zeros((0, self.dim), np.float32)
        blobs = reads.column("SELECT embedding FROM images ORDER BY random() LIMIT :n", {"n": min(n, 100_000)})
        return blobs_to_matrix(blobs, self.dim)

    def sync(self, source, save: bool = True, reader: bool = False) -> str:
        """Make the index agree with the database; returns what it did ('ok', 'caught-up', 'rebuilt').

        `source`: what `reads.reading` takes (a library, or a SQLAlchemy Engine). A `reader`
        (a searcher) keeps a small catch-up in memory: while an index run commits batches,
        rewriting the whole file on every query cost more than the query (0.3-0.7 s at 50k
        vectors); the writer saves at its end anyway."""
        if self.index is None and not self.load():
            self.rebuild(source)
            self._save_quietly(save)
            return "rebuilt"
        if self.state.frozen:
            return self._sync_delta(source, save)
        with reading(source) as reads, reads.snapshot():
            last = last_log_seq(reads)
            if last == self.state.watermark and self._count_matches(reads):
                return "ok"
            if _log_has_gap(reads, self.state.watermark, last):
                action = None
            else:
                action = self._apply_log(reads, last)
            stale = action is None or self.index.ntotal != _count(reads)
        if stale:
            self.rebuild(source, factory=self.state.factory)
            action = "rebuilt"
        if action == "rebuilt" or not reader or self._unsaved >= max(READER_SAVE_ROWS, self.index.ntotal // 4):
            self._save_quietly(save)
        return action

    def _sync_delta(self, source, save: bool) -> str:
        """A frozen index stays as built; re-read the rows logged since its watermark."""
        with reading(source) as reads, reads.snapshot():
            last = last_log_seq(reads)
            gap = _log_has_gap(reads, self.state.watermark, last)
            if not gap and last != self._delta_upto:
                self.delta = Delta.from_log(reads, self.state.watermark, last, self.dim)
                self._delta_upto = last
        if gap:  # the log no longer reaches back to the build: start again from the database
            self.rebuild(source)
            self._save_quietly(save)
            return "rebuilt"
        return "caught-up" if len(self.delta) else "ok"

    def _apply_log(self, reads: Reads, last: int) -> str | None:
        ids = sorted(set(reads.column("SELECT image_id FROM vector_log WHERE seq > :w AND seq <= :last",
                                      {"w": self.state.watermark, "last": last})))
        self._unsaved += len(ids)
        if ids:
            id_array = np.array(ids, dtype=np.int64)
            if not self._own_index():
                return None
            try:
                self.index.remove_ids(id_array)
            except RuntimeError:  # e.g. HNSW cannot remove: rebuild instead
                return None
            for part in in_chunks(ids):
                listed, params = in_list(part)
                rows = reads.all(f"SELECT id, embedding FROM images WHERE id IN {listed}", params)
                if rows:
                    self.index.add_with_ids(
                        blobs_to_matrix([r[1] for r in rows], self.dim),
                        np.array([r[0] for r in rows], dtype=np.int64),
                    )
        self.state.watermark = last
        return "caught-up"

    def _own_index(self) -> bool:
        """Before an edit: swap a memory-mapped index for an in-memory copy of the same file
        (FAISS aborts on editing a mapped one). False if the file no longer matches."""
        if not self._index_is_mapped:
            return True
        try:
            index = open_index(self.index_path, on_disk=False)
        except (OSError, RuntimeError):
            return False
        if index.ntotal != self.index.ntotal or index.d != self.dim:
            return False
        self.index, self._index_is_mapped = index, False
        return True

    def _count_matches(self, reads: Reads) -> bool:
        return self.index.ntotal == _count(reads)

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
        if self.state.frozen:
            return self._search_frozen(queries, k, allowed_ids)
        k = max(1, min(k, int(self.index.ntotal)))
        params = self._search_params(allowed_ids)
        if params is None:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=params)

    def _search_frozen(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None):
        selector = self.delta.selector(allowed_ids)
        want = max(1, min(k, int(self.index.ntotal)))
        found = search_index(self.index, queries, want, self.state.setting, selector)
        if not len(self.delta):
            return found
        return merge_top_k(found, self.delta.search(queries, k, allowed_ids), k)

    def ids(self) -> np.ndarray:
        """Every image id the index answers for, sorted (verify compares them with the database)."""
        assert self.index is not None
        if isinstance(self.index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        else:
            lists = faiss.extract_index_ivf(self.index).invlists
            ids = np.concatenate([np.zeros(0, np.int64)] + [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).astype(np.int64)
                for i in range(lists.nlist) if lists.list_size(i)])
        if self.state.frozen:
            ids = np.union1d(np.setdiff1d(ids, self.delta.hidden), self.delta.ids)
        return np.sort(ids)

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
        if self.state.frozen and int(image_id) in set(self.delta.ids.tolist()):
            return self.delta.x[int(np.flatnonzero(self.delta.ids == int(image_id))[0])]
        return self.index.reconstruct(int(image_id))

    def prune_log(self, engine: Engine) -> None:
        """Drop log entries the saved index covers; only call while holding the write lock.

        PostgreSQL keeps the newest covered entry: its `last_log_seq` is the largest seq
        still in the table (a sequence skips the values of rolled-back inserts, so only a
        row says how far the log has come).
        """
        from sqlalchemy import text  # writers only

        keep_last = engine.dialect.name == "postgresql"
        with engine.begin() as conn:
            conn.execute(text(f"DELETE FROM vector_log WHERE seq {'<' if keep_last else '<='} :w"),
                         {"w": self.state.watermark})


def _log_has_gap(reads: Reads, watermark: int, last: int) -> bool:
    """True when entries after our watermark were pruned: we cannot catch up, only rebuild."""
    if last <= watermark:
        return last < watermark  # the database went backwards (restored?): rebuild
    first = reads.scalar("SELECT min(seq) FROM vector_log")
    return first is None or first > watermark + 1


def _count(reads: Reads) -> int:
    return int(reads.scalar("SELECT count(*) FROM images"))
