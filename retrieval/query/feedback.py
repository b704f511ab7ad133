"""Relevance feedback: Rocchio's rule on the query vector ("more like these, less like those").

    q' = normalise(ALPHA * q + BETA * mean(more) - GAMMA * mean(less))

the weights of the SMART system (Rocchio, 1971; Manning et al., IR book 9.1.1).
Negative feedback weighs less than positive: a picture the user rejects says
less about what they want than one they pick. Without a query (only
--more-like), q is left out and the examples alone define the direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from retrieval.errors import InputError

ALPHA, BETA, GAMMA = 1.0, 0.75, 0.15


def rocchio(query: np.ndarray | None, more: np.ndarray, less: np.ndarray) -> np.ndarray:
    """The moved unit query vector; `more`/`less` are (n, dim) unit vectors, either may be empty."""
    dim = (query if query is not None else more if len(more) else less).shape[-1]
    moved = np.zeros(dim, np.float64)
    if query is not None:
        moved += ALPHA * query
    if len(more):
        moved += BETA * np.mean(more, axis=0)
    if len(less):
        moved -= GAMMA * np.mean(less, axis=0)
    norm = float(np.linalg.norm(moved))
    if norm < 1e-6:
        raise InputError("the feedback cancels the query out; give fewer --less-like images")
    return (moved / norm).astype(np.float32)


def feedback_vector(combined: np.ndarray | None, more_like: Sequence[str], less_like: Sequence[str],
                    image_vector: Callable[[str], np.ndarray]) -> np.ndarray:
    """Rocchio on a (not yet normalised) query vector, the example files read by `image_vector`."""
    if combined is not None:
        norm = float(np.linalg.norm(combined))
        if norm < 1e-6:
            raise InputError("the query terms cancel out; change the weights or the negative terms")
        combined = combined / norm
    more = [image_vector(p) for p in more_like]
    less = [image_vector(p) for p in less_like]
    dim = len((more or less)[0]) if (more or less) else len(combined)
    return rocchio(combined, np.reshape(more, (-1, dim)), np.reshape(less, (-1, dim)))
