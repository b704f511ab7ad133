"""How a query reads an on-disk IVF index's memory-mapped lists: exactly the probed ones.

A page fault on a mapped file makes the kernel read around it, as far as the disk's
`read_ahead_kb` (8 MB on the machine measured). A cold query that visits eight ~80 KB
lists then pulls in tens of MB it never reads: under a 1 GB memory cap, 1,000 cold queries
on a 10M index evicted each other's pages and took 57 ms each (p50). FAISS's own prefetch
only touches the lists from threads, which fault, so it reads around the same way.

So the mapping is advised MADV_RANDOM once (no read-around), and each search assigns its
queries to lists first, asks for exactly those lists' codes and ids with MADV_WILLNEED (the
kernel starts every read at once, one request per range), then scans them with
`search_preassigned`: the same lists, the same results as `index.search`.
"""

from __future__ import annotations

import ctypes
import mmap

import faiss
import numpy as np

from retrieval.model.release import glibc

MADV_RANDOM = 1  # Linux madvise advice: no read-around on faults in this range
MADV_WILLNEED = 3  # Linux madvise advice: start reading these pages now
ID_BYTES = 8  # FAISS list ids are int64


class MappedLists:
    """An index whose IVF lists live in a mapped `.ivfdata` file, searched list by list."""

    def __init__(self, owner: faiss.Index, transforms: list[faiss.VectorTransform], ivf: faiss.IndexIVF,
                 lists: faiss.OnDiskInvertedLists) -> None:
        self.owner = owner  # the parts below are views into it: it must outlive them (and the mapping)
        self.transforms, self.ivf, self.lists = transforms, ivf, lists
        self.base = int(lists.ptr)
        self.code_size = int(lists.code_size)

    @classmethod
    def find(cls, index: faiss.Index) -> MappedLists | None:
        """The mapped lists behind `index` (an IVF, bare or behind a pre-transform); None otherwise."""
        owner = index
        index = faiss.downcast_index(index)
        transforms = []
        if isinstance(index, faiss.IndexPreTransform):
            transforms = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
            index = faiss.downcast_index(index.index)
        if not isinstance(index, faiss.IndexIVF):
            return None
        lists = faiss.downcast_InvertedLists(index.invlists)
        if not isinstance(lists, faiss.OnDiskInvertedLists) or not int(lists.ptr) or not lists.totsize:
            return None
        return cls(owner, transforms, index, lists)

    def read_no_more_than_asked(self) -> bool:
        """Advise the whole mapping MADV_RANDOM; False where the kernel refused (nothing changes)."""
        return _madvise(self.base, int(self.lists.totsize), MADV_RANDOM)

    def search(self, queries: np.ndarray, k: int, params: faiss.SearchParametersIVF):
        """`index.search(queries, k)` under `params` (nprobe, selector), reading the probed lists first."""
        x = np.ascontiguousarray(queries, dtype=np.float32)
        for transform in self.transforms:
            x = np.ascontiguousarray(transform.apply(x), dtype=np.float32)
        nprobe = params.nprobe = max(1, min(int(params.nprobe), int(self.ivf.nlist)))
        coarse_d, coarse_i = self.ivf.quantizer.search(x, nprobe)
        self.will_need(coarse_i)
        n = len(x)
        distances, labels = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
        # the C call: FAISS's Python wrapper of search_preassigned refuses `params`
        self.ivf.search_preassigned_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(coarse_i), faiss.swig_ptr(coarse_d),
                                      faiss.swig_ptr(distances), faiss.swig_ptr(labels), False, params)
        return distances, labels

    def will_need(self, list_nos: np.ndarray) -> int:
        """Ask the kernel for these lists' codes and ids now; returns how many ranges it took."""
        taken = 0
        for list_no in np.unique(list_nos[list_nos >= 0]).tolist():
            one = self.lists.lists.at(list_no)
            if not one.size:
                continue
            codes = self.base + int(one.offset)
            ids = codes + int(one.capacity) * self.code_size
            taken += _madvise(codes, int(one.size) * self.code_size, MADV_WILLNEED)
            taken += _madvise(ids, int(one.size) * ID_BYTES, MADV_WILLNEED)
        return taken


def _madvise(start: int, length: int, advice: int) -> bool:
    """madvise over the whole pages covering [start, start + length); False where unavailable."""
    libc = glibc()
    if libc is None or length <= 0:
        return False
    page = mmap.PAGESIZE
    first = start // page * page
    last = -(-(start + length) // page) * page
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(advice)) == 0
