"""Torch's intra-op thread count, set for a block of work and restored after it.

Small training loops (CoOp over a few prompts, Tip-Adapter-F over a few keys)
run faster on one thread on a busy machine: measured on the shared 2-core dev
machine, 20 CoOp steps took 0.86 s on one thread and 20 s on two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block on `n` torch threads (None: leave the setting alone)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
