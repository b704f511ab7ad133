"""On-disk IVF lists are read exactly where a search asks: the same answers, no read-around.

A real on-disk IVF-PQ index built by the product's builder; page-cache residency is the
kernel's own answer (mincore on the mapping) after the file's pages were dropped
(fsync + POSIX_FADV_DONTNEED). Where the kernel keeps them (tmpfs), those tests skip.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time

import faiss
import numpy as np
import pytest

from retrieval.store.index_builder import MatrixSource, build_index
from retrieval.store.index_files import open_index
from retrieval.store.index_plan import IndexPlan
from retrieval.store.mapped_lists import MappedLists
from retrieval.store.tuning import SearchSetting, search_index, search_params

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs Linux page-cache advice")

PAGE = mmap.PAGESIZE


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """40k vectors in 16 lists of ~80 KB codes each: lists span many pages, the file ~1.6 MB."""
    root = tmp_path_factory.mktemp("mapped")
    plan = IndexPlan("ivf-pq", "OPQ16,IVF16,PQ32", 16, 40, 4096, "test")
    return build_index(MatrixSource(unit_rows(40_000, 64, seed=1)), plan, root, shard_size=15_000)


def resident_pages(start: int, length: int) -> np.ndarray:
    """mincore over [start, start + length): one bool per page, True where the page is in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    first = start // PAGE * PAGE
    pages = -(-(start + length - first) // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(first), ctypes.c_size_t(pages * PAGE), vec) == 0, ctypes.get_errno()
    return np.frombuffer(bytes(vec), dtype=np.uint8) & 1 == 1


def dropped(built) -> MappedLists:
    """A freshly opened index whose data file has no page in the page cache (else: skip)."""
    with open(built.data_file, "rb+") as fh:
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    lists = MappedLists.find(open_index(built.index_file, on_disk=True))
    assert lists is not None
    if resident_pages(lists.base, int(lists.lists.totsize)).any():
        pytest.skip("the kernel keeps this file's pages (tmpfs?): residency cannot be observed")
    return lists


def list_range(lists: MappedLists, list_no: int) -> tuple[int, int]:
    one = lists.lists.lists.at(list_no)
    return lists.base + int(one.offset), int(one.size) * lists.code_size


def test_searching_the_mapped_lists_answers_as_faiss_does(built):
    index = open_index(built.index_file, on_disk=True)
    queries = unit_rows(200, 64, seed=2)
    setting = SearchSetting(nprobe=4)
    expected = index.search(queries, 20, params=search_params(index, setting))
    found = search_index(index, queries, 20, setting)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_allclose(found[0], expected[0], rtol=1e-6)

    even = faiss.IDSelectorBatch(np.arange(0, 40_000, 2, dtype=np.int64))
    expected = index.search(queries, 20, params=search_params(index, setting, even))
    found = search_index(index, queries, 20, setting, even)
    np.testing.assert_array_equal(found[1], expected[1])
    assert (found[1][found[1] >= 0] % 2 == 0).all()


def test_a_fault_reads_its_page_and_not_the_pages_around_it(built):
    """Without MADV_RANDOM the kernel would read read_ahead_kb (>= 128 KB) around the fault."""
    lists = dropped(built)
    start, length = list_range(lists, 5)
    middle = (start + length // 2) // PAGE * PAGE
    ctypes.string_at(middle, 1)  # one page fault in the middle of list 5
    around = resident_pages(middle - 16 * PAGE, 33 * PAGE)
    assert around[16] and around.sum() == 1, f"{around.sum()} pages resident around one fault"


def test_will_need_reads_the_asked_lists_and_only_those(built):
    lists = dropped(built)
    assert lists.will_need(np.array([[3, 9, -1]])) == 4  # codes and ids of two lists; -1 (none) skipped
    asked = [list_range(lists, 3), list_range(lists, 9)]
    deadline = time.monotonic() + 5
    while not all(resident_pages(s, n).all() for s, n in asked) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(resident_pages(s, n).all() for s, n in asked)
    for other in (0, 6, 12, 15):
        start, length = list_range(lists, other)
        inner = resident_pages(start + PAGE, length - 2 * PAGE)  # whole pages of this list only
        assert not inner.any(), f"list {other}: {inner.sum()} pages read unasked"


def test_only_on_disk_ivf_lists_are_mapped_lists():
    assert MappedLists.find(faiss.IndexFlatIP(8)) is None
    ivf = faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(unit_rows(200, 8, seed=3))
    assert MappedLists.find(ivf) is None  # lists in memory: nothing to advise
