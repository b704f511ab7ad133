"""The FAISS cache's files and saved state, read without FAISS or numpy.

Why apart from `vectors`: an unchanged `clipfind index` re-run (`retrieval.index.rerun`)
must tell whether the saved index already agrees with the database, and importing
FAISS and numpy to find that out was a third of its time. `vectors` uses the same
names and state, and re-exports them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.store.reads import Reads

if TYPE_CHECKING:
    from retrieval.store.tuning import SearchSetting

INDEX_FILE = "index.faiss"
STATE_FILE = "index.json"
EXACT_LIMIT = 100_000  # below this an exact inner-product scan is fast enough and perfect


@dataclass
class IndexState:
    watermark: int = 0
    factory: str = "Flat"
    ntotal: int = 0
    nprobe: int = 16
    library_id: str | None = None  # the database this index was built from
    frozen: bool = False  # built by index_builder: never edited; changes since `watermark` live in a Delta
    on_disk: bool = False  # IVF lists in a memory-mapped index-*.ivfdata beside index.faiss
    data_file: str | None = None  # its name (a new one per build, so a crash mid-build harms nothing)
    efsearch: int = 0
    refine: int = 1  # candidates per result re-ranked exactly from stored vectors (PQ codes)
    plan: dict | None = None  # index_plan.IndexPlan, why this index
    tuned: dict | None = None  # tuning.SearchSetting, the recall measured at these parameters

    @property
    def setting(self) -> SearchSetting:
        from retrieval.store.tuning import SearchSetting  # FAISS: only where an index is searched

        return SearchSetting(nprobe=self.nprobe, efsearch=self.efsearch, refine=self.refine)


def read_state(root: Path) -> IndexState:
    """The saved state (`index.json`); raises OSError, ValueError or TypeError as it is unreadable."""
    return IndexState(**json.loads((Path(root) / STATE_FILE).read_text()))


def temp_name(path: Path, pid: int | str) -> Path:
    """Where `vectors.fsync_write` writes `path` before renaming it (pid "*": a glob of all)."""
    return path.with_name(f".{path.name}.tmp-{pid}")


def temp_files(root: Path) -> list[Path]:
    """Temp files a save killed half-way left behind (the next writer removes them)."""
    return [p for name in (INDEX_FILE, STATE_FILE) for p in Path(root).glob(temp_name(Path(root) / name, "*").name)]


def last_log_seq(reads: Reads) -> int:
    """The newest `vector_log` seq ever written (the watermark a build starting now covers).

    SQLite: its AUTOINCREMENT counter, which a rollback restores. PostgreSQL: the largest
    committed seq; the triggers commit seqs in order, so every smaller one is visible too.
    """
    if reads.dialect == "postgresql":
        return int(reads.scalar("SELECT coalesce(max(seq), 0) FROM vector_log"))
    seq = reads.scalar("SELECT seq FROM sqlite_sequence WHERE name = 'vector_log'")
    return int(seq) if seq is not None else 0


# FAISS's index file: a 4-byte type tag, then (d int32, ntotal int64, two int64 placeholders,
# is_trained bool, metric int32); an IndexIDMap2 ends with its ids as (count uint64, ids int64[]).
_HEADER = struct.Struct("<4siqqq?i")
_FLAT = (b"IxFI", b"IxF2")  # inner product, L2


def index_file_sound(path: Path, dim: int, ntotal: int) -> bool:
    """Whether `path` is, by its header and length, an id-mapped FAISS index of `ntotal`
    `dim`-d vectors, read without FAISS: a flat one must have exactly its length, any other
    its ids' count where the ids end the file. What FAISS itself would refuse on reading
    (another size, a truncated file) is refused here; anything unknown is too."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2 * _HEADER.size)
            size = fh.seek(0, 2)
            ids_at = size - 8 * (ntotal + 1)
            if len(head) < 2 * _HEADER.size or ids_at < 2 * _HEADER.size:
                return False
            fh.seek(ids_at)
            (count,) = struct.unpack("<Q", fh.read(8))
    except OSError:
        return False
    outer, inner = _HEADER.unpack_from(head), _HEADER.unpack_from(head, _HEADER.size)
    if outer[0] != b"IxM2" or outer[1:3] != (dim, ntotal) or inner[1:3] != (dim, ntotal) or count != ntotal:
        return False
    if inner[0] in _FLAT:  # headers, the vectors (count + floats), the ids (count + int64s)
        return size == 2 * _HEADER.size + 8 + ntotal * dim * 4 + 8 + ntotal * 8
    return True
