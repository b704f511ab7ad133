"""Measure prompting: zero-shot top-1/top-5 per strategy, and text→image recall@k.

Evaluation encodes the dataset's images itself (it needs no library): a
DataLoader decodes with `images.open_image` and the model's own preprocess in
worker processes, the images are encoded once, and every strategy is scored
against the same image vectors, so the table compares prompts and nothing else.
A strategy's images/s is what a run with only that strategy would have
managed: the shared encoding time plus its own prompt encoding and scoring.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval.errors import InputError
from retrieval.media.images import ImageError, is_candidate, open_image
from retrieval.prompting.prompts import class_vectors
from retrieval.tagging import fewshot
from retrieval.tagging.autotag import logit_scale
from retrieval.tagging.labels import from_names


@dataclass
class Dataset:
    paths: list[str]
    targets: np.ndarray  # index into classes (zero-shot) or caption row -> image index (retrieval)
    classes: list[str]


def load_classification(spec: str | Path) -> Dataset:
    """An image folder (one sub-folder per class) or a CSV of path,label."""
    path = Path(spec).expanduser()
    if path.is_dir():
        pairs = _image_folder(path)
    elif path.is_file():
        pairs = _read_csv(path, "label")
    else:
        raise InputError(f"no dataset at {path} (an image folder with one sub-folder per class, or a CSV path,label)")
    if not pairs:
        raise InputError(f"dataset {path} has no images")
    classes = sorted({label for _, label in pairs})
    index = {c: i for i, c in enumerate(classes)}
    return Dataset([p for p, _ in pairs], np.array([index[lab] for _, lab in pairs]), classes)


def _image_folder(path: Path) -> list[tuple[str, str]]:
    """(file, class) pairs; a folder without class sub-folders, or an empty class, is an error."""
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = sum(1 for f in path.iterdir() if f.is_file() and is_candidate(os.fspath(f)))
        found = f"{loose} images but " if loose else ""
        raise InputError(f"dataset {path} has {found}no class sub-folders (an image folder needs one "
                         "sub-folder of images per class, or give a CSV of path,label)")
    pairs = []
    for folder in folders:
        files = [str(f) for f in sorted(folder.iterdir()) if f.is_file() and is_candidate(os.fspath(f))]
        if not files:
            raise InputError(f"class folder {folder} has no images; add some or remove the folder")
        pairs.extend((f, folder.name.replace("_", " ")) for f in files)
    return pairs


def load_captions(spec: str | Path) -> tuple[Dataset, list[str]]:
    """A CSV of path,caption: (unique images, caption i -> image index), captions."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"no captions file at {path} (a CSV with columns path,caption)")
    pairs = _read_csv(path, "caption")
    if not pairs:
        raise InputError(f"captions file {path} has no rows")
    order: dict[str, int] = {}
    for p, _ in pairs:
        order.setdefault(p, len(order))
    return Dataset(list(order), np.array([order[p] for p, _ in pairs]), []), [c for _, c in pairs]


