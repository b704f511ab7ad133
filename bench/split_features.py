"""Image vectors of a whole CIFAR-10 split, encoded from the decoded-pixel cache and cached by fingerprint.

Why: the learned-method ceiling (a probe on all 50,000 train photos) and the
hyperparameter search (a validation set carved from the train split) need the
train split's vectors; decoding 50,000 PNGs through the product's loader takes
most of an hour on the shared 2-core machine, while the test models' trainers
already keep the split decoded as a uint8 array (`tests.models.cifar.load_split`).
CIFAR photos are 32 x 32, the models' input size, so preprocessing is only
scaling and normalising (`tests.models.cifar.to_tensor`, open_clip's transform
at 32 px) and the vectors equal the product's (`check_against_paths` measures it).

Cache: $CLIPFIND_CACHE/bench/features/<fingerprint>-<split>-<manifest>.npy, written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

BATCH = 500


def split_features(encoder, data_root: Path, split: str, log=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(unit vectors N x dim float32, labels, class names) of `data_root/split`, cached."""
    from retrieval import config
    from tests.models import cifar

    split_dir = Path(data_root) / split
    cache = (config.cache_root() / "bench" / "features"
             / f"{encoder.fingerprint[:12]}-{split}-{cifar.manifest_hash(split_dir)}.npy")
    images, labels, classes = cifar.load_split(split_dir, log=log)
    if cache.is_file():
        features = np.load(cache)
        if features.shape[0] == len(labels):
            return features, labels, classes
    if log:
        log(f"encoding {len(labels)} {split} photos from the pixel cache ...")
    features = np.concatenate([encoder.encode_pixels(cifar.to_tensor(images[i:i + BATCH]))
                               for i in range(0, len(images), BATCH)]).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=cache.name + ".", suffix=".tmp", dir=cache.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, features)
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return features, labels, classes


def check_against_paths(encoder, data_root: Path, split: str, features: np.ndarray, n: int = 200) -> float:
    """Largest |difference| between these vectors and the product's path loader's, on the split's first n files."""
    from retrieval.tagging import evaluate
    from tests.models import cifar

    _, files = cifar.split_files(Path(data_root) / split)
    paths = [str(Path(data_root) / split / rel) for rel, _ in files[:n]]
    product, _ = evaluate.encode_paths(encoder, paths, batch_size=100)
    return float(np.abs(product - features[:n]).max())
