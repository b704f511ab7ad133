"""Decode + preprocess in DataLoader worker processes, so the encoder never waits on Pillow.

Workers return one record per file: pixels and header facts, or the
`ImageError` kind and message that made the file unusable. The collate
function splits a batch into the good tensors and the failures, so one
broken JPEG costs one error row, never a batch or the run.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.media.decode import Decoded, Failed, decode_file
from retrieval.media.images import DEFAULT_MAX_PIXELS


@dataclass
class Batch:
    """What the encoder loop receives: stacked pixels for `decoded`, and the failures."""

    decoded: list[Decoded] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    failed: list[Failed] = field(default_factory=list)

    def pin_memory(self) -> Batch:  # DataLoader calls this when pin_memory=True
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self

    def __len__(self) -> int:
        return len(self.decoded) + len(self.failed)


class ImageFiles(Dataset):
    """Item i is file `paths[i]` (or an fsspec URL), decoded upright and preprocessed, or a `Failed`."""

    def __init__(self, paths: Sequence[str], preprocess: Callable, image_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, first_key: int = 0) -> None:
        self.paths = list(paths)
        self.first_key = first_key  # keys are positions in the caller's full list (a remade loader starts late)
        self.preprocess = preprocess
        self.draft = (image_size, image_size)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded | Failed:
        return decode_file(self.paths[index], self.first_key + index, self.preprocess, self.draft,
                           self.max_pixels)


def collate(items: list[Decoded | Failed]) -> Batch:
    good = [item for item in items if isinstance(item, Decoded)]
    batch = Batch(decoded=good, failed=[item for item in items if isinstance(item, Failed)])
    if good:
        batch.pixels = torch.stack([item.pixels for item in good])
        for item in good:  # the stacked copy is what travels; drop the per-item tensors
            item.pixels = None  # type: ignore[assignment]
    return batch


def _worker_init(close: tuple[str | int, ...], _worker_id: int) -> None:
    # Decoding is single-threaded Pillow work; torch threads in workers would only
    # fight the encoder in the main process for the same cores.
    torch.set_num_threads(1)
    _close_inherited(close)


def _close_inherited(paths: tuple[str | int, ...]) -> None:
    """Close the forked copies of these files' descriptors (the library's write lock); an int
    is a descriptor itself (the socket of a PostgreSQL connection holding an advisory lock).

    A flock belongs to the open file, which fork shares: a worker orphaned by a
    kill -9 of the main process would hold the lock until it notices (seconds),
    and the user's immediate re-run would be refused as "busy". A socket likewise: the
    server drops a session's locks only when every copy of its socket is closed.
    """
    for fd in (p for p in paths if isinstance(p, int)):
        try:
            os.close(fd)
        except OSError:
            pass
    paths = tuple(p for p in paths if not isinstance(p, int))
    if not paths:
        return
    targets = {os.path.realpath(p) for p in paths}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:  # pragma: no cover - no procfs
        return
    for name in fds:
        try:
            if os.readlink(f"/proc/self/fd/{name}") in targets:
                os.close(int(name))
        except OSError:
            continue


def _quiet_hangups_of_the_fd_sharer() -> None:
    """Keep Ctrl-C's one line one line: no traceback from multiprocessing's fd sharer.

    Batches from workers travel as shared-memory tensors whose file descriptors a background
    thread of this process (multiprocessing.resource_sharer) hands over. When a run is
    interrupted the workers are shut down mid-handover, and that thread reports its EOFError or
    ConnectionResetError through sys.excepthook, a traceback on stderr after our "interrupted"
    line (seen in tests/test_exit_codes.py and test_index_faults.py). Only hang-ups raised
    inside resource_sharer are silenced; anything else still reaches the previous hooks.
    """
    if getattr(sys.excepthook, "clipfind_quiet_fd_sharer", False):
        return
    previous_sys, previous_thread = sys.excepthook, threading.excepthook

    def is_sharer_hangup(exc_type, tb) -> bool:
        if not issubclass(exc_type, (EOFError, ConnectionError)):
            return False
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith("resource_sharer.py"):
                return True
            tb = tb.tb_next
        return False

    def sys_hook(exc_type, value, tb) -> None:
        if not is_sharer_hangup(exc_type, tb):
            previous_sys(exc_type, value, tb)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if not is_sharer_hangup(args.exc_type, args.exc_traceback):
            previous_thread(args)

    sys_hook.clipfind_quiet_fd_sharer = True
    sys.excepthook, threading.excepthook = sys_hook, thread_hook


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type in ("cuda", "mps") else 32


def make_loader(paths: Sequence[str], preprocess: Callable, image_size: int, *, batch_size: int,
                workers: int, pin_memory: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                close_in_workers: Sequence[str | int] = (), start: int = 0) -> DataLoader:
    """Batches of `Batch`, in the order of `paths[start:]` (items keyed by their position in
    `paths`); workers=0 decodes in this process.

    `close_in_workers`: files (lock files) whose inherited descriptors workers must close, or
    descriptors (ints) to close.
    """
    dataset = ImageFiles(list(paths)[start:], preprocess, image_size, max_pixels, first_key=start)
    if workers > 0:
        _quiet_hangups_of_the_fd_sharer()
    init = functools.partial(_worker_init, tuple(p if isinstance(p, int) else str(p)
                                                 for p in close_in_workers))
    extra = {"prefetch_factor": 4, "worker_init_fn": init} if workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, **extra)
