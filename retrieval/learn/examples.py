"""Example images for learning: files and folders -> unit vectors, stored ones reused.

A file already in the library costs nothing (its stored vector is read); one
that is not is encoded on the fly, and the caller gets one notice saying how
many. Negatives, when none are given, are a seeded random sample of the
library's own vectors, skipping the positives themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.errors import InputError
from retrieval.store.sampling import sample_vectors

NEGATIVE_SAMPLE = 2048  # library vectors drawn as negatives when none are given


@dataclass
class Examples:
    """Unit vectors of example images, the library rows they are (or None), and what to tell the user."""

    vectors: np.ndarray
    ids: list[int | None]
    paths: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def expand(items: list[str], role: str) -> list[str]:
    """Files as given, folders as the image files inside them (recursively, sorted)."""
    from retrieval.media.images import is_candidate

    out: list[str] = []
    for item in items:
        path = Path(os.path.expanduser(item))
        if path.is_dir():
            found = sorted(str(p.resolve()) for p in path.rglob("*") if p.is_file() and is_candidate(str(p)))
            if not found:
                raise InputError(f"{role} folder {path} holds no images")
            out.extend(found)
        elif path.exists():
            out.append(str(path.resolve()))
        else:
            raise InputError(f"{role} example {path} does not exist")
    return list(dict.fromkeys(out))  # the same file twice counts once


def example_vectors(searcher, items: list[str], role: str) -> Examples:
    """Vectors of every example under `items`; a file that is not a readable image is an error."""
    paths = expand(items, role)
    vectors, ids = [], []
    for path in paths:
        warnings: list[str] = []
        vector, own_id = searcher.image_vector(path, warnings)
        vectors.append(vector)
        ids.append(own_id)
    dim = int(searcher.record["embed_dim"])
    matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    notes = []
    outside = sum(1 for i in ids if i is None)
    if outside:
        notes.append(f"{outside} of {len(paths)} {role} examples are not in the library; encoded them on the fly")
    return Examples(matrix, ids, paths, notes)


def sample_negatives(library, exclude: set[int], n: int = NEGATIVE_SAMPLE, seed: int = 0) -> np.ndarray:
    """Up to `n` stored vectors drawn at random (seeded), none of them in `exclude`."""
    return sample_vectors(library.engine, library.dim, n, seed, exclude)[1]
