"""Giving memory back while indexing: weights a run does not use, and glibc's retained heap.

Why (issue 17, ViT-B-32-256 on a 2-core AMD EPYC, RSS of the `clipfind index` process):
importing torch + open_clip costs ~750 MB before any weight, the fp32 model ~660 MB
(text tower ~260 MB of it), the int8 image tower ~130 MB more, and the first batches
another ~230 MB that glibc keeps: torch's large activation buffers fall under malloc's
*dynamic* mmap threshold (it rises to 32 MB after the first freed mmap), land in the
heaps of the encoder's threads and are never returned. Indexing needs neither the text
tower nor, once an int8/bf16/ONNX image tower runs, the fp32 image weights; and a fixed
mmap threshold sends every buffer over 1 MB back to the kernel when torch frees it.
torch is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import platform
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # allocations of 1 MB and more are mmap'd, and unmapped when freed


def tensors_of(module: Any) -> list[torch.Tensor]:
    """Parameters and buffers of a torch module (nothing for a non-torch model, e.g. ONNX)."""
    if not hasattr(module, "parameters") or not hasattr(module, "buffers"):
        return []
    return [*module.parameters(), *module.buffers()]


def release_tensors(model: torch.nn.Module, keep: Iterable[torch.Tensor] = ()) -> int:
    """Drop `model`'s references to its parameters and buffers, except those in `keep`.

    Each is replaced by an empty tensor in the module's own tables; a tensor something
    else still holds (an int8 layer packs its fp32 bias by reference) lives on there, so
    nothing that runs is touched. `model` itself must not run again: `Encoder` reloads
    the weights first. Returns the bytes no longer referenced by `model` (an upper bound
    on what is freed).
    """
    import torch

    kept = {id(t) for t in keep}
    dropped: dict[int, int] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or id(tensor) in kept or tensor.numel() == 0:
                    continue
                dropped[id(tensor)] = tensor.numel() * tensor.element_size()
                empty = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                table[name] = torch.nn.Parameter(empty, requires_grad=False) \
                    if isinstance(tensor, torch.nn.Parameter) else empty
    return sum(dropped.values())


@functools.cache
def glibc() -> Any | None:
    """This process's C library through ctypes, loaded once; None unless Linux with glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - no loadable libc
        return None


def trim_heap() -> bool:
    """Collect garbage, then hand glibc's free heap pages back to the kernel (malloc_trim)."""
    gc.collect()
    libc = glibc()
    return bool(libc and libc.malloc_trim(0))


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Stop glibc raising its mmap threshold, so large freed buffers go back to the kernel.

    Process-wide and lasting (mallopt has no undo); False where the C library is not glibc.
    """
    libc = glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


MADV_DONTNEED = 4  # Linux madvise advice: drop these pages (a file mapping re-reads them on access)


def file_ranges(path: Any) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` (from /proc/self/maps; [] elsewhere)."""
    import os

    try:
        inode = os.stat(path).st_ino
        with open("/proc/self/maps") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] == str(inode) and os.path.realpath(fields[5]) == os.path.realpath(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def drop_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> int:
    """Let the kernel drop the resident pages of a tensor that is a view of a mapped file.

    A mapped checkpoint counts in RSS for every page read; after its tensor was read
    (sampled, or copied), its pages are not needed again. Only pages wholly inside one
    of `ranges` (file_ranges of that file) are dropped: on anonymous memory the same
    call would zero live data. Returns the bytes advised (0 where nothing applies)."""
    libc = glibc()
    if libc is None or tensor.is_meta or not tensor.numel():
        return 0
    import mmap

    if tensor.is_contiguous():  # its own bytes (a mapped checkpoint's storages may be one file-wide storage)
        start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    else:
        start, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
    end = start + size
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first or not any(lo <= first and last <= hi for lo, hi in ranges):
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return (last - first) if libc.madvise(ctypes.c_void_p(first), last - first, MADV_DONTNEED) == 0 else 0
