"""A logistic-regression probe over stored vectors, pulled toward a text prior.

    minimise  sum_i c_i * log(1 + exp(-s_i (x_i . w + b))) / sum_i c_i  +  (lam / 2) * ||w - w0||^2

x_i unit image vectors, s_i = +1 for positives and -1 for negatives, c_i class
weights that give both sides the same total (so 2 positives against 2,000
negatives still count), and w0 the prior: the prompt's unit text vector times
`prior_scale` (the model's logit scale: the weight a zero-shot classifier
gives that text), or zero without a prompt (plain ridge). With one or two
examples the prior term dominates and the probe stays near the prompt; with
many, the data moves it.

scikit-learn's LogisticRegression can only shrink toward zero, not toward w0
(fitting on the residual with an offset would do it, but not with its L-BFGS
on a class-weighted loss plus a free bias without copying X), so this is a
small objective with its gradient, minimised by scipy's L-BFGS-B: d + 1
parameters, a few dozen iterations, milliseconds for thousands of examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

DEFAULT_LAMBDA = 1e-3  # see bench/quality.py concept rows for the measurement that chose it
MAX_ITER = 200


@dataclass
class Probe:
    weight: np.ndarray  # (dim,) float64
    bias: float
    iterations: int
    loss: float

    @property
    def scale(self) -> float:
        return float(np.linalg.norm(self.weight))

    @property
    def direction(self) -> np.ndarray:
        norm = self.scale
        return (self.weight / norm if norm > 0 else self.weight).astype(np.float32)


def fit_probe(positives: np.ndarray, negatives: np.ndarray, prior: np.ndarray | None = None,
              prior_scale: float = 1.0, lam: float = DEFAULT_LAMBDA) -> Probe:
    """Fit w, b on unit vectors; `prior` is a unit text vector (or None for no prior)."""
    x = np.concatenate([positives, negatives]).astype(np.float64)
    sign = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    weights = np.concatenate([np.full(len(positives), 0.5 / len(positives)),
                              np.full(len(negatives), 0.5 / len(negatives))])
    dim = x.shape[1]
    w0 = np.zeros(dim) if prior is None else prior_scale * np.asarray(prior, np.float64)

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:dim], params[dim]
        margin = sign * (x @ w + b)
        loss = -float(weights @ log_expit(margin))
        coef = -weights * sign * expit(-margin)  # d loss / d (x.w + b)
        delta = w - w0
        grad = np.empty(dim + 1)
        grad[:dim] = x.T @ coef + lam * delta
        grad[dim] = coef.sum()
        return loss + 0.5 * lam * float(delta @ delta), grad

    start = np.concatenate([w0, [-float(np.median(x @ w0))] if prior is not None else [0.0]])
    found = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": MAX_ITER})
    return Probe(found.x[:dim].copy(), float(found.x[dim]), int(found.nit), float(found.fun))
