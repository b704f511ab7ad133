"""Opening a saved FAISS index, and naming its memory-mapped lists: what every query needs.

Apart from `index_builder` (training, shards, the on-disk merge) so that a query,
which only opens what a build left, imports none of the building machinery.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import faiss

from retrieval.store.mapped_lists import MappedLists

MMAP_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY


def open_index(path: Path, on_disk: bool, mapped: bool = False) -> faiss.Index:
    """Read an index; on-disk IVF lists are memory-mapped read-only from the `.ivfdata` beside it.

    `mapped` (a one-shot query) maps a flat index's vectors from the file instead of copying
    them (100k x 512 floats: 0.25 s and 200 MB less). FAISS aborts the process on any edit of
    a mapped index, so its holder must reopen it unmapped before adding or removing vectors.
    On-disk lists are read only where a search asks (no read-around), so use `tuning.search_index`."""
    if not on_disk:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mapped else 0)
    with quiet_stdout():  # FAISS announces the renamed data path on stdout, which --json owns
        index = faiss.read_index(str(path), MMAP_FLAGS)
    lists = MappedLists.find(index)
    if lists is not None:
        lists.read_no_more_than_asked()  # searches ask for their lists (MappedLists.search)
    return index


def data_files(root: Path) -> list[Path]:
    return sorted(Path(root).glob("index-*.ivfdata"))


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence C-level prints to fd 1 (FAISS's on-disk code uses printf) without losing Python's."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
