"""Calibrated relevance on planted data: relevant results stand out of the background, noise does not."""

from __future__ import annotations

import numpy as np

from retrieval.query.relevance import Background, calibrate, cut_until_irrelevant, fit_mixture


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(n: int, relevant: int, dim: int = 64, seed: int = 0, offset: float = 1.0):
    """A library of random vectors with `relevant` of them pulled toward a query direction."""
    rng = np.random.default_rng(seed)
    query = unit(rng.standard_normal(dim))
    vectors = rng.standard_normal((n, dim))
    vectors[:relevant] += offset * np.sqrt(dim) * query * rng.uniform(0.6, 1.0, (relevant, 1))
    return query.astype(np.float32), unit(vectors).astype(np.float32), np.arange(n) < relevant


def ranked(query, vectors, truth):
    scores = vectors @ query
    order = np.argsort(-scores)
    return scores[order], truth[order]


def test_planted_results_are_relevant_and_the_cut_lands_near_where_they_end():
    for relevant in (30, 100, 800):
        query, vectors, truth = planted(8000, relevant, seed=relevant)
        background = Background(vectors[np.random.default_rng(9).choice(8000, 2048, replace=False)], 8000)
        scores, hits = ranked(query, vectors, truth)
        relevance = calibrate(query, background).relevance(scores[:2000])
        n = cut_until_irrelevant(relevance)
        f1 = 2 * hits[:n].sum() / (n + relevant)
        best = max(2 * hits[:m].sum() / (m + relevant) for m in range(1, 2000))  # the best cut, in hindsight
        assert f1 >= best - 0.1, (relevant, n, f1, best)
        assert np.all(np.diff(relevance) <= 1e-12)  # non-increasing down the list
        assert relevance[-1] < 0.1 and relevance[0] > 0.95


def test_a_query_matching_nothing_keeps_almost_nothing():
    query, vectors, _ = planted(8000, 0, seed=3)
    background = Background(vectors[:2048], 8000)
    scores = np.sort(vectors @ query)[::-1]
    relevance = calibrate(query, background).relevance(scores[:2000])
    assert cut_until_irrelevant(relevance) <= 3


def test_the_same_relevance_for_shifted_and_stretched_scores():
    """What raw thresholds cannot do: a query whose cosines sit higher and wider gets the same relevances."""
    query, vectors, truth = planted(4000, 50, seed=4)
    background = Background(vectors[:1024], 4000)
    scores = np.sort(vectors @ query)[::-1].astype(np.float64)  # float64: no ties made by rounding
    base = calibrate(query, background).relevance(scores)
    cal = calibrate(query, background)
    cal.mu, cal.sigma, cal.scores = 0.3 + 1.5 * cal.mu, 1.5 * cal.sigma, 0.3 + 1.5 * cal.scores
    if cal.mixture is not None:
        mu0, s0, mu1, s1, p1 = cal.mixture
        cal.mixture = (0.3 + 1.5 * mu0, 1.5 * s0, 0.3 + 1.5 * mu1, 1.5 * s1, p1)
    moved = cal.relevance(0.3 + 1.5 * scores)
    assert np.allclose(base, moved, atol=1e-3)


def test_the_scipy_free_helpers_match_scipy():
    """relevance.py avoids importing scipy (peak RSS of a fresh query): its CDF and its
    non-increasing fit must give scipy's numbers."""
    from scipy.optimize import isotonic_regression
    from scipy.special import ndtr as scipy_ndtr

    from retrieval.query.relevance import ndtr, non_increasing_fit

    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(0, 3, 500), [-40.0, 0.0, 40.0]])
    np.testing.assert_allclose(ndtr(x), scipy_ndtr(x), rtol=1e-12, atol=1e-300)
    for values in (rng.random(300), np.sort(rng.random(50)), np.sort(rng.random(50))[::-1],
                   np.repeat(rng.random(20), 3), np.zeros(0), np.array([0.5])):
        np.testing.assert_allclose(non_increasing_fit(values),
                                   isotonic_regression(values, increasing=False).x, atol=1e-12)


def test_a_query_process_imports_no_scipy():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, retrieval.query.search; "
                          "print(sorted(m for m in ('scipy', 'alembic') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_histogram_mixture_recovers_a_planted_two_part_mixture():
    rng = np.random.default_rng(5)
    scores = np.sort(np.concatenate([rng.normal(0.2, 0.05, 3700), rng.normal(0.45, 0.03, 400)]))
    mu = float(np.median(scores))
    found = fit_mixture(scores, mu, 1.4826 * float(np.median(np.abs(scores - mu))))
    assert found is not None
    mu0, s0, mu1, s1, p1 = found
    assert abs(mu0 - 0.2) < 0.01 and abs(s0 - 0.05) < 0.01 and abs(mu1 - 0.45) < 0.01 and abs(s1 - 0.03) < 0.01
    assert abs(p1 - 400 / 4100) < 0.02
    one_bell = np.sort(rng.normal(0.2, 0.05, 4096))
    assert fit_mixture(one_bell, 0.2, 0.05) is None  # nothing stands out: one part, not two
