"""Learned-from-examples rows for bench/quality.py: few-shot methods, concepts as search, the cut-off.

`bench/quality.py --learned` calls `run_learned` with the test split's vectors
it has already encoded; the train split's vectors come from
`bench.split_features` (encoded from the decoded-pixel cache, cached by
fingerprint). Shots come from the train split (16 per class per draw, seeded;
an n-shot set is the first n of them, so the sets are nested), never from the
test split they are scored on.

Hyperparameters are chosen on a validation set carved from the *train* split
(VALIDATION_PER_CLASS photos per class, seeded, none of them a shot in any
draw), never on the test split. The rule, for each method and shot count:
every setting in the method's grid (GRIDS) is fitted on each draw's shots; the
setting with the highest mean validation top-1 over the draws wins (ties: the
first in the grid, which lists the strongest pull toward zero-shot first);
its test top-1 (the same fits, nothing refitted) is what the table reports.

* few-shot top-1, mean and spread (population std) over the draws:
  zero-shot (the `template` classifier), Tip-Adapter (alpha, beta), Tip-Adapter-F
  (keys fine-tuned at the Tip-Adapter row's chosen alpha/beta; epochs, lr),
  linear probe (softmax regression pulled toward the zero-shot classifier,
  `retrieval.learn.probe`; lambda) and CoOp (`retrieval.learn.coop`; context
  words, lr, anchor, steps; only for open_clip's own text tower);
* the ceiling: the same linear probe (with and without the text prior, lambda
  chosen on the validation set after fitting on the rest of the train split)
  refitted on all 50,000 train photos: what a linear read-out of these image
  vectors can reach with every label, an upper bound for few-shot linear methods;
* concepts as search: per class, a probe concept from k train photos (with
  the class's template text as its prompt, and without), negatives sampled
  from the test split as `concept learn` samples the library; p@10 and mAP
  over the test split next to the text query's;
* the cut-off: each class's search-default query over the whole test split,
  relevance from `retrieval.query.relevance` (background: 4,096 test vectors,
  seeded), cut by `--until-irrelevant`'s rule; against the single raw-score
  threshold that maximises mean F1 over the 10 queries in hindsight. The same
  over the train split is the design set the rule was chosen on.
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import numpy as np

POOL = 16  # train photos drawn per class per draw; an n-shot set is the first n
VALIDATION_PER_CLASS = 500
VALIDATION_SEED = 11
COOP_STEPS = (25, 50, 100)  # snapshots of one run: the step count is a searched setting too
GRIDS = {
    "tip-adapter": [{"alpha": a, "beta": b} for a in (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
                    for b in (0.5, 1.0, 2.0, 3.5, 5.5, 8.0, 12.0)],
    "tip-adapter-f": [{"epochs": e, "lr": lr} for e in (10, 20, 50) for lr in (1e-4, 1e-3, 1e-2)],
    "linear probe": [{"lam": lam} for lam in (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)],
    # CoOp is the slow one (a text-tower forward and backward per step, ~0.2 s on the shared CPU):
    # the context stays "a photo of a" (4 words; the prompt the zero-shot row uses).
    "coop": [{"init": "a photo of a", "lr": 2e-3, "anchor": 1.0}, {"init": "a photo of a", "lr": 1e-2, "anchor": 1.0},
             {"init": "a photo of a", "lr": 1e-2, "anchor": 0.1}],
}
QUICK_GRIDS = {
    "tip-adapter": GRIDS["tip-adapter"],
    "tip-adapter-f": [{"epochs": 20, "lr": lr} for lr in (1e-4, 1e-3)],
    "linear probe": GRIDS["linear probe"],
    "coop": [{"init": "a photo of a", "lr": 1e-2, "anchor": 1.0}],
}


def train_rows(data_root: Path) -> dict[str, int]:
    """Path of each train photo -> its row in `split_features(..., "train")` (split_files order)."""
    from tests.models import cifar

    _, files = cifar.split_files(data_root / "train")
    return {str(data_root / "train" / rel): i for i, (rel, _) in enumerate(files)}


def draw_pool(data_root: Path, classes: list[str], seed: int, rows: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """POOL train photos per class, class-major: (rows into the train split's vectors, targets)."""
    picked, targets = [], []
    for c, name in enumerate(classes):
        files = sorted(str(p) for p in (data_root / "train" / name).iterdir())
        picked += [rows[f] for f in random.Random(f"learned/{seed}/{name}").sample(files, POOL)]
        targets += [c] * POOL
    return np.asarray(picked), np.asarray(targets)


def validation_rows(train_y: np.ndarray, exclude: np.ndarray, per_class: int = VALIDATION_PER_CLASS,
                    seed: int = VALIDATION_SEED) -> np.ndarray:
    """A seeded validation set from the train split: `per_class` photos per class, no shot among them."""
    rng = np.random.default_rng(seed)
    free = np.setdiff1d(np.arange(len(train_y)), exclude)
    return np.sort(np.concatenate([rng.choice(free[train_y[free] == c], per_class, replace=False)
                                   for c in np.unique(train_y)]))


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


class Split:
    """Features and targets of one scoring set (validation or test)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y


def _fits(method: str, setting: dict, x, y, class_matrix, scale, encoder, names, chosen):
    """Yield (setting, classifier) pairs: a classifier maps features to logits. CoOp yields one per snapshot."""
    from retrieval.learn.coop import learn_prompts
    from retrieval.learn.probe import fit_multiclass_probe
    from retrieval.tagging import fewshot
    from retrieval.tagging.tipf import fine_tune_keys

    if method == "tip-adapter":
        a, b = setting["alpha"], setting["beta"]
        yield setting, lambda f: fewshot.tip_logits(f, class_matrix, scale, x, y, a, b)
    elif method == "tip-adapter-f":
        a, b = chosen["tip-adapter"]["alpha"], chosen["tip-adapter"]["beta"]
        keys = fine_tune_keys(x, y, class_matrix, scale, a, b, setting["epochs"], setting["lr"]).keys
        yield {**setting, "alpha": a, "beta": b}, lambda f: fewshot.tip_logits(f, class_matrix, scale, keys, y, a, b)
    elif method == "linear probe":
        probe = fit_multiclass_probe(x, y, class_matrix, scale, setting["lam"])
        yield setting, probe.logits
    else:
        result = learn_prompts(encoder.model, encoder.tokenizer, names, x, y, scale, init=setting["init"],
                               steps=max(COOP_STEPS), lr=setting["lr"], anchor=setting["anchor"],
                               snapshots=COOP_STEPS)
        for step in COOP_STEPS:
            vectors = result.snapshots[step]
            yield {**setting, "steps": step}, (lambda f, v=vectors: scale * f @ v.T)


def few_shot(encoder, val: Split, test: Split, class_matrix, scale, pools, shot_counts, grids,
             names) -> list[dict]:
    from retrieval.errors import ModelError

    zero_shot = _top1(test.x @ class_matrix.T, test.y)
    zero_val = _top1(val.x @ class_matrix.T, val.y)
    rows = [{"shots": 0, "method": "zero-shot", "top1_mean": zero_shot, "top1_std": 0.0, "draws": [],
             "vs_zero_shot": 0.0, "val_top1": zero_val, "setting": None, "seconds_per_draw": 0.0}]
    for n in shot_counts:
        chosen: dict[str, dict] = {}
        for method in ("tip-adapter", "tip-adapter-f", "linear probe", "coop"):
            scores: dict[str, dict] = {}  # setting (as text) -> {"setting", "val": [..], "test": [..]}
            started = time.perf_counter()
            try:
                for pool_x, pool_y in pools:
                    x, y = first_shots(pool_x, pool_y, n)
                    for setting in grids[method]:
                        for full, classify in _fits(method, setting, x, y, class_matrix, scale, encoder, names,
                                                    chosen):
                            entry = scores.setdefault(repr(sorted(full.items())), {"setting": full, "val": [],
                                                                                   "test": []})
                            entry["val"].append(_top1(classify(val.x), val.y))
                            entry["test"].append(_top1(classify(test.x), test.y))
            except ModelError as exc:  # CoOp on a model whose text tower it cannot open
                rows.append({"shots": n, "method": method, "skipped": str(exc)})
                continue
            best = max(scores.values(), key=lambda e: np.mean(e["val"]))  # max keeps the first of equals
            chosen[method] = best["setting"]
            rows.append({"shots": n, "method": method, "top1_mean": float(np.mean(best["test"])),
                         "top1_std": float(np.std(best["test"])), "draws": [round(v, 4) for v in best["test"]],
                         "vs_zero_shot": float(np.mean(best["test"])) - zero_shot,
                         "val_top1": float(np.mean(best["val"])), "setting": best["setting"],
                         "settings_tried": len(scores),
                         "seconds_per_draw": (time.perf_counter() - started) / len(pools)})
    return rows


def ceiling(train_x, train_y, val_rows, test: Split, class_matrix, scale, lams=(1e-4, 1e-3, 1e-2)) -> dict:
    """The linear probe with every train label: lambda (and prior or none) chosen on the validation rows."""
    from retrieval.learn.probe import fit_multiclass_probe

    started = time.perf_counter()
    rest = np.setdiff1d(np.arange(len(train_y)), val_rows)
    tried = []
    for lam, prior in itertools.product(lams, (class_matrix, None)):
        probe = fit_multiclass_probe(train_x[rest], train_y[rest], prior, scale, lam, max_iter=1000)
        tried.append({"lam": lam, "prior": prior is not None,
                      "val_top1": _top1(probe.logits(train_x[val_rows]), train_y[val_rows])})
    best = max(tried, key=lambda t: t["val_top1"])
    probe = fit_multiclass_probe(train_x, train_y, class_matrix if best["prior"] else None, scale, best["lam"],
                                 max_iter=1000)
    return {"top1": _top1(probe.logits(test.x), test.y), "train_top1": _top1(probe.logits(train_x), train_y),
            "lam": best["lam"], "prior": best["prior"], "tried": tried, "train_photos": len(train_y),
            "seconds": round(time.perf_counter() - started, 1)}


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
                search_matrix, scale, shot_counts, draws, concept_ks, probe_lam, batch_size=None, workers=None,
                progress=False, quick=False, with_ceiling=True, log=None) -> dict:
    from bench.split_features import split_features

    train_x, train_y, train_classes = split_features(encoder, data_root, "train", log=log)
    if train_classes != list(classes):
        raise RuntimeError(f"train classes {train_classes} differ from the test split's {classes}")
    rows = train_rows(data_root)
    drawn = [draw_pool(data_root, classes, seed, rows) for seed in range(draws)]
    pools = [(train_x[r], y) for r, y in drawn]
    val_rows = validation_rows(train_y, np.concatenate([r for r, _ in drawn]))
    val, test = Split(train_x[val_rows], train_y[val_rows]), Split(test_x, test_y)
    started = time.perf_counter()
    names = [c.replace("_", " ") for c in classes]
    few = few_shot(encoder, val, test, template_matrix, scale, pools, shot_counts, QUICK_GRIDS if quick else GRIDS,
                   names)
    top = ceiling(train_x, train_y, val_rows, test, template_matrix, scale) if with_ceiling else None
    concepts = concept_search(test_x, test_y, template_matrix, scale, [(x, y, classes) for x, y in pools],
                              concept_ks, probe_lam)
    cut = {"test": cut_off(test_x, test_y, search_matrix), "train (design set)": cut_off(train_x, train_y, search_matrix)}
    return {"draws": draws, "probe_lambda": probe_lam, "validation": {"photos": len(val_rows), "seed": VALIDATION_SEED},
            "quick": quick, "few_shot": few, "ceiling": top, "concept_search": concepts, "cut_off": cut,
            "seconds": round(time.perf_counter() - started, 1)}


def _setting(setting: dict | None) -> str:
    if not setting:
        return ""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def learned_table(learned: dict) -> list[str]:
    lines = ["", f"few-shot top-1 on the test split (train-split shots, mean ± std over {learned['draws']} draws; "
             f"settings chosen on {learned['validation']['photos']} train-split validation photos):",
             f"{'shots':>5}  {'method':<14}  {'top-1':>13}  {'vs zero-shot':>12}  {'val':>6}  {'s/draw':>7}  setting"]
    for r in learned["few_shot"]:
        if "skipped" in r:
            lines.append(f"{r['shots']:>5}  {r['method']:<14}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['shots']:>5}  {r['method']:<14}  {r['top1_mean']:>6.3f} ± {r['top1_std']:.3f}  "
                     f"{r['vs_zero_shot']:>+12.3f}  {r['val_top1']:>6.3f}  {r['seconds_per_draw']:>7.2f}  "
                     f"{_setting(r['setting'])}")
    top = learned.get("ceiling")
    if top:
        zero = learned["few_shot"][0]["top1_mean"]
        lines += [f"ceiling: linear probe on all {top['train_photos']:,} train photos (lambda {top['lam']:g}, "
                  f"{'text prior' if top['prior'] else 'no prior'}, chosen on validation): test top-1 {top['top1']:.3f} "
                  f"({top['top1'] - zero:+.3f} vs zero-shot; train top-1 {top['train_top1']:.3f})"]
    lines += ["", "concepts as search (one per class, k train photos; mean over classes and draws):",
              f"{'k':>3}  {'kind':<22}  {'p@10':>6}  {'mAP':>6}"]
    for r in learned["concept_search"]:
        lines.append(f"{r['k']:>3}  {r['kind']:<22}  {r['p@10']:>6.3f}  {r['map']:>6.3f}")
    for split, cut in learned["cut_off"].items():
        lines += ["", f"cut-off over the {split} split, the 10 class queries (search-default prompts), means:",
                  f"{'rule':<38}  {'precision':>9}  {'recall':>6}  {'F1':>6}"]
        for name, key in (("--until-irrelevant", "until_irrelevant"),
                          (f"best raw threshold, hindsight ({cut['hindsight_threshold']['threshold']:.3f})",
                           "hindsight_threshold")):
            r = cut[key]
            lines.append(f"{name:<38}  {r['precision']:>9.3f}  {r['recall']:>6.3f}  {r['f1']:>6.3f}")
    return lines


# -- on its own -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Only the learned tables, both splits' vectors from the pixel cache (no PNG decoding, no prompt rows)."""
    import argparse
    import json
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.split_features import split_features
    from retrieval.model.encoder import Encoder, ModelSpec
    from retrieval.prompting.prompts import class_vectors
    from retrieval.tagging.autotag import logit_scale
    from retrieval.tagging.labels import from_names
    from tests.models import cifar, minilm

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--test-model", choices=("cifar10", "cifar10-minilm"), default="cifar10")
    parser.add_argument("--shots", default="1,2,4,8,16")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 draw, shots 1 and 16, smaller grids")
    parser.add_argument("--no-ceiling", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shots = (1, 16) if args.quick else tuple(int(s) for s in args.shots.split(","))
    draws = 1 if args.quick else args.draws
    data_root = cifar.default_data_root()
    ensure = cifar.ensure_cifar_model if args.test_model == "cifar10" else minilm.ensure_minilm_model
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    encoder = Encoder(ModelSpec(model_dir=str(ensure(log=log, data_root=data_root))), device="cpu")
    test_x, test_y, classes = split_features(encoder, data_root, "test", log=log)
    labels = from_names(classes)
    template = class_vectors(encoder, labels, "template").matrix
    search = class_vectors(encoder, labels, "ensemble:photo").matrix
    from retrieval.learn.probe import DEFAULT_LAMBDA

    result = run_learned(encoder, data_root, classes, test_x, test_y, template, search, logit_scale(encoder),
                         shots, draws, (1, 4, 16), DEFAULT_LAMBDA, quick=args.quick,
                         with_ceiling=not args.no_ceiling, log=log)
    result.update(model=args.test_model, fingerprint=encoder.fingerprint[:12], load_average=os.getloadavg())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {args.test_model} (fingerprint {encoder.fingerprint[:12]}), 10,000 test photos; "
              f"load average {os.getloadavg()[0]:.1f}")
        print("\n".join(learned_table(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
