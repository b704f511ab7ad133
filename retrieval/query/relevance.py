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
3. Around each result (between the results a few ranks above and below it,
   s_hi and s_lo) the null predicts N * (P0(>= s_lo) - P0(>= s_hi)) images
   of a library of N; the list (and, past its end, the background sample)
   shows how many are really there. Their ratio is the local share of
   noise at that score (Efron's local false-discovery rate), and

       relevance = 1 - min(1, expected under the null / observed)

   A second estimate covers relevant sets too big to stand out of the
   background (a weak model, or a class that is a tenth of the library):
   a two-Gaussian mixture fitted by EM to the background scores (kept only
   when it beats one Gaussian by BIC), whose posterior P(relevant | s) is
   taken where it is the larger of the two. The result is then
   made non-increasing down the list by isotonic regression (the ranking is
   by score, so a lower score cannot be more relevant). A result far above
   the background is ~1; one inside it is ~0; 0.5 means about even odds.
4. `--until-irrelevant` cuts the list before the first result whose relevance
   falls below CUT; `--min-relevance R` keeps only results at or above R.
   CUT was chosen on the CIFAR-10 *train* split (bench/learned.py's cut-off
   rows, the 10 class-name queries of the CIFAR test model): over the grid
   0.3, 0.4, ..., 0.9, 0.95, 0.99 the smallest value with the best mean F1,
   0.8 (F1 0.483; 0.460 at 0.5). In theory 0.5 (even odds) is the place to
   stop, but where a weak model's classes overlap the estimate runs high, and
   0.5 kept about twice the relevant set.

Limits: the null is a Gaussian fitted to the bulk; a query that matches most
of the library (the relevant set is no longer a minority) or a library of a
few dozen images gives a poor null. Relevance is read off the ranked list,
so it is an estimate for the ranking, not a probability that one image shows
the thing; filters (path, dates, tags) thin the list out, which only makes it
more cautious.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BACKGROUND_SIZE = 4096
BACKGROUND_SEED = 20_261_201
CUT = 0.8  # chosen on the CIFAR-10 train split; see point 4 above
WINDOW = 1  # results either side of a result when counting how crowded its score is ...
WINDOW_SHARE = 32  # ... or rank // WINDOW_SHARE deeper down (narrow, then PAV smooths: measured best)
MAD_TO_SIGMA = 1.4826
MIXTURE_STEPS = 50
MIXTURE_BINS = 256
MIXTURE_TOLERANCE = 1e-4  # of the bulk's spread
MIXTURE_SEPARATION = 1.0


@dataclass
class Background:
    """The sampled vectors and the library size they stand for."""

    vectors: np.ndarray  # (n, dim) unit vectors
    library_size: int

    @classmethod
    def sample(cls, library, dim: int, library_size: int) -> Background:
        """`library`: what `retrieval.store.reads.reading` takes (a library, or an Engine)."""
        from retrieval.store.sampling import sample_vectors

        return cls(sample_vectors(library, dim, BACKGROUND_SIZE, BACKGROUND_SEED)[1], library_size)


@dataclass
class Calibration:
    """One query's null (mu, sigma), its background scores (sorted ascending), and a two-part mixture."""

    mu: float
    sigma: float
    scores: np.ndarray
    library_size: int
    mixture: tuple[float, float, float, float, float] | None = None  # (mu0, s0, mu1, s1, share of part 1)

    def posterior(self, scores: np.ndarray) -> np.ndarray:
        """P(relevant | score) under the two-Gaussian mixture fitted to the background (0 without one)."""
        if self.mixture is None:
            return np.zeros(len(scores))
        mu0, s0, mu1, s1, p1 = self.mixture
        low = (1 - p1) * np.exp(-0.5 * ((scores - mu0) / s0) ** 2) / s0
        high = p1 * np.exp(-0.5 * ((scores - mu1) / s1) ** 2) / s1
        return np.where(scores >= mu1, 1.0, high / np.maximum(low + high, 1e-300)) if p1 > 0 else 0 * scores

    def expected_above(self, scores: np.ndarray) -> np.ndarray:
        """C0(s): how many library images at or above each score the null alone would put there."""
        return self.library_size * ndtr(-(np.asarray(scores, np.float64) - self.mu) / self.sigma)

    def observed_above(self, scores: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        """C(s): images at or above each score, from the ranked list and from the background sample."""
        scores = np.asarray(scores, np.float64)
        in_list = len(ranked) - np.searchsorted(ranked[::-1], scores, side="left")
        in_sample = len(self.scores) - np.searchsorted(self.scores, scores, side="left")
        return np.maximum(in_list, self.library_size * in_sample / max(1, len(self.scores)))

    def relevance(self, scores: np.ndarray) -> np.ndarray:
        """Relevance of each result in a list ranked by score, best first (see the module docstring)."""
        scores = np.asarray(scores, np.float64)
        k = len(scores)
        if k == 0:
            return np.zeros(0)
        ranks = np.arange(k)
        width = np.maximum(WINDOW, ranks // WINDOW_SHARE)
        upper = scores[np.maximum(ranks - width, 0)]
        lower = np.where(ranks + width < k, scores[np.minimum(ranks + width, k - 1)],
                         2 * scores - upper)  # past the list's end: the same score width below
        upper = np.maximum(upper, scores + 1e-9)  # rank 1 has no one above: the window starts at itself
        null = self.expected_above(lower) - self.expected_above(upper)
        seen = self.observed_above(lower, scores) - self.observed_above(upper, scores)
        relevance = 1.0 - np.clip(null / np.maximum(seen, 1.0), 0.0, 1.0)
        relevance = np.maximum(relevance, self.posterior(scores))
        # The ranking is by score, so relevance may only fall down the list (least squares fit).
        return np.clip(non_increasing_fit(relevance), 0.0, 1.0)


_ERFC = np.frompyfunc(math.erfc, 1, 1)


def ndtr(x: np.ndarray) -> np.ndarray:
    """The standard normal CDF (scipy.special.ndtr's values, without importing scipy: its
    import is ~40 MB of a fresh text query's peak RSS)."""
    return 0.5 * _ERFC(-np.asarray(x, np.float64) / math.sqrt(2.0)).astype(np.float64)


def non_increasing_fit(values: np.ndarray) -> np.ndarray:
    """The least-squares non-increasing fit to `values` (pool adjacent violators; what
    scipy.optimize.isotonic_regression(values, increasing=False) gives)."""
    means: list[float] = []
    sizes: list[int] = []
    for value in np.asarray(values, np.float64).tolist():
        means.append(value)
        sizes.append(1)
        while len(means) > 1 and means[-2] < means[-1]:  # a rise: pool the two blocks
            size = sizes[-2] + sizes[-1]
            means[-2] = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / size
            sizes[-2] = size
            means.pop()
            sizes.pop()
    return np.repeat(np.asarray(means, np.float64), sizes)


def calibrate(query: np.ndarray, background: Background) -> Calibration:
    """Fit the query's null on the background's scores."""
    # einsum, not BLAS: one (4096 x dim) product is too small for threads, and OpenBLAS's
    # spin on a busy 2-core machine made it 25-40 ms instead of ~1 ms (measured here).
    scores = np.sort(np.einsum("ij,j->i", background.vectors, np.asarray(query, np.float32))).astype(np.float64)
    if len(scores) == 0:
        return Calibration(0.0, 1.0, scores, background.library_size)
    mu = float(np.median(scores))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(scores - mu)))
    if not math.isfinite(sigma) or sigma < 1e-6:
        sigma = max(float(scores.std()), 1e-3)
    return Calibration(mu, sigma, scores, max(background.library_size, len(scores)), fit_mixture(scores, mu, sigma))


def fit_mixture(scores: np.ndarray, mu: float, sigma: float,
                iterations: int = MIXTURE_STEPS) -> tuple[float, float, float, float, float] | None:
    """EM for two Gaussians on the background scores: the bulk, and a relevant upper part.

    Started from the robust null and the top 10%; kept only if the upper part ends up
    above the bulk by at least MIXTURE_SEPARATION of the bulk's spread, is a minority,
    and two parts fit better than one by BIC. The EM runs on a MIXTURE_BINS-bin histogram
    of the scores (bin counts as weights), not on every score: the bins are far narrower
    than either part, and it made the fit ~10x cheaper (it was most of a warm query).
    """
    counts, edges = np.histogram(scores, bins=MIXTURE_BINS)
    keep = counts > 0
    w = counts[keep].astype(np.float64)
    x = ((edges[:-1] + edges[1:]) / 2)[keep]
    n = float(w.sum())
    powers = np.stack([np.ones_like(x), x, x * x], axis=1)  # (bins, 3): one product gives every weighted sum

    def parts(mu0, s0, mu1, s1, p1):
        return ((1 - p1) * np.exp(-0.5 * ((x - mu0) / s0) ** 2) / s0, p1 * np.exp(-0.5 * ((x - mu1) / s1) ** 2) / s1)

    top = scores[scores >= np.quantile(scores, 0.9)]
    mu0, s0, mu1, s1, p1 = mu, sigma, float(top.mean()), max(float(top.std()), 1e-3), 0.1
    centres = np.empty((2, 1))
    widths = np.empty((2, 1))
    for _ in range(iterations):
        before = (mu0, s0, mu1, s1, p1)
        centres[:, 0], widths[:, 0] = (mu0, mu1), (s0, s1)
        dens = np.exp(-0.5 * ((x - centres) / widths) ** 2) / widths  # (2, bins): bulk, upper part
        dens[0] *= 1 - p1
        dens[1] *= p1
        r = w * dens[1] / np.maximum(dens[0] + dens[1], 1e-300)  # weighted responsibilities of the upper part
        (n0, sx0, sxx0), (n1, sx1, sxx1) = np.stack([w - r, r]) @ powers
        p1 = float(n1 / n)
        if not 1e-4 < p1 < 0.5:
            return None
        mu0, mu1 = float(sx0 / n0), float(sx1 / n1)
        s0 = math.sqrt(max(float(sxx0 / n0) - mu0 * mu0, 0.0)) + 1e-6
        s1 = math.sqrt(max(float(sxx1 / n1) - mu1 * mu1, 0.0)) + 1e-6
        if max(abs(a - b) for a, b in zip(before, (mu0, s0, mu1, s1, p1))) < MIXTURE_TOLERANCE * s0:
            break  # converged: most queries stop well before MIXTURE_STEPS
    if mu1 - mu0 < MIXTURE_SEPARATION * s0:
        return None
    # Two parts must explain the scores better than one by more than their three extra
    # parameters cost (BIC): a query matching nothing has one bell of scores, not two.
    low, high = parts(mu0, s0, mu1, s1, p1)
    mean = float((w * x).sum() / n)
    one = float(np.sqrt((w * (x - mean) ** 2).sum() / n)) + 1e-9
    gain = (w * np.log(np.maximum(low + high, 1e-300))).sum() - (
        -0.5 * (w * ((x - mean) / one) ** 2).sum() - n * np.log(one))
    if 2 * gain < 3 * np.log(n):
        return None
    return mu0, s0, mu1, s1, p1


def cut_until_irrelevant(relevances: np.ndarray, cut: float = CUT) -> int:
    """How many leading results to keep: up to (not including) the first below `cut`."""
    below = np.flatnonzero(np.asarray(relevances) < cut)
    return int(below[0]) if len(below) else len(relevances)
