"""Training-free few-shot classification: Tip-Adapter (Zhang et al., 2022).

A few labelled example images per class (`--shots DIR`, one folder per label)
become a cache model: keys are their unit embeddings, values their one-hot
labels. For an image vector f the adapter adds to CLIP's zero-shot logits

    alpha · exp(-beta · (1 - f · keysᵀ)) · values

so an image close to an example of class c gains evidence for c. Nothing is
trained; `alpha` weighs the cache against zero-shot, `beta` sets how sharply
closeness decays. `search_alpha_beta` picks both on held-out examples:
leave-one-out over the cache (each example is classified by the others),
which uses every shot both as a key and as a test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval.errors import InputError
from retrieval.media.images import is_candidate, open_image

DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 5.5  # the paper's ImageNet setting
ALPHA_GRID = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
BETA_GRID = (0.5, 1.0, 2.0, 3.5, 5.5, 8.0, 12.0, 20.0)


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def find_shots(shots_dir: str | Path, labels: list) -> tuple[list[str], list[int], list[str]]:
    """(paths, label indices, notes) of every example under `shots_dir/<label>/`.

    A folder matches a label by name or synonym, case-insensitive, `_` read as
    a space. A folder that matches no label, or holds no images, is an error.
    """
    root = Path(shots_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"shots folder {root} does not exist (one sub-folder of example images per label)")
    lookup: dict[str, int] = {}
    for i, label in enumerate(labels):
        for name in label.names:
            lookup.setdefault(_norm(name), i)
    paths: list[str] = []
    targets: list[int] = []
    covered: set[int] = set()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"shots folder {root} has no class folders (one sub-folder of example images per label)")
    for folder in folders:
        index = lookup.get(_norm(folder.name))
        if index is None:
            raise InputError(f"shots folder {folder} matches no label in the label set")
        if index in covered:
            raise InputError(f"two shots folders map to label {labels[index].name!r} ({folder.name} is the second)")
        files = sorted(str(p) for p in folder.iterdir() if p.is_file() and is_candidate(os.fspath(p)))
        if not files:
            raise InputError(f"shots folder {folder} has no images; add a few examples or remove it")
        covered.add(index)
        paths.extend(files)
        targets.extend([index] * len(files))
    notes = []
    missing = [labels[i].name for i in range(len(labels)) if i not in covered]
    if missing:
        notes.append(f"{len(missing)} labels have no examples in {root} and rely on zero-shot alone: "
                     + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return paths, targets, notes


@dataclass
class ShotCache:
    """The Tip-Adapter cache model: unit keys (N, dim) and their label indices."""

    keys: np.ndarray
    targets: np.ndarray
    n_labels: int
    paths: list[str]
    notes: list[str]

    @property
    def values(self) -> np.ndarray:
        onehot = np.zeros((len(self.targets), self.n_labels), np.float32)
        onehot[np.arange(len(self.targets)), self.targets] = 1.0
        return onehot


def build_cache(encoder, shots_dir: str | Path, labels: list, batch_size: int = 64) -> ShotCache:
    """Encode every example image once; an unreadable example is an error naming the file."""
    paths, targets, notes = find_shots(shots_dir, labels)
    size = getattr(encoder, "image_size", 224)
    keys = []
    for start in range(0, len(paths), batch_size):
        images = [open_image(p, draft_size=(size, size)) for p in paths[start:start + batch_size]]
        keys.append(encoder.encode_images(images, batch_size=batch_size))
    return ShotCache(np.concatenate(keys), np.asarray(targets, np.int64), len(labels), paths, notes)


class TipAdapter:
    """The cache term of Tip-Adapter's logits, in torch for the tagging hot path."""

    def __init__(self, cache: ShotCache, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA) -> None:
        self.cache, self.alpha, self.beta = cache, float(alpha), float(beta)
        self._keys_t = torch.from_numpy(np.ascontiguousarray(cache.keys, np.float32)).T.contiguous()
        self._values = torch.from_numpy(cache.values)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        affinity = torch.exp(-self.beta * (1.0 - x @ self._keys_t))
        return self.alpha * (affinity @ self._values)

    def describe(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "shots": len(self.cache.targets)}


def tip_logits(x: np.ndarray, class_matrix: np.ndarray, logit_scale: float, keys: np.ndarray,
               targets: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Tip-Adapter logits in plain numpy (the reference the torch path is tested against)."""
    values = np.eye(class_matrix.shape[0], dtype=np.float64)[targets]
    zs = logit_scale * (x @ class_matrix.T)
    return zs + alpha * np.exp(-beta * (1.0 - x @ keys.T)) @ values


def search_alpha_beta(cache: ShotCache, class_matrix: np.ndarray, logit_scale: float,
                      alphas=ALPHA_GRID, betas=BETA_GRID) -> dict:
    """Grid-search alpha and beta by leave-one-out accuracy over the cache.

    Each example is classified with every *other* example as the cache, so the
    score measures how the adapter does on images it has not seen. Ties go to
    the smaller alpha (closest to zero-shot).
    """
    if len(cache.targets) < 2:
        raise InputError("searching alpha/beta needs at least two example images")
    x = cache.keys.astype(np.float64)
    zs = logit_scale * (x @ class_matrix.T.astype(np.float64))
    cos = x @ x.T
    values = cache.values.astype(np.float64)
    best = None
    grid = []
    for beta in betas:
        affinity = np.exp(-beta * (1.0 - cos))
        np.fill_diagonal(affinity, 0.0)  # leave the example itself out
        cache_term = affinity @ values
        for alpha in alphas:
            acc = float(np.mean(np.argmax(zs + alpha * cache_term, axis=1) == cache.targets))
            grid.append({"alpha": alpha, "beta": beta, "accuracy": acc})
            if best is None or acc > best["accuracy"] or (acc == best["accuracy"] and alpha < best["alpha"]):
                best = {"alpha": alpha, "beta": beta, "accuracy": acc}
    zero_shot = float(np.mean(np.argmax(zs, axis=1) == cache.targets))
    return {**best, "zero_shot_accuracy": zero_shot, "grid": grid}
