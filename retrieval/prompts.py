"""Prompt templates and ensembles: how words become query and class vectors.

The CLIP paper's recipe: wrap a label in templates ("a photo of a {}."), encode
each, L2-normalise, average, re-normalise. open_clip ships the paper's 80
ImageNet templates and a 7-template subset; we use those lists as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval.errors import InputError

SINGLE_TEMPLATE = ("a photo of a {}.",)

# A small set for free-text *search* queries: photo-ish phrasings that still read
# well around arbitrary phrases ("a dog on a beach"), unlike class-name templates.
PHOTO_TEMPLATES = (
    "a photo of {}.",
    "a photo of a {}.",
    "a picture of {}.",
    "an image of {}.",
    "{}",
)


def _openai_templates(name: str) -> tuple[str, ...]:
    """open_clip's template lists are callables (`lambda c: f"a photo of a {c}."`); turn them into `{}` strings."""
    from open_clip import zero_shot_metadata as meta

    return tuple(t("{}") for t in getattr(meta, name))


def template_set(name_or_file: str) -> tuple[str, ...]:
    """A named template set, or a file with one template containing `{}` per line.

    Names: `single` (a photo of a {}.), `photo` (the search default), `simple7`
    (the CLIP paper's 7-template subset), `imagenet80` (all 80 templates).
    """
    named = {
        "single": lambda: SINGLE_TEMPLATE,
        "photo": lambda: PHOTO_TEMPLATES,
        "simple7": lambda: _openai_templates("SIMPLE_IMAGENET_TEMPLATES"),
        "imagenet80": lambda: _openai_templates("OPENAI_IMAGENET_TEMPLATES"),
    }
    if name_or_file in named:
        return named[name_or_file]()
    path = Path(name_or_file)
    if not path.is_file():
        raise InputError(f"no template set or file named {name_or_file!r} (sets: {', '.join(named)})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read template file {path}: {exc}") from exc
    templates = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not templates:
        raise InputError(f"template file {path} has no templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise InputError(f"template file {path}: every template needs a {{}} placeholder (not: {bad[0]!r})")
    return templates


def normalise(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def ensemble(embeddings: np.ndarray) -> np.ndarray:
    """Mean of unit vectors, re-normalised: the CLIP paper's prompt ensemble."""
    return normalise(normalise(embeddings).mean(axis=0))


def encode_prompted(encoder, phrases: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """One unit vector per phrase: the ensemble of the phrase in every template.

    All phrase×template texts go through the text tower in one batched call.
    """
    if not phrases:
        return np.zeros((0, encoder.embed_dim), np.float32)
    texts = [t.format(p) for p in phrases for t in templates]
    flat = encoder.encode_texts(texts).reshape(len(phrases), len(templates), -1)
    return np.stack([ensemble(group) for group in flat])
