"""Build a planned FAISS index from a stream of vectors without holding them all in RAM.

IVF kinds follow FAISS's on-disk recipe (faiss/contrib/ondisk.py): train the
quantisers on a sample, add the vectors shard by shard into copies of the
trained index, each written to its own file, then merge every shard's inverted
lists into one `.ivfdata` file that search memory-maps. The build's peak
memory is a shard's vectors plus the training sample, whatever the total.

Everything is built inside a temp folder in the library directory and only
`install`ed (renamed into place) when complete, so a crash or Ctrl-C leaves
the previous index untouched. Each build's `.ivfdata` has its own name, so the
old index keeps working until the new one replaces it.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from retrieval.store.index_files import quiet_stdout
from retrieval.store.index_plan import IndexPlan
from retrieval.store.reads import Reads, in_list
from retrieval.store.rows import blobs_to_matrix
from retrieval.store.sql import in_chunks

SHARD_SIZE = 250_000  # vectors per shard: 0.5 GB of 512-d floats, the build's main working set
CHUNK = 50_000  # vectors per read from the source
OPQ_ROUNDS = 8
OPQ_TRAIN = 32_768


class VectorSource(Protocol):
    """Where a build reads vectors: the library's database, or a benchmark's memmap."""

    dim: int

    def count(self) -> int: ...
    def chunks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]: ...
    def fetch(self, ids: np.ndarray) -> np.ndarray: ...


class SqlVectorSource:
    """The `images.embedding` column, read through one connection (one consistent snapshot)."""

    def __init__(self, reads: Reads, dim: int) -> None:
        self.reads = reads
        self.dim = dim

    def count(self) -> int:
        return int(self.reads.scalar("SELECT count(*) FROM images"))

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        last = -1
        while True:
            rows = self.reads.all("SELECT id, embedding FROM images WHERE id > :last ORDER BY id LIMIT :n",
                                  {"last": last, "n": size})
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            last = int(ids[-1])
            yield ids, blobs_to_matrix([r[1] for r in rows], self.dim)

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        all_ids = np.array(self.reads.column("SELECT id FROM images"), dtype=np.int64)
        chosen = np.sort(np.random.default_rng(seed).choice(all_ids, size=min(n, len(all_ids)), replace=False))
        return chosen, self.fetch(chosen)

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """Rows in the order of `ids`."""
        found: dict[int, bytes] = {}
        wanted = [int(i) for i in ids]
        for part in in_chunks(wanted):
            listed, params = in_list(part)
            found.update(self.reads.all(f"SELECT id, embedding FROM images WHERE id IN {listed}", params))
        return blobs_to_matrix([found[i] for i in wanted], self.dim)


class MatrixSource:
    """Vectors in an array or `np.memmap` (ids 0..n-1 unless given): benchmarks and tests."""

    def __init__(self, x: np.ndarray, ids: np.ndarray | None = None) -> None:
        self.x = x
        self.dim = int(x.shape[1])
        self.ids = np.arange(len(x), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        self._row = {int(i): r for r, i in enumerate(self.ids)} if ids is not None else None

    def count(self) -> int:
        return len(self.x)

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.x), size):
            yield self.ids[start:start + size], np.ascontiguousarray(self.x[start:start + size], dtype=np.float32)

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(np.random.default_rng(seed).choice(len(self.x), size=min(n, len(self.x)), replace=False))
        return self.ids[rows], np.ascontiguousarray(self.x[rows], dtype=np.float32)

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        rows = ids if self._row is None else np.array([self._row[int(i)] for i in ids], dtype=np.int64)
        order = np.argsort(rows)  # a memmap reads fastest in file order
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        out[order] = self.x[rows[order]]
        return out


@dataclass
class BuiltIndex:
    """A finished build waiting in its temp folder for `VectorIndex.install`."""

    index_file: Path
    data_file: Path | None  # the merged inverted lists (IVF kinds), beside index_file until installed
    ntotal: int
    build_dir: Path


def build_index(source: VectorSource, plan: IndexPlan, root: Path, shard_size: int = SHARD_SIZE,
                progress: Callable[[int], None] | None = None) -> BuiltIndex:
    """Train, add in shards, merge on disk; nothing in `root` changes until the caller installs it."""
    token = secrets.token_hex(4)
    build_dir = Path(root) / f".index-build-{token}"
    build_dir.mkdir()
    try:
        if plan.on_disk:
            return _build_ivf(source, plan, build_dir, token, shard_size, progress)
        return _build_in_ram(source, plan, build_dir, progress)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise


def _build_in_ram(source: VectorSource, plan: IndexPlan, build_dir: Path,
                  progress: Callable[[int], None] | None) -> BuiltIndex:
    index = faiss.IndexIDMap2(faiss.index_factory(source.dim, plan.factory, faiss.METRIC_INNER_PRODUCT))
    for ids, x in _prefetched(source.chunks(CHUNK)):
        index.add_with_ids(x, ids)
        if progress:
            progress(len(ids))
    path = build_dir / "index.faiss"
    faiss.write_index(index, str(path))
    return BuiltIndex(path, None, int(index.ntotal), build_dir)


def _build_ivf(source: VectorSource, plan: IndexPlan, build_dir: Path, token: str,
               shard_size: int, progress: Callable[[int], None] | None) -> BuiltIndex:
    trained_path = build_dir / "trained.faiss"
    _, sample = source.sample(plan.train_size, seed=0)
    index = faiss.index_factory(source.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    _lighten_opq(index)
    index.train(sample)
    del sample
    faiss.write_index(index, str(trained_path))
    shard_paths = _add_in_shards(source, trained_path, build_dir, shard_size, progress)
    data_file = build_dir / f"index-{token}.ivfdata"  # install() moves it beside index.faiss
    merged = faiss.read_index(str(trained_path))
    with quiet_stdout():  # FAISS prints each file it resizes
        merge_ondisk(merged, [str(p) for p in shard_paths], str(data_file))
    _unmap_leaked(shard_paths)
    for path in shard_paths + [trained_path]:
        path.unlink()
    _fsync(data_file)
    index_file = build_dir / "index.faiss"
    faiss.write_index(merged, str(index_file))
    return BuiltIndex(index_file, data_file, int(merged.ntotal), build_dir)


def _unmap_leaked(paths: list[Path]) -> None:
    """Unmap the shard files FAISS's merge leaves mapped. merge_ondisk disowns each shard's
    memory-mapped lists and never frees them, so every shard stayed mapped (resident, and once
    unlinked still holding its disk space) for the rest of the process: 1.3 GiB at 10M vectors.
    Freeing the lists through SWIG instead left later FAISS objects unfreed here ("no destructor
    found"), so only their mappings go; nothing refers to them after the merge. Linux only."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return
    names = {str(p) for p in paths}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.munmap(start, end - start)


def _lighten_opq(index: faiss.Index) -> None:
    """OPQ's defaults (50 rounds of PQ training on 65k points) cost minutes per round on 2 busy
    cores; 8 rounds on 32k points keep most of its gain (FAISS's OPQ converges in the first few)."""
    if isinstance(index, faiss.IndexPreTransform):
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        if isinstance(opq, faiss.OPQMatrix):
            opq.niter, opq.max_train_points = OPQ_ROUNDS, OPQ_TRAIN


def _add_in_shards(source: VectorSource, trained_path: Path, build_dir: Path, shard_size: int,
                   progress: Callable[[int], None] | None) -> list[Path]:
    """Copies of the trained index, `shard_size` vectors each, written to files; FAISS encodes on every core."""
    paths: list[Path] = []
    shard, filled = None, 0
    for ids, x in _prefetched(source.chunks(min(CHUNK, shard_size))):
        if shard is None:
            shard = faiss.read_index(str(trained_path))
        shard.add_with_ids(x, ids)
        filled += len(ids)
        if progress:
            progress(len(ids))
        if filled >= shard_size:
            paths.append(_write_shard(shard, build_dir / f"shard-{len(paths):05d}.faiss"))
            shard, filled = None, 0
    if shard is not None:
        paths.append(_write_shard(shard, build_dir / f"shard-{len(paths):05d}.faiss"))
    return paths


def _write_shard(shard: faiss.Index, path: Path) -> Path:
    faiss.write_index(shard, str(path))
    return path


def _prefetched(chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read the next chunk (SQL decode, disk) while FAISS adds this one: FAISS releases the GIL."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(next, chunks, None)
        while True:
            item = future.result()
            if item is None:
                return
            future = pool.submit(next, chunks, None)
            yield item


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
