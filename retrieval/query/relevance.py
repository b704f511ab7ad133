"""Calibrated relevance: a score in [0, 1] that means the same for every query.

Raw cosines cannot be compared across queries: one text sits closer to every
image than another, image queries score higher than text queries, and models
differ. So each query is calibrated against the library's own images:

1. A fixed, seeded random sample of stored vectors (the *background*, up to
   BACKGROUND_SIZE) is scored with the query vector: one small matrix product.
2. Most of a library is not about any one query, so the bulk of those scores
   is what "irrelevant" looks like *for this query*. Its centre and spread are
   estimated robustly (median and 1.4826 x MAD), so the relevant minority in the
   upper tail barely moves them: a Gaussian null N(mu, sigma).
3. For a result with score s at rank r, the null predicts N * P0(score >= s)
   irrelevant images at or above s in a library of N; at least
   max(r, N * F(s)) images are there (F: the background's own fraction >= s).
   Their ratio is the estimated share of false hits at that depth (the
   Benjamini-Hochberg false-discovery estimate), and

       relevance(s) = 1 - min(1, N * P0(>= s) / max(r, N * F(s)))

   A result far above the background is ~1; one inside it is ~0.
4. `--until-irrelevant` cuts the list before the first result whose relevance
   falls below CUT (0.5: from there on, about every second result would be
   noise); `--min-relevance R` keeps only results at or above R.

Limits: the null is a Gaussian fitted to the bulk; a query that matches most
of the library (the relevant set is no longer a minority) or a library of a
few dozen images gives a poor null. The relevance is a false-discovery
estimate for the ranking, not a probability that one image shows the thing;
filters (path, dates, tags) shorten ranks, which only makes it more cautious.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

BACKGROUND_SIZE = 4096
BACKGROUND_SEED = 20_261_201
CUT = 0.5
MAD_TO_SIGMA = 1.4826


@dataclass
class Background:
    """The sampled vectors and the library size they stand for."""

    vectors: np.ndarray  # (n, dim) unit vectors
    library_size: int

    @classmethod
    def sample(cls, engine, dim: int, library_size: int) -> Background:
        from retrieval.store.sampling import sample_vectors

        return cls(sample_vectors(engine, dim, BACKGROUND_SIZE, BACKGROUND_SEED)[1], library_size)


@dataclass
class Calibration:
    """One query's null (mu, sigma) and its background scores, sorted ascending."""

    mu: float
    sigma: float
    scores: np.ndarray
    library_size: int

    def relevance(self, scores: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Relevance of results with these scores at these 1-based ranks (see the module docstring)."""
        scores = np.asarray(scores, np.float64)
        n = self.library_size
        null_tail = ndtr(-(scores - self.mu) / self.sigma)  # P0(score >= s)
        seen = len(self.scores) - np.searchsorted(self.scores, scores, side="left")
        above = np.maximum(np.asarray(ranks, np.float64), n * seen / max(1, len(self.scores)))
        relevance = np.clip(1.0 - n * null_tail / above, 0.0, 1.0)
        # As BH's q-values: a result is at least as relevant as any result ranked below it.
        return np.maximum.accumulate(relevance[::-1])[::-1]


def calibrate(query: np.ndarray, background: Background) -> Calibration:
    """Fit the query's null on the background's scores."""
    scores = np.sort(background.vectors @ np.asarray(query, np.float32)).astype(np.float64)
    if len(scores) == 0:
        return Calibration(0.0, 1.0, scores, background.library_size)
    mu = float(np.median(scores))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(scores - mu)))
    if not math.isfinite(sigma) or sigma < 1e-6:
        sigma = max(float(scores.std()), 1e-3)
    return Calibration(mu, sigma, scores, max(background.library_size, len(scores)))


def cut_until_irrelevant(relevances: np.ndarray, cut: float = CUT) -> int:
    """How many leading results to keep: up to (not including) the first below `cut`."""
    below = np.flatnonzero(np.asarray(relevances) < cut)
    return int(below[0]) if len(below) else len(relevances)
