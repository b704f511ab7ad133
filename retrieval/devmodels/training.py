"""A small contrastive (CLIP) trainer for open_clip models on the CPU.

Why: no pretrained weights can be downloaded here, so the project trains its
own small test models (drawn shapes, CIFAR-10).  This is the one loop they
share: AdamW, linear warm-up then linear decay, and a CLIP loss that can treat
every pair of the same class in a batch as a positive ("soft targets"), which
matters when a batch of 128 holds ten captions of the same class.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval import config

SampleBatch = Callable[[int], tuple[Tensor, list[str], list[int]]]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is repeatable as far as torch allows."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then linear decay to 0 at `steps`.

    The warm-up is not optional in practice: without it these small models at
    a high learning rate stay stuck at loss ln(batch) (see offline.md).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def clip_loss(logits_per_image: Tensor, class_ids: Tensor | None, soft_targets: bool) -> Tensor:
    """Symmetric cross-entropy between image->text and text->image logits.

    With soft targets, the target row of image i spreads its mass evenly over
    every caption of the same class, instead of forcing caption i apart from
    other captions that describe the same thing.
    """
    n = logits_per_image.shape[0]
    if soft_targets and class_ids is not None:
        same = (class_ids[:, None] == class_ids[None, :]).to(logits_per_image.dtype)
        targets = same / same.sum(dim=1, keepdim=True)
    else:
        targets = torch.eye(n, dtype=logits_per_image.dtype, device=logits_per_image.device)
    loss_i = F.cross_entropy(logits_per_image, targets)
    loss_t = F.cross_entropy(logits_per_image.t(), targets.t())
    return 0.5 * (loss_i + loss_t)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices; biases, norms, embeddings and the logit scale are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_" in name or "token" in name
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = _param_groups(model, weight_decay)
    kwargs: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.98), "eps": 1e-6}
    try:  # fused AdamW: ~7x faster step on CPU, where the 49k-row token table dominates
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


class ThreadTuner:
    """Choose torch's intra-op thread count by measuring, and keep checking.

    On a 2-core machine shared with other busy processes, torch with 2 threads
    can be 10-20x slower than with 1 (OpenMP threads spin, waiting for a core
    another process holds); on an idle machine 2 threads win.  The tuner runs
    with the fewest threads, now and then tries another count for a couple of
    steps (giving up after one step if that step is 3x slower), and keeps the
    faster.  Probes back off while nothing changes, so a busy machine pays for
    few slow steps; a sudden slowdown on many threads triggers a probe at once.
    """

    def __init__(self, candidates: list[int], period: int = 50, probe: int = 2, first_probe: int = 3) -> None:
        self.candidates = sorted(set(candidates))
        self.best = self.candidates[0]
        self.base_period = self.period = period
        self.probe = probe
        self.ema: float | None = None  # seconds per step with self.best
        self.next_probe = first_probe if len(self.candidates) > 1 else math.inf
        self.trying: int | None = None
        self.trial: list[float] = []
        self._turn = 0

    def threads_for(self, step: int) -> int:
        if self.trying is None and step >= self.next_probe and self.ema is not None:
            others = [c for c in self.candidates if c != self.best]
            self.trying, self.trial = others[self._turn % len(others)], []
            self._turn += 1
        return self.best if self.trying is None else self.trying

    def record(self, seconds: float, step: int) -> None:
        if self.trying is None:
            if self.ema is not None and seconds > 3 * self.ema and self.best != self.candidates[0]:
                self.next_probe = step + 1  # got much slower on many threads: try fewer now
            self.ema = seconds if self.ema is None else 0.8 * self.ema + 0.2 * seconds
            return
        self.trial.append(seconds)
        assert self.ema is not None
        if len(self.trial) < self.probe and seconds < 3 * self.ema:
            return
        fastest = min(self.trial)
        if fastest < 0.9 * self.ema:
            self.best, self.ema, self.period = self.trying, fastest, self.base_period
        else:
            self.period = min(2 * self.period, 8 * self.base_period)
        self.next_probe, self.trying = step + self.period, None


def train_clip(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    sample_batch: SampleBatch,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    soft_targets: bool = True,
    log: Callable[[str], None] | None = None,
    weight_decay: float = 0.1,
    threads: int | None = None,
    log_every: int = 50,
    max_logit_scale: float = 100.0,
) -> dict[str, Any]:
    """Train an open_clip CLIP model in place with a contrastive loss.

    `sample_batch(n)` returns (images [n,3,H,W] already normalised, n captions,
    n class ids); the trainer owns nothing about the data, so the same loop
    serves drawn shapes and CIFAR-10.  It is called from one worker thread,
    one batch ahead, always in order, so it overlaps with the torch step.

    `threads=None` lets a ThreadTuner choose 1 or all cores as the machine's
    load allows; give a number for bit-repeatable runs on one machine.
    Returns statistics: steps, seconds (wall), cpu_seconds, data_wait_seconds,
    threads, first/last loss, loss history (every `log_every` steps) and the
    logit scale.  The model is left in eval mode.
    """
    if steps <= 0 or batch_size <= 1:
        raise ValueError("steps must be > 0 and batch_size > 1")
    seed_everything(seed)
    device = next(model.parameters()).device
    optimizer = _make_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    tuner = ThreadTuner([threads] if threads else sorted({1, config.usable_cores()}))
    history: list[tuple[int, float]] = []
    first_loss = last_loss = math.nan
    start, cpu_start = time.perf_counter(), time.process_time()
    wait_seconds = 0.0
    old_threads = torch.get_num_threads()
    # Batches are drawn one step ahead in a worker thread (in order, so the
    # data stream is still deterministic) while torch computes the current one.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-data") as pool:
        pending = pool.submit(sample_batch, batch_size)
        try:
            model.train()
            for step in range(steps):
                t0 = time.perf_counter()
                images, captions, class_ids = pending.result()
                wait_seconds += time.perf_counter() - t0
                if step + 1 < steps:
                    pending = pool.submit(sample_batch, batch_size)
                n_threads = tuner.threads_for(step)
                torch.set_num_threads(n_threads)
                t1 = time.perf_counter()
                texts = tokenizer(captions).to(device)
                ids = torch.as_tensor(class_ids, device=device)
                img = F.normalize(model.encode_image(images.to(device)), dim=-1)
                txt = F.normalize(model.encode_text(texts), dim=-1)
                loss = clip_loss(model.logit_scale.exp() * img @ txt.t(), ids, soft_targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():  # as in CLIP: keep the temperature bounded
                    model.logit_scale.clamp_(0, math.log(max_logit_scale))
                value = float(loss.detach())
                tuner.record(time.perf_counter() - t1, step)
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss became {value} at step {step}")
                if step == 0:
                    first_loss = value
                last_loss = value
                if step % log_every == 0 or step == steps - 1:
                    history.append((step, value))
                    if log is not None:
                        log(f"step {step + 1}/{steps} loss {value:.4f} lr {scheduler.get_last_lr()[0]:.2e} threads {n_threads}")
        finally:
            pending.cancel()
            torch.set_num_threads(old_threads)
            model.eval()
    return {
        "steps": steps,
        "batch_size": batch_size,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "data_wait_seconds": wait_seconds,
        "threads": tuner.best,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "loss_history": history,
        "logit_scale": float(model.logit_scale.detach().exp()),
        "soft_targets": soft_targets,
        "seed": seed,
    }
