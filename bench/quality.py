"""Retrieval and tagging quality on real photos (CIFAR-10 test split), one table per model.

    .venv/bin/python bench/quality.py                              # the CIFAR-10 test model
    .venv/bin/python bench/quality.py --json
    .venv/bin/python bench/quality.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
        --descriptions cifar10_cupl.json                           # real weights + CuPL
    .venv/bin/python bench/quality.py --model-dir DIR | --model NAME --checkpoint FILE
    .venv/bin/python bench/quality.py --per-class 100 --no-save    # a quick look
    .venv/bin/python bench/quality.py --test-model cifar10-minilm --descriptions cifar10
                                           # the model on a frozen pretrained text tower (MiniLM)

Rows (one prompt strategy each, scored on the same image vectors):
  raw                 the class name as typed
  template            "a photo of a {}." (the default of `clipfind tag` / `eval zeroshot`)
  ensemble            the CLIP paper's 80 ImageNet templates, averaged
  ensemble:cifar10    the CLIP paper's 18 CIFAR-10 templates, averaged
  search-default      the templates `clipfind search` wraps a free-text query in
  cupl / ensemble+cupl  with --descriptions FILE|cifar10 ({label: [sentences]}; `cifar10` is the
                      bundled hand-written set, `clipfind prompts generate` writes LLM ones)
Below them, every single template alone (the 80 ImageNet and 18 CIFAR-10 ones, the search
templates and the model's own training caption templates), split into held-in (the model
was trained on captions made from it; read from the model folder's config) and held-out,
as min / median / max of each column: the spread, not just the best template.
  template + tip-adapter (N-shot)  Tip-Adapter on top of `template`, N examples per class
                      drawn (seeded) from the train split, alpha/beta at their defaults
                      or searched with --search-alpha-beta
Columns: zero-shot top-1 / top-5 over the test photos; text→image precision@10
and mAP over the same photos, with each class's vector as the query (one query
per class, every photo of that class relevant). Below the table: image→image
precision@10, every test photo querying all the others (itself left out).

It calls the library directly (retrieval.tagging.evaluate, retrieval.prompting.prompts,
retrieval.tagging.fewshot): the same decode, preprocessing, class vectors and
Tip-Adapter arithmetic as the CLI, without a library on disk. Each run's
table is saved as JSON and text under bench/results/, named by the weights'
fingerprint and the date.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.cli.common import MODEL_HELP, model_options, pop_model_options  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_SHOTS = (1, 4, 16)
TEST_MODELS = ("cifar10", "cifar10-minilm")


# -- data -----------------------------------------------------------------------------------
def test_split(data_root: Path, per_class: int | None):
    """The test split as an evaluate.Dataset, optionally the first `per_class` photos per class."""
    from retrieval.tagging import evaluate

    dataset = evaluate.load_classification(data_root / "test")
    if per_class:
        keep = np.concatenate([np.flatnonzero(dataset.targets == c)[:per_class] for c in range(len(dataset.classes))])
        dataset = evaluate.Dataset([dataset.paths[i] for i in keep], dataset.targets[keep], dataset.classes)
    return dataset


def make_shots(data_root: Path, classes: list[str], shots: int, seed: int, into: Path) -> Path:
    """A --shots folder of symlinks: `shots` train photos per class, drawn with a seeded RNG."""
    folder = into / f"shots-{shots}"
    for name in classes:
        files = sorted((data_root / "train" / name).iterdir())
        chosen = random.Random(f"{seed}/{name}").sample(files, shots)
        (folder / name).mkdir(parents=True)
        for f in chosen:
            (folder / name / f.name).symlink_to(f)
    return folder


# -- measures -------------------------------------------------------------------------------
def text_to_image(features: np.ndarray, targets: np.ndarray, class_matrix: np.ndarray, k: int = 10) -> dict:
    """Each class vector queries every photo: precision@k and average precision, means over classes."""
    sims = class_matrix @ features.T  # (classes, images)
    precisions, aps = [], []
    for c in range(class_matrix.shape[0]):
        order = np.argsort(-sims[c], kind="stable")
        relevant = targets[order] == c
        precisions.append(relevant[:k].mean())
        hits = np.cumsum(relevant)
        aps.append(float((hits[relevant] / (np.flatnonzero(relevant) + 1)).mean()) if relevant.any() else 0.0)
    return {"p@10": float(np.mean(precisions)), "map": float(np.mean(aps)),
            "per_class_p@10": [float(p) for p in precisions]}


def image_to_image(features: np.ndarray, targets: np.ndarray, k: int = 10, chunk: int = 2048) -> float:
    """Every photo queries all the others (itself excluded): mean precision@k of same-class neighbours."""
    total = 0.0
    for start in range(0, len(features), chunk):
        sims = features[start:start + chunk] @ features.T
        rows = np.arange(sims.shape[0])
        sims[rows, rows + start] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        total += float((targets[top] == targets[start:start + chunk, None]).sum())
    return total / (len(features) * k)


def held_in_templates(spec) -> list[str]:
    """The caption templates a test model folder says it was trained on (none for other models)."""
    if not spec.model_dir:
        return []
    config = Path(spec.model_dir) / "open_clip_config.json"
    try:
        return list(json.loads(config.read_text()).get("clipfind", {}).get("caption_templates", []))
    except (OSError, ValueError):
        return []


def single_templates(held_in: list[str]) -> list[tuple[str, bool]]:
    """Every template to score alone, once each: (template, held in training)."""
    from retrieval.prompting.prompts import PHOTO_TEMPLATES, template_set

    pool = [*template_set("imagenet80"), *template_set("cifar10"), *PHOTO_TEMPLATES[:-1], *held_in]
    return [(t, t in held_in) for t in dict.fromkeys(pool)]


def spread(rows: list[dict]) -> dict:
    """min / median / max of each measure over single-template rows."""
    out: dict = {"n": len(rows)}
    for key in ("top1", "top5", "t2i_p@10", "t2i_map"):
        values = np.asarray([r[key] for r in rows], float)
        out[key] = ({"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}
                    if len(values) else None)
    if rows:
        best = max(rows, key=lambda r: r["top1"])
        out["best"] = {"template": best["template"], "top1": best["top1"]}
    return out


def run(encoder, data_root: Path, per_class: int | None, descriptions: str | None, shots: tuple[int, ...],
        seed: int, search_alpha_beta: bool, batch_size: int, workers: int, progress: bool,
        learned: dict | None = None) -> dict:
    from retrieval.prompting.cupl import load_descriptions
    from retrieval.prompting.prompts import class_vectors
    from retrieval.tagging import evaluate, fewshot
    from retrieval.tagging.autotag import logit_scale
    from retrieval.tagging.labels import from_names

    dataset = test_split(data_root, per_class)
    labels = from_names(dataset.classes)
    features, encode_s = evaluate.encode_paths(encoder, dataset.paths, batch_size, workers, progress)
    scale = logit_scale(encoder)
    desc = load_descriptions(descriptions) if descriptions else None
    strategies = [("raw", "raw"), ("template", "template"), ("ensemble", "ensemble"),
                  ("ensemble:cifar10", "ensemble:cifar10"), ("search-default", "ensemble:photo")]
    if desc is not None:
        strategies += [("cupl", "cupl"), ("ensemble+cupl", "ensemble+cupl"),
                       ("ensemble:cifar10+cupl", "ensemble:cifar10+cupl")]
    rows, notes, template_matrix, search_matrix = [], [], None, None

    def score(name: str, strategy: str) -> dict:
        classes = class_vectors(encoder, labels, strategy, desc)
        notes.extend(f"{name}: {n}" for n in classes.notes)
        acc = evaluate.topk_accuracy(scale * (features @ classes.matrix.T), dataset.targets)
        t2i = text_to_image(features, dataset.targets, classes.matrix)
        return {"strategy": name, "spec": strategy, "top1": acc[1], "top5": acc[5],
                "t2i_p@10": t2i["p@10"], "t2i_map": t2i["map"], "texts": sum(classes.texts_per_label),
                "matrix": classes.matrix}

    for name, strategy in strategies:
        row = score(name, strategy)
        if name == "template":
            template_matrix = row["matrix"]
        if name == "search-default":
            search_matrix = row["matrix"]
        rows.append({k: v for k, v in row.items() if k != "matrix"})
    held_in = held_in_templates(encoder.spec)
    singles = []
    for template, trained in single_templates(held_in):
        row = score(template, f"template:{template}")
        singles.append({"template": template, "held_in": trained,
                        **{k: row[k] for k in ("top1", "top5", "t2i_p@10", "t2i_map")}})
    with tempfile.TemporaryDirectory(prefix="clipfind-quality-") as tmp:
        for n in shots:
            folder = make_shots(data_root, dataset.classes, n, seed, Path(tmp))
            cache = fewshot.build_cache(encoder, folder, labels)
            alpha, beta, how = fewshot.DEFAULT_ALPHA, fewshot.DEFAULT_BETA, "default"
            if search_alpha_beta and n > 1:
                found = fewshot.search_alpha_beta(cache, template_matrix, scale)
                alpha, beta, how = found["alpha"], found["beta"], "searched"
            logits = fewshot.tip_logits(features, template_matrix, scale, cache.keys, cache.targets, alpha, beta)
            acc = evaluate.topk_accuracy(logits, dataset.targets)
            rows.append({"strategy": f"template + tip-adapter ({n}-shot)", "spec": "template", "shots": n,
                         "alpha": alpha, "beta": beta, "alpha_beta": how, "top1": acc[1], "top5": acc[5],
                         "t2i_p@10": None, "t2i_map": None})
    learned_result = None
    if learned is not None:
        from bench.learned import run_learned

        learned_result = run_learned(encoder, data_root, dataset.classes, features, dataset.targets, template_matrix,
                                     search_matrix, scale, batch_size=batch_size, workers=workers,
                                     progress=progress, **learned)
    started = time.perf_counter()
    i2i = image_to_image(features, dataset.targets)
    return {
        "learned": learned_result,
        "model": encoder.spec.label,
        "spec": json.loads(encoder.spec.to_json()),
        "fingerprint": encoder.fingerprint,
        "precision": encoder.precision,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": str(data_root / "test"),
        "images": len(dataset.paths),
        "classes": dataset.classes,
        "chance_top1": 1 / len(dataset.classes),
        "chance_p@10": 1 / len(dataset.classes),
        "logit_scale": round(scale, 3),
        "encode_images_per_s": round(len(dataset.paths) / encode_s, 1),
        "shots_seed": seed,
        "results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "single_templates": {"held_in": spread([r for r in singles if r["held_in"]]),
                             "held_out": spread([r for r in singles if not r["held_in"]]),
                             "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                      for r in singles]},
        "image_to_image_p@10": round(i2i, 4),
        "image_to_image_seconds": round(time.perf_counter() - started, 2),
        "notes": notes,
    }


def table(result: dict) -> str:
    def cell(v) -> str:
        return "    —" if v is None else f"{v:.3f}"

    width = max(len("strategy"), *(len(r["strategy"]) for r in result["results"]))
    lines = [
        f"model: {result['model']}  (fingerprint {result['fingerprint'][:12]}, {result['precision']})",
        f"data:  {result['images']} photos of {result['data']}, {len(result['classes'])} classes "
        f"(chance top-1 and p@10 {result['chance_top1']:.2f}); {result['date']}",
        "",
        f"{'strategy':<{width}}  {'top-1':>6}  {'top-5':>6}  {'t→i p@10':>8}  {'t→i mAP':>7}",
    ]
    for r in result["results"]:
        extra = f"  alpha={r['alpha']:g} beta={r['beta']:g} ({r['alpha_beta']})" if "alpha" in r else ""
        lines.append(f"{r['strategy']:<{width}}  {r['top1']:>6.3f}  {r['top5']:>6.3f}  {cell(r['t2i_p@10']):>8}  "
                     f"{cell(r['t2i_map']):>7}{extra}")
    lines += ["", "single templates, each alone: min / median / max",
              f"{'':<{width}}  {'n':>3}  {'top-1':^23}  {'t→i p@10':^23}  {'t→i mAP':^23}"]
    for group, title in (("held_in", "held-in (training captions)"), ("held_out", "held-out (never a caption)")):
        sp = result["single_templates"][group]
        if not sp["n"]:
            continue
        cols = "  ".join(" / ".join(f"{sp[k][m]:.3f}" for m in ("min", "median", "max"))
                         for k in ("top1", "t2i_p@10", "t2i_map"))
        lines.append(f"{title:<{width}}  {sp['n']:>3}  {cols}  best {sp['best']['template']!r}")
    lines += ["", f"image→image p@10: {result['image_to_image_p@10']:.3f} "
                  f"(each of {result['images']} photos querying the others)"]
    if result.get("learned"):
        from bench.learned import learned_table

        lines += learned_table(result["learned"])
    lines += [f"note: {n}" for n in result["notes"]]
    if result.get("command"):
        lines.append(f"command: {result['command']}")
    return "\n".join(lines)


def save(result: dict, text: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    scope = "" if result["images"] >= 10_000 else f"-{result['images']}img"
    base = out_dir / f"quality-{result['fingerprint'][:12]}-{stamp}{scope}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    base.with_suffix(".txt").write_text(text + "\n")
    return base


@click.command(epilog=MODEL_HELP)
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding train/ and test/ (default: $CLIPFIND_DATA/cifar10 or ../shared/data/cifar10).")
@click.option("--per-class", type=click.IntRange(1), help="Only the first N test photos per class (quick runs).")
@click.option("--descriptions", help="CuPL descriptions JSON {label: [sentences]}, or `cifar10` (the bundled "
              "hand-written set): adds cupl and ensemble+cupl rows.")
@click.option("--test-model", type=click.Choice(TEST_MODELS), default="cifar10", show_default=True,
              help="Without a model option: which test model to train (or find cached) and score.")
@click.option("--shots", "shots_spec", default=",".join(map(str, DEFAULT_SHOTS)), show_default=True,
              help="Tip-Adapter rows: examples per class from the train split, comma-separated ('' for none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which train photos become the shots.")
@click.option("--search-alpha-beta", is_flag=True, help="Tip-Adapter alpha/beta by leave-one-out on the shots.")
@click.option("--learned", is_flag=True, help="Add the learned-from-examples tables (bench/learned.py): "
              "few-shot methods, concepts as search, the --until-irrelevant cut-off.")
@click.option("--learned-shots", default="1,2,4,8,16", show_default=True, help="Shot counts for --learned.")
@click.option("--draws", type=click.IntRange(1), default=3, show_default=True, help="Shot draws for --learned.")
@click.option("--quick", is_flag=True, help="With --learned: 1 draw, shots 1 and 16, smaller grids (minutes, not an hour).")
@click.option("--probe-lambda", type=float, help="Probe regularisation (default: retrieval.learn.probe's).")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True, help="Decode worker processes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
              show_default=True, help="Where the table is saved.")
@click.option("--no-save", is_flag=True, help="Print only; save nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@model_options
def main(data_root, per_class, descriptions, test_model, shots_spec, seed, search_alpha_beta, learned, learned_shots,
         draws, quick, probe_lambda, batch_size, workers, out_dir, no_save, as_json, **model_kwargs) -> None:
    """Zero-shot, few-shot and retrieval quality of a model on the CIFAR-10 test photos.

    Default model: the CIFAR-10 test model (tests.models.cifar, trained and cached on first use);
    --test-model cifar10-minilm: the one on the frozen MiniLM text tower (tests.models.minilm).
    """
    from retrieval.errors import ClipfindError
    from retrieval.model.encoder import Encoder, ModelSpec
    from retrieval.prompting.cupl import load_descriptions
    from tests.models import cifar as cifar_model
    from tests.models import minilm as minilm_model

    data_root = Path(data_root) if data_root else cifar_model.default_data_root()
    if not (data_root / "test").is_dir():
        raise click.UsageError(f"no CIFAR-10 test split under {data_root} (use --data or CLIPFIND_DATA)")
    try:
        shots = tuple(int(s) for s in shots_spec.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {shots_spec!r}", param_hint="--shots") from None
    if any(n < 1 for n in shots):
        raise click.BadParameter("shot counts must be at least 1", param_hint="--shots")
    if descriptions:
        try:
            load_descriptions(descriptions)
        except ClipfindError as exc:
            raise click.BadParameter(str(exc), param_hint="--descriptions") from None
    spec, device, precision = pop_model_options(model_kwargs)
    if spec is None:
        ensure = cifar_model.ensure_cifar_model if test_model == "cifar10" else minilm_model.ensure_minilm_model
        spec = ModelSpec(model_dir=str(ensure(log=lambda m: click.echo(m, err=True), data_root=data_root)))
    encoder = Encoder(spec, device=device, precision=precision)
    learned_options = None
    if learned:
        from retrieval.learn.probe import DEFAULT_LAMBDA

        learned_options = {"shot_counts": (1, 16) if quick else tuple(int(s) for s in learned_shots.split(",") if s.strip()),
                           "draws": 1 if quick else draws, "concept_ks": (1, 4, 16), "quick": quick,
                           "probe_lam": DEFAULT_LAMBDA if probe_lambda is None else probe_lambda,
                           "log": lambda m: click.echo(m, err=True)}
    result = run(encoder, data_root, per_class, descriptions, shots, seed, search_alpha_beta, batch_size,
                 workers, progress=sys.stderr.isatty(), learned=learned_options)
    result["command"] = " ".join(["bench/quality.py", *sys.argv[1:]])
    result["descriptions"] = descriptions
    text = table(result)
    if not no_save:
        result["saved_as"] = str(save(result, text, out_dir))
    click.echo(json.dumps(result) if as_json else text)
    if not no_save and not as_json:
        click.echo(f"\nsaved: {result['saved_as']}.{{json,txt}}", err=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
