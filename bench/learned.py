"""Learned-from-examples rows for bench/quality.py: few-shot methods, concepts as search, the cut-off.

Not a command of its own: `bench/quality.py --learned` calls `run_learned` with
the test split's vectors it has already encoded. Shots come from the train
split (16 per class per draw, seeded; an n-shot set is the first n of them, so
the sets are nested), never from the test split they are scored on.

* few-shot top-1, mean and spread (population std) over the draws:
  zero-shot (the `template` classifier), Tip-Adapter (alpha/beta by
  leave-one-out from 2 shots on), Tip-Adapter-F (keys fine-tuned at those
  alpha/beta), linear probe (softmax regression pulled toward the zero-shot
  classifier, `retrieval.learn.probe`) and CoOp (`retrieval.learn.coop`);
* concepts as search: per class, a probe concept from k train photos (with
  the class's template text as its prompt, and without), negatives sampled
  from the test split as `concept learn` samples the library; p@10 and mAP
  over the test split next to the text query's;
* the cut-off: each class's search-default query over the whole test split,
  relevance from `retrieval.query.relevance` (background: 4,096 test vectors,
  seeded), cut by `--until-irrelevant`'s rule; against the single raw-score
  threshold that maximises mean F1 over the 10 queries in hindsight.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np

POOL = 16  # train photos drawn per class per draw; an n-shot set is the first n


def draw_pool(data_root: Path, classes: list[str], seed: int) -> tuple[list[str], np.ndarray]:
    """POOL train photos per class, class-major: (paths, targets)."""
    paths, targets = [], []
    for c, name in enumerate(classes):
        files = sorted(str(p) for p in (data_root / "train" / name).iterdir())
        paths += random.Random(f"learned/{seed}/{name}").sample(files, POOL)
        targets += [c] * POOL
    return paths, np.asarray(targets)


def first_shots(features: np.ndarray, targets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(targets == c)[:n] for c in np.unique(targets)])
    return features[keep], targets[keep]


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> tuple[float, float]:
    """(p@10, AP) of one ranking."""
    order = np.argsort(-scores, kind="stable")
    hits = relevant[order]
    cum = np.cumsum(hits)
    return float(hits[:10].mean()), float((cum[hits] / (np.flatnonzero(hits) + 1)).mean())


# -- few-shot classification ----------------------------------------------------------------
def _top1(logits: np.ndarray, targets: np.ndarray) -> float:
    return float((logits.argmax(1) == targets).mean())


def _alpha_beta(keys: np.ndarray, targets: np.ndarray, class_matrix: np.ndarray, scale: float):
    """Tip-Adapter's alpha/beta by leave-one-out on the shots (the defaults at one shot per class)."""
    from retrieval.tagging import fewshot

    if len(targets) <= class_matrix.shape[0]:
        return fewshot.DEFAULT_ALPHA, fewshot.DEFAULT_BETA
    found = fewshot.search_alpha_beta(fewshot.ShotCache(keys, targets, class_matrix.shape[0], [], []),
                                      class_matrix, scale)
    return found["alpha"], found["beta"]


