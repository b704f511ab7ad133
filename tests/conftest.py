"""Shared fixtures: the tiny open_clip model the suite trains for itself.

Why: no pretrained weights can be downloaded here (docs/offline.md), so tests
that need a real, aligned CLIP model use one trained on drawn shapes.  It is
cached under $CLIPFIND_CACHE (else ~/.cache/clipfind) and keyed by the source
of its generator and trainer, so only the first run (or one after editing
them) pays the ~30-60 s of training; concurrent pytest processes share it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.devmodels.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the tiny shapes model, in open_clip's local-dir layout."""
    return ensure_tiny_model()
