"""bench/learned.py's honesty rules: validation photos come from the train split and are never shots."""

from __future__ import annotations

import numpy as np

from bench.learned import first_shots, validation_rows


def test_validation_rows_are_balanced_and_never_shots():
    targets = np.repeat(np.arange(10), 600)
    shots = np.random.default_rng(0).choice(len(targets), 480, replace=False)
    rows = validation_rows(targets, shots, per_class=50)
    assert len(rows) == 500 and not set(rows) & set(shots)
    assert np.all(np.bincount(targets[rows]) == 50)
    assert np.array_equal(rows, validation_rows(targets, shots, per_class=50))  # seeded


def test_n_shot_sets_are_nested():
    features = np.arange(32, dtype=float)[:, None]
    targets = np.repeat(np.arange(2), 16)
    two, _ = first_shots(features, targets, 2)
    four, _ = first_shots(features, targets, 4)
    assert set(two.ravel()) <= set(four.ravel()) and len(four) == 8