def few_shot(encoder, test_x, test_y, class_matrix, scale, pools, shot_counts, probe_lam) -> list[dict]:
    from retrieval.learn.coop import learn_prompts
    from retrieval.learn.probe import fit_multiclass_probe
    from retrieval.tagging import fewshot
    from retrieval.tagging.tipf import fine_tune_keys

    zero_shot = float(((test_x @ class_matrix.T).argmax(1) == test_y).mean())
    names = [c.replace("_", " ") for c in pools[0][2]]
    rows = []
    for n in shot_counts:
        acc: dict[str, list[float]] = {m: [] for m in ("tip-adapter", "tip-adapter-f", "linear probe", "coop")}
        secs: dict[str, float] = dict.fromkeys(acc, 0.0)
        for pool_x, pool_y, _ in pools:
            x, y = first_shots(pool_x, pool_y, n)
            t0 = time.perf_counter()
            a, b = _alpha_beta(x, y, class_matrix, scale)
            acc["tip-adapter"].append(_top1(fewshot.tip_logits(test_x, class_matrix, scale, x, y, a, b), test_y))
            t1 = time.perf_counter()
            # As `clipfind tag --search-alpha-beta --train`: alpha/beta from the raw cache, then the keys
            # fine-tuned at those values (a second search on tuned keys would reuse the shots).
            keys = x if n < 2 else fine_tune_keys(x, y, class_matrix, scale, a, b).keys
            acc["tip-adapter-f"].append(_top1(fewshot.tip_logits(test_x, class_matrix, scale, keys, y, a, b), test_y))
            t2 = time.perf_counter()
            probe = fit_multiclass_probe(x, y, class_matrix, scale, probe_lam)
            acc["linear probe"].append(_top1(probe.logits(test_x), test_y))
            t3 = time.perf_counter()
            coop = learn_prompts(encoder.model, encoder.tokenizer, names, x, y, scale)
            acc["coop"].append(_top1(scale * test_x @ coop.text_vectors.T, test_y))
            t4 = time.perf_counter()
            for method, seconds in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                secs[method] += seconds
        for method, values in acc.items():
            rows.append({"shots": n, "method": method, "top1_mean": float(np.mean(values)),
                         "top1_std": float(np.std(values)), "draws": [round(v, 4) for v in values],
                         "vs_zero_shot": float(np.mean(values)) - zero_shot,
                         "seconds_per_draw": secs[method] / len(pools)})
    return [{"shots": 0, "method": "zero-shot", "top1_mean": zero_shot, "top1_std": 0.0, "draws": [],
             "vs_zero_shot": 0.0, "seconds_per_draw": 0.0}] + rows


# -- concepts as search ---------------------------------------------------------------------
def concept_search(test_x, test_y, class_matrix, scale, pools, ks, probe_lam) -> list[dict]:
    from retrieval.learn.probe import fit_probe

    rng = np.random.default_rng(7)
    negatives = test_x[rng.choice(len(test_x), min(2048, len(test_x)), replace=False)]
    rows = []
    text = [average_precision(test_x @ class_matrix[c], test_y == c) for c in range(class_matrix.shape[0])]
    rows.append({"k": 0, "kind": "text query (template)", "p@10": float(np.mean([t[0] for t in text])),
                 "map": float(np.mean([t[1] for t in text]))})
    for k in ks:
        for kind, with_prompt in (("probe + prompt", True), ("probe, no prompt", False)):
            p10, aps = [], []
            for pool_x, pool_y, _ in pools:
                for c in range(class_matrix.shape[0]):
                    positives = pool_x[pool_y == c][:k]
                    probe = fit_probe(positives, negatives, class_matrix[c] if with_prompt else None, scale,
                                      probe_lam if with_prompt else None)
                    p, ap = average_precision(test_x @ probe.direction, test_y == c)
                    p10.append(p)
                    aps.append(ap)
            rows.append({"k": k, "kind": kind, "p@10": float(np.mean(p10)), "map": float(np.mean(aps)),
                         "map_std_over_classes_and_draws": float(np.std(aps))})
    return rows


