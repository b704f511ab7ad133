"""A folder holding exactly N of a cached set of photos, as symlinks, for the benchmarks.

Why: a benchmark indexes "N photos"; the scan must see exactly N files, while
the photos themselves are drawn once and shared by every N.
"""

from __future__ import annotations

import os
from pathlib import Path


def symlinked_subset(folder: Path, count: int) -> Path:
    """`<folder>-set-<count>` beside `folder`: symlinks to its photo_00000.jpg ... in order."""
    out = folder.parent / f"{folder.name}-set-{count}"
    if not out.is_dir() or len(os.listdir(out)) != count:
        out.mkdir(exist_ok=True)
        for name in os.listdir(out):
            os.remove(out / name)
        for i in range(count):
            os.symlink(folder / f"photo_{i:05d}.jpg", out / f"photo_{i:05d}.jpg")
    return out