def _read_csv(path: Path, second: str) -> list[tuple[str, str]]:
    """Rows of path,<second>; a header row is optional; relative paths are relative to the CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", second]:
        rows = rows[1:]
    out = []
    for lineno, row in enumerate(rows, start=1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"{path}: row {lineno} is not path,{second}: {','.join(row)[:80]!r}")
        file = Path(row[0].strip()).expanduser()
        out.append((str(file if file.is_absolute() else path.parent / file), row[1].strip()))
    return out


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], preprocess, size: int) -> None:
        self.paths, self.preprocess, self.size = paths, preprocess, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:  # errors cross the worker boundary as text: ImageError cannot be rebuilt there
            return self.preprocess(open_image(self.paths[i], draft_size=(self.size, self.size))), ""
        except ImageError as exc:
            return torch.zeros(0), str(exc)


def encode_paths(encoder, paths: list[str], batch_size: int = 64, workers: int = 0,
                 progress: bool = False) -> tuple[np.ndarray, float]:
    """Unit vectors of every image and the seconds it took (decode + encode)."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(
        _Images(paths, encoder.preprocess, encoder.image_size), batch_size=batch_size,
        num_workers=workers, collate_fn=list,
    )
    started = time.perf_counter()
    out = []
    with tqdm(total=len(paths), disable=not progress, unit="img", desc="encoding", leave=False) as bar:
        for batch in loader:
            bad = next((err for _, err in batch if err), None)
            if bad:
                raise InputError(f"cannot evaluate: {bad}")
            out.append(encoder.encode_pixels(torch.stack([t for t, _ in batch])))
            bar.update(len(batch))
    return np.concatenate(out), time.perf_counter() - started


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, ks=(1, 5)) -> dict[int, float]:
    order = np.argsort(-logits, axis=1, kind="stable")
    hits = order == targets[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def zeroshot(encoder, dataset: Dataset, strategies: list[str], labels: list | None = None,
             descriptions: dict | None = None, shots: str | None = None, alpha: float | None = None,
             beta: float | None = None, search: bool = False, batch_size: int = 64, workers: int = 0,
             progress: bool = False) -> dict:
    """Top-1/top-5 for each strategy (and each strategy + Tip-Adapter when `shots` is given)."""
    labels = _match_labels(dataset.classes, labels) if labels is not None else from_names(dataset.classes)
    features, encode_s = encode_paths(encoder, dataset.paths, batch_size, workers, progress)
    scale = logit_scale(encoder)
    n = len(dataset.paths)
    cache = fewshot.build_cache(encoder, shots, labels) if shots else None
    rows, notes = [], list(cache.notes) if cache else []
    for strategy in strategies:
        started = time.perf_counter()
        classes = class_vectors(encoder, labels, strategy, descriptions)
        logits = scale * (features @ classes.matrix.T)
        accuracy = topk_accuracy(logits, dataset.targets)
        own = time.perf_counter() - started
        notes.extend(f"{strategy}: {note}" for note in classes.notes)
        rows.append(_row(strategy, accuracy, n, encode_s + own, sum(classes.texts_per_label)))
        if cache is not None:
            started = time.perf_counter()
            a, b, how = alpha, beta, "given"
            if search:
                found = fewshot.search_alpha_beta(cache, classes.matrix, scale)
                a, b, how = found["alpha"], found["beta"], "searched"
            a = fewshot.DEFAULT_ALPHA if a is None else a
            b = fewshot.DEFAULT_BETA if b is None else b
            tip = fewshot.tip_logits(features, classes.matrix, scale, cache.keys, cache.targets, a, b)
            row = _row(f"{strategy} + tip-adapter", topk_accuracy(tip, dataset.targets), n,
                       encode_s + own + time.perf_counter() - started, sum(classes.texts_per_label))
            row.update({"alpha": a, "beta": b, "alpha_beta": how, "shots": len(cache.targets)})
            rows.append(row)
    return {"dataset": {"images": n, "classes": len(labels)}, "encode_images_per_s": round(n / encode_s, 1),
            "chance_top1": round(1 / len(labels), 4), "results": rows, "notes": notes}


def _row(strategy: str, accuracy: dict, n: int, seconds: float, texts: int) -> dict:
    return {"strategy": strategy, "top1": round(accuracy[1], 4), "top5": round(accuracy[5], 4),
            "images_per_s": round(n / seconds, 1), "texts": texts}


def _match_labels(classes: list[str], labels: list) -> list:
    """Order a label file to the dataset's classes; every class needs a label (synonyms count)."""
    by_name = {}
    for label in labels:
        for name in label.names:
            by_name.setdefault(name.replace("_", " ").casefold(), label)
    missing = [c for c in classes if c.casefold() not in by_name]
    if missing:
        raise InputError(f"the label set has no label for dataset classes: {', '.join(missing[:5])}")
    return [by_name[c.casefold()] for c in classes]


def retrieval(encoder, captions_csv: str | Path, batch_size: int = 64, workers: int = 0,
              ks=(1, 5, 10), progress: bool = False) -> dict:
    """Text→image recall@k: for each caption, is its own image among the k best?"""
    dataset, captions = load_captions(captions_csv)
    features, encode_s = encode_paths(encoder, dataset.paths, batch_size, workers, progress)
    started = time.perf_counter()
    queries = encoder.encode_texts(captions)
    sims = queries @ features.T
    own = sims[np.arange(len(captions)), dataset.targets]
    rank = (sims > own[:, None]).sum(axis=1)  # images strictly better than the right one
    recall = {f"recall@{k}": round(float((rank < k).mean()), 4) for k in ks}
    return {"images": len(dataset.paths), "captions": len(captions), **recall,
            "mean_rank": round(float(rank.mean() + 1), 2),
            "encode_images_per_s": round(len(dataset.paths) / encode_s, 1),
            "queries_per_s": round(len(captions) / (time.perf_counter() - started), 1)}