# -- the cut-off ----------------------------------------------------------------------------
def cut_off(test_x, test_y, query_matrix) -> dict:
    from retrieval.query.relevance import (
        BACKGROUND_SEED,
        BACKGROUND_SIZE,
        Background,
        calibrate,
        cut_until_irrelevant,
    )

    rng = np.random.default_rng(BACKGROUND_SEED)
    background = Background(test_x[rng.choice(len(test_x), min(BACKGROUND_SIZE, len(test_x)), replace=False)],
                            len(test_x))
    ours, ranked = [], []
    for c in range(query_matrix.shape[0]):
        scores = test_x @ query_matrix[c]
        order = np.argsort(-scores, kind="stable")
        relevance = calibrate(query_matrix[c], background).relevance(scores[order])
        n = cut_until_irrelevant(relevance)
        ours.append(_prf(test_y[order][:n] == c, int((test_y == c).sum())) + (n,))
        ranked.append((scores, test_y == c))
    grid = np.linspace(-1, 1, 2001)
    best_t, best_f1 = None, -1.0
    for t in grid:
        f1 = np.mean([_prf(rel[s >= t], int(rel.sum()))[2] for s, rel in ranked])
        if f1 > best_f1:
            best_t, best_f1 = float(t), float(f1)
    hindsight = [_prf(rel[s >= best_t], int(rel.sum())) + (int((s >= best_t).sum()),) for s, rel in ranked]

    def summary(rows):
        return {"precision": float(np.mean([r[0] for r in rows])), "recall": float(np.mean([r[1] for r in rows])),
                "f1": float(np.mean([r[2] for r in rows])), "kept": [r[3] for r in rows]}

    return {"until_irrelevant": summary(ours), "hindsight_threshold": {**summary(hindsight), "threshold": best_t}}


def _prf(hits: np.ndarray, relevant: int) -> tuple[float, float, float]:
    tp = int(hits.sum())
    precision = tp / len(hits) if len(hits) else 0.0
    recall = tp / relevant if relevant else 0.0
    return precision, recall, (2 * tp / (len(hits) + relevant) if len(hits) + relevant else 0.0)


# -- all of it ------------------------------------------------------------------------------
def run_learned(encoder, data_root: Path, classes: list[str], test_x, test_y, template_matrix,
                search_matrix, scale, shot_counts, draws, concept_ks, probe_lam, batch_size, workers,
                progress) -> dict:
    from retrieval.tagging import evaluate

    pools = []
    for seed in range(draws):
        paths, targets = draw_pool(data_root, classes, seed)
        features, _ = evaluate.encode_paths(encoder, paths, batch_size, workers, progress)
        pools.append((features, targets, classes))
    started = time.perf_counter()
    few = few_shot(encoder, test_x, test_y, template_matrix, scale, pools, shot_counts, probe_lam)
    concepts = concept_search(test_x, test_y, template_matrix, scale, pools, concept_ks, probe_lam)
    cut = cut_off(test_x, test_y, search_matrix)
    return {"draws": draws, "probe_lambda": probe_lam, "few_shot": few, "concept_search": concepts,
            "cut_off": cut, "seconds": round(time.perf_counter() - started, 1)}


def learned_table(learned: dict) -> list[str]:
    lines = ["", f"few-shot top-1 on the test split (train-split shots, mean ± std over {learned['draws']} draws):",
             f"{'shots':>5}  {'method':<14}  {'top-1':>13}  {'vs zero-shot':>12}  {'s/draw':>7}"]
    for r in learned["few_shot"]:
        lines.append(f"{r['shots']:>5}  {r['method']:<14}  {r['top1_mean']:>6.3f} ± {r['top1_std']:.3f}  "
                     f"{r['vs_zero_shot']:>+12.3f}  {r['seconds_per_draw']:>7.2f}")
    lines += ["", "concepts as search (one per class, k train photos; mean over classes and draws):",
              f"{'k':>3}  {'kind':<22}  {'p@10':>6}  {'mAP':>6}"]
    for r in learned["concept_search"]:
        lines.append(f"{r['k']:>3}  {r['kind']:<22}  {r['p@10']:>6.3f}  {r['map']:>6.3f}")
    cut = learned["cut_off"]
    lines += ["", "cut-off over the test split, the 10 class queries (search-default prompts), means:",
              f"{'rule':<34}  {'precision':>9}  {'recall':>6}  {'F1':>6}"]
    for name, key in (("--until-irrelevant (relevance < 0.5)", "until_irrelevant"),
                      (f"best raw threshold, hindsight ({cut['hindsight_threshold']['threshold']:.3f})",
                       "hindsight_threshold")):
        r = cut[key]
        lines.append(f"{name:<34}  {r['precision']:>9.3f}  {r['recall']:>6.3f}  {r['f1']:>6.3f}")
    return lines
