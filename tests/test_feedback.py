"""Rocchio relevance feedback: the arithmetic, and the errors a user can cause."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import InputError
from retrieval.query.feedback import ALPHA, BETA, GAMMA, feedback_vector, rocchio


def test_rocchio_is_the_smart_formula():
    rng = np.random.default_rng(0)
    q = rng.standard_normal(16)
    q /= np.linalg.norm(q)
    more, less = rng.standard_normal((3, 16)), rng.standard_normal((2, 16))
    expected = ALPHA * q + BETA * more.mean(0) - GAMMA * less.mean(0)
    assert np.allclose(rocchio(q, more, less), expected / np.linalg.norm(expected), atol=1e-6)


def test_more_like_alone_is_the_mean_of_the_examples():
    more = np.eye(4, dtype=np.float32)[:2]
    got = rocchio(None, more, np.zeros((0, 4)))
    assert np.allclose(got, [0.5 ** 0.5, 0.5 ** 0.5, 0, 0], atol=1e-6)


def test_feedback_that_cancels_the_query_is_an_input_error():
    with pytest.raises(InputError, match="cancels"):
        feedback_vector(None, [], ["a.jpg"], lambda path: np.zeros(4, np.float32))
