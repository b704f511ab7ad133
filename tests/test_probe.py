"""The prior-regularised logistic probe: its gradient, its pull toward the prompt, its fit."""

from __future__ import annotations

import numpy as np
from scipy.optimize import check_grad

from retrieval.learn.probe import fit_probe


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clusters(rng, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    return unit(centre + spread * rng.standard_normal((n, len(centre))))


def test_fit_separates_two_clusters_without_a_prior():
    rng = np.random.default_rng(0)
    a, b = unit(rng.standard_normal(32)), unit(rng.standard_normal(32))
    probe = fit_probe(clusters(rng, a, 20, 0.1), clusters(rng, b, 200, 0.1))
    test_pos, test_neg = clusters(rng, a, 100, 0.1), clusters(rng, b, 100, 0.1)
    assert ((test_pos @ probe.weight + probe.bias) > 0).mean() >= 0.98
    assert ((test_neg @ probe.weight + probe.bias) < 0).mean() >= 0.98


def test_the_prior_holds_one_example_near_the_prompt_and_many_move_it():
    """One positive leaves w closer to the prompt than to itself; 200 positives elsewhere move it."""
    rng = np.random.default_rng(1)
    prompt, elsewhere = unit(rng.standard_normal(32)), unit(rng.standard_normal(32))
    negatives = unit(rng.standard_normal((300, 32)))
    one = fit_probe(clusters(rng, elsewhere, 1, 0.05), negatives, prompt, prior_scale=20.0, lam=1e-2)
    many = fit_probe(clusters(rng, elsewhere, 200, 0.05), negatives, prompt, prior_scale=20.0, lam=1e-4)
    assert float(one.direction @ prompt) > max(0.8, float(one.direction @ elsewhere))
    assert float(many.direction @ elsewhere) > float(many.direction @ prompt)
    without = fit_probe(clusters(rng, elsewhere, 1, 0.05), negatives, None, lam=1e-2)
    assert float(without.direction @ prompt) < 0.5  # the pull comes from the prior, not from the data


def test_gradient_matches_finite_differences():
    """The objective's hand-written gradient, checked numerically (as L-BFGS trusts it)."""
    from retrieval.learn import probe as module

    rng = np.random.default_rng(2)
    pos, neg = unit(rng.standard_normal((5, 8))), unit(rng.standard_normal((30, 8)))
    prior = unit(rng.standard_normal(8))
    captured = {}
    real_minimize = module.minimize

    def spy(fun, x0, **kwargs):
        captured["fun"] = fun
        return real_minimize(fun, x0, **kwargs)

    module.minimize = spy
    try:
        fit_probe(pos, neg, prior, prior_scale=3.0, lam=0.1)
    finally:
        module.minimize = real_minimize
    fun = captured["fun"]
    point = rng.standard_normal(9)
    error = check_grad(lambda p: fun(p)[0], lambda p: fun(p)[1], point)
    assert error < 1e-5, error


def test_multiclass_probe_with_a_strong_prior_is_the_zero_shot_classifier():
    from retrieval.learn.probe import fit_multiclass_probe

    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((4, 16)))
    targets = np.repeat(np.arange(4), 5)
    shots = unit(centres[targets] + 0.2 * rng.standard_normal((20, 16)))
    pinned = fit_multiclass_probe(shots, targets, centres, prior_scale=10.0, lam=1e3)
    assert np.allclose(pinned.weight, 10.0 * centres, atol=0.05)
    free = fit_multiclass_probe(shots, targets, None, lam=1e-3)
    test = unit(centres[targets] + 0.2 * rng.standard_normal((20, 16)))
    assert (free.logits(test).argmax(1) == targets).mean() >= 0.9
