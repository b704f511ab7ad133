"""Tip-Adapter-F: fine-tuned keys fit the shots better than the training-free cache, leave-one-out."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import InputError
from retrieval.tagging.tipf import fine_tune_keys


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def loo_accuracy(queries, keys, targets, class_matrix, scale, alpha, beta):
    affinity = np.exp(-beta * (1 - queries @ keys.T))
    np.fill_diagonal(affinity, 0)
    logits = scale * queries @ class_matrix.T + alpha * affinity @ np.eye(class_matrix.shape[0])[targets]
    return float((logits.argmax(1) == targets).mean())


def test_fine_tuning_improves_leave_one_out_accuracy_on_the_shots():
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((5, 32)))
    targets = np.repeat(np.arange(5), 8)
    shots = unit(centres[targets] + 0.35 * rng.standard_normal((40, 32))).astype(np.float32)
    class_matrix = unit(centres + 0.8 * rng.standard_normal((5, 32)))  # a poor zero-shot classifier
    before = loo_accuracy(shots, shots, targets, class_matrix, 10.0, 1.0, 5.5)
    tuned = fine_tune_keys(shots, targets, class_matrix, 10.0, 1.0, 5.5, epochs=50, lr=1e-2)
    after = loo_accuracy(shots, tuned.keys, targets, class_matrix, 10.0, 1.0, 5.5)
    assert not np.allclose(tuned.keys, shots)
    assert after > before, (before, after)


def test_zero_epochs_keep_the_cache_as_it_was():
    rng = np.random.default_rng(1)
    shots = unit(rng.standard_normal((6, 8))).astype(np.float32)
    tuned = fine_tune_keys(shots, np.array([0, 0, 1, 1, 2, 2]), unit(rng.standard_normal((3, 8))), 10.0, 1.0, 5.5,
                           epochs=0)
    assert np.array_equal(tuned.keys, shots)


def test_one_example_is_not_enough():
    with pytest.raises(InputError):
        fine_tune_keys(np.ones((1, 4), np.float32), np.array([0]), np.eye(2, 4), 10.0, 1.0, 5.5)
