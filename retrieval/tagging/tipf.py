"""Tip-Adapter-F (Zhang et al., 2022): Tip-Adapter with its cache keys fine-tuned a few epochs.

The training-free adapter (`retrieval.tagging.fewshot`) adds

    alpha * exp(-beta * (1 - f . keys^T)) @ values

to the zero-shot logits, with keys the shots' own vectors. Tip-Adapter-F makes
the keys trainable (values and the zero-shot classifier stay fixed) and
fits them by cross-entropy on the shots. The paper trains on augmented crops
of the shots; the library holds one vector per image, so here each shot is
classified by the *other* shots' keys (its own affinity masked out), which
stops the trivial solution "every image is closest to its own key" and makes
the keys learn what the class's other examples share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.errors import InputError
from retrieval.model.runtime import torch_threads

DEFAULT_EPOCHS = 20
DEFAULT_LR = 1e-3


@dataclass
class TipFResult:
    keys: np.ndarray  # (N, dim) fine-tuned keys (not re-normalised, as in the paper)
    epochs: int
    loss: float
    seconds: float


def fine_tune_keys(keys: np.ndarray, targets: np.ndarray, class_matrix: np.ndarray, logit_scale: float,
                   alpha: float, beta: float, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR,
                   seed: int = 0) -> TipFResult:
    """Fine-tune the cache keys on the shots themselves, leave-one-out; full batch (the shots are few)."""
    if len(keys) < 2:
        raise InputError("Tip-Adapter-F needs at least two example images")
    with torch_threads(1):  # (shots x shots) products: a second thread only spins
        return _fine_tune(keys, targets, class_matrix, logit_scale, alpha, beta, epochs, lr, seed)


def _fine_tune(keys, targets, class_matrix, logit_scale, alpha, beta, epochs, lr, seed) -> TipFResult:
    started = time.perf_counter()
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(keys, np.float32))
    y = torch.from_numpy(np.asarray(targets, np.int64))
    values = F.one_hot(y, class_matrix.shape[0]).float()
    zero_shot = logit_scale * x @ torch.from_numpy(np.ascontiguousarray(class_matrix, np.float32)).T
    learned = torch.nn.Parameter(x.clone())
    optimiser = torch.optim.AdamW([learned], lr=lr, eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, epochs))
    own = torch.eye(len(x), dtype=torch.bool)
    loss_value = float("nan")
    for _ in range(epochs):
        optimiser.zero_grad()
        affinity = torch.exp(-beta * (1.0 - x @ learned.T)).masked_fill(own, 0.0)
        loss = F.cross_entropy(zero_shot + alpha * affinity @ values, y)
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_value = float(loss.detach())
    return TipFResult(learned.detach().numpy().astype(np.float32), epochs, loss_value,
                      time.perf_counter() - started)


def fine_tuned_cache(cache, class_matrix: np.ndarray, logit_scale: float, alpha: float, beta: float,
                     epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR):
    """A `fewshot.ShotCache` whose keys are fine-tuned; it plugs into `fewshot.TipAdapter` unchanged."""
    result = fine_tune_keys(cache.keys, cache.targets, class_matrix, logit_scale, alpha, beta, epochs, lr)
    return replace(cache, keys=result.keys), result
