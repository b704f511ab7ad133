"""Auto-tagging: score every stored image vector against class vectors, write tags.

Tagging never decodes a pixel. It streams `images.embedding` out of SQLite in
large id-ordered chunks, multiplies each chunk with the (labels × dim) class
matrix, and keeps the best labels per image:

* single-label (default): softmax over the labels with the model's logit
  scale, as CLIP classifies; a tag's score is its probability; `top_k` best
  labels are kept, optionally only those with probability >= `threshold`.
* multi-label: each label is judged on its own; the score is the cosine
  similarity (plus the Tip-Adapter term / logit scale when shots are given)
  and an image gets every label whose score reaches that label's threshold:
  one `threshold` for all, or per-label thresholds calibrated on the library
  itself (`calibrate`, below).

Calibration needs no labelled data: the single-label decision (argmax) over the
whole library serves as pseudo-labels, and each label gets the threshold on its
own score that agrees best with them (maximum F1). Labels sit at different
offsets on the cosine scale (one prompt is just "closer" to everything than
another), so one global threshold over-tags some and never fires for others; a
per-label threshold fitted this way follows each label's offset and prevalence,
and still lets an image carry a second label it is as close to as that label's
own typical images.

A run is written in one transaction that first deletes the old run of the
same name, so readers see the old tags or the new ones, never a mixture, and
a failure or interrupt leaves the old run untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import delete, func, insert, select

from retrieval.errors import InputError, LibraryError
from retrieval.prompting.cupl import load_descriptions
from retrieval.prompting.prompts import class_vectors, parse_strategy
from retrieval.store.schema import EMBEDDING_DTYPE, Image, Tag, TagRun, path_from_db, utcnow
from retrieval.store.sql import driver_sql
from retrieval.tagging import fewshot
from retrieval.tagging.labels import label_set_name, load_labels

CHUNK = 32768  # vectors per matrix product: ~64 MB of 512-d floats, ~128 MB of logits at 1k labels
HIST_BINS = 2048  # calibration histogram over cosine [-1, 1]: 0.001 resolution
_SELECT_CHUNK = "SELECT id, embedding FROM images WHERE id > ? ORDER BY id LIMIT ?"
_INSERT_TAG = "INSERT INTO tags (tag_run_id, image_id, label, score, rank) VALUES (?, ?, ?, ?, ?)"


@dataclass
class TagOptions:
    top_k: int | None = None  # None: 1 in single-label mode, every passing label in multi-label
    threshold: float | None = None
    multi_label: bool = False
    calibrate: bool = False
    chunk: int = CHUNK

    def check(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise InputError("--top-k must be at least 1")
        if self.calibrate and self.threshold is not None:
            raise InputError("give --threshold or --calibrate, not both")
        if self.calibrate:
            self.multi_label = True
        if self.multi_label and self.threshold is None and not self.calibrate:
            self.calibrate = True
        if not self.multi_label and self.threshold is not None and not 0 <= self.threshold <= 1:
            raise InputError("in single-label mode --threshold is a probability between 0 and 1")


@dataclass
class Scorer:
    """Class matrix + logit scale (+ optional Tip-Adapter): logits for a chunk of unit vectors."""

    labels: list[str]
    class_matrix: np.ndarray
    logit_scale: float
    adapter: object | None = None  # retrieval.tagging.fewshot.TipAdapter
    _weights: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._weights = torch.from_numpy(np.ascontiguousarray(self.class_matrix, dtype=np.float32)).T.contiguous()

    @property
    def dim(self) -> int:
        return int(self.class_matrix.shape[1])

    def cosines(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._weights

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.cosines(x).mul_(self.logit_scale)  # in place: one (n, labels) buffer, not three
        if self.adapter is not None:
            logits.add_(self.adapter.logits(x))
        return logits

    def multi_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-label scores on the cosine scale: cos, plus the Tip-Adapter term / logit scale."""
        if self.adapter is None:
            return self.cosines(x)
        return self.logits(x) / self.logit_scale


def logit_scale(encoder) -> float:
    """CLIP's learned temperature: zero-shot logits are this times the cosine."""
    return float(encoder.model.logit_scale.detach().exp())


# -- reading stored vectors --------------------------------------------------------------
def iter_vectors(dbapi_conn, dim: int, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, unit vectors) of every stored image, `chunk` rows at a time, in id order.

    Keyset pagination on the primary key: each chunk is one indexed range scan,
    and memory stays at one chunk whatever the library's size.
    """
    last = -1
    row_bytes = dim * np.dtype(EMBEDDING_DTYPE).itemsize
    while True:
        rows = dbapi_conn.execute(driver_sql(dbapi_conn, _SELECT_CHUNK), (last, chunk)).fetchall()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        joined = bytearray().join([r[1] for r in rows])  # writable, so torch can wrap it without a copy
        if len(joined) != row_bytes * len(rows):
            bad = next(r[0] for r in rows if len(r[1]) != row_bytes)
            raise LibraryError(f"image {bad} has a stored vector that is not {dim}-dimensional float32; "
                               "run `clipfind verify`")
        yield ids, np.frombuffer(joined, dtype=EMBEDDING_DTYPE).reshape(len(rows), dim)
        last = int(ids[-1])


# -- choosing tags -----------------------------------------------------------------------
def select_tags(scorer: Scorer, x: np.ndarray, options: TagOptions,
                thresholds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, label index, score, rank) of the tags kept for a chunk, rank 1 = best per row."""
    xt = torch.from_numpy(np.ascontiguousarray(x))
    n, n_labels = x.shape[0], len(scorer.labels)
    if not options.multi_label:
        k = min(options.top_k or 1, n_labels)
        logits = scorer.logits(xt)
        top, idx = torch.topk(logits, k, dim=1)
        # Softmax normaliser in place (exp of logits minus the row max, summed): no second buffer.
        total = logits.sub_(top[:, :1]).exp_().sum(dim=1, keepdim=True)
        probs = (torch.exp(top - top[:, :1]) / total).numpy()
        rows = np.repeat(np.arange(n), k)
        ranks = np.tile(np.arange(1, k + 1), n)
        labels, scores = idx.numpy().reshape(-1), probs.reshape(-1)
        if options.threshold is not None:
            keep = scores >= options.threshold
            rows, labels, scores, ranks = rows[keep], labels[keep], scores[keep], ranks[keep]
        return rows, labels, scores, ranks
    scores_t = scorer.multi_scores(xt)
    if thresholds is None:
        thresholds = np.full(n_labels, options.threshold, np.float32)
    mask = scores_t >= torch.from_numpy(thresholds.astype(np.float32))[None, :]
    rows_t, labels_t = mask.nonzero(as_tuple=True)
    rows, labels = rows_t.numpy(), labels_t.numpy()
    scores = scores_t[rows_t, labels_t].numpy()
    order = np.lexsort((-scores, rows))
    rows, labels, scores = rows[order], labels[order], scores[order]
    starts = np.searchsorted(rows, rows, side="left")
    ranks = np.arange(len(rows)) - starts + 1
    if options.top_k is not None:
        keep = ranks <= options.top_k
        rows, labels, scores, ranks = rows[keep], labels[keep], scores[keep], ranks[keep]
    return rows, labels, scores, ranks


def calibrate(dbapi_conn, scorer: Scorer, chunk: int = CHUNK,
              tick: Callable[[int], None] | None = None) -> np.ndarray:
    """Per-label thresholds on the multi-label score that best reproduce the argmax labels (max F1).

    One streaming pass fills two histograms per label (all images, images whose
    argmax is the label); a threshold at each bin edge is then scored at once.
    A label that is nobody's argmax gets a threshold above every score.
    """
    n_labels = len(scorer.labels)
    size = n_labels * HIST_BINS
    hist_all = torch.zeros(size, dtype=torch.int64)
    hist_pos = torch.zeros(size, dtype=torch.int64)
    offsets = (torch.arange(n_labels) * HIST_BINS)[None, :]
    for _, x in iter_vectors(dbapi_conn, scorer.dim, chunk):
        s = scorer.multi_scores(torch.from_numpy(x))
        bins = score_bins(s) + offsets
        hist_all += torch.bincount(bins.reshape(-1), minlength=size)
        best = bins.gather(1, s.argmax(dim=1, keepdim=True))  # argmax of scores = argmax of logits
        hist_pos += torch.bincount(best.reshape(-1), minlength=size)
        if tick:
            tick(len(x))
    # Tags at threshold bin b: every count in bins >= b (suffix sums).
    predicted = hist_all.reshape(n_labels, HIST_BINS).flip(1).cumsum(1).flip(1).numpy()
    true_pos = hist_pos.reshape(n_labels, HIST_BINS).flip(1).cumsum(1).flip(1).numpy()
    positives = true_pos[:, :1]
    f1 = 2 * true_pos / np.maximum(predicted + positives, 1)
    best_bin = f1.argmax(axis=1)  # first maximum: the lowest threshold, the most recall
    thresholds = best_bin / (HIST_BINS / 2) - 1
    thresholds[positives[:, 0] == 0] = np.inf
    return thresholds.astype(np.float32)


def score_bins(scores: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each score: HIST_BINS equal bins over [-1, 1], scores outside clamped."""
    return ((scores.clamp(-1, 1 - 1e-6) + 1) * (HIST_BINS / 2)).long().clamp(0, HIST_BINS - 1)


# -- a whole run -------------------------------------------------------------------------
@dataclass
class TagResult:
    name: str
    run_id: int
    images: int
    tags: int
    seconds: float
    images_per_s: float
    strategy: str
    mode: str
    notes: list[str] = field(default_factory=list)
    thresholds: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def tag_library(library, scorer: Scorer, name: str, strategy: str, options: TagOptions,
                params: dict | None = None, progress: bool = True, wait: bool = False,
                notes: list[str] | None = None, thresholds: np.ndarray | None = None) -> TagResult:
    """Score every stored vector and replace the tag run `name` atomically.

    `thresholds` (multi-label, one per label on the score scale) are used as given
    instead of being calibrated: learned concepts bring their own.
    """
    if thresholds is None:
        options.check()
    else:
        options.multi_label, options.calibrate, options.threshold = True, False, None
    if not name.strip():
        raise InputError("a tag run needs a name (--name)")
    n_images = library.image_count()
    if n_images == 0:
        raise library.empty_error()
    if library.dim != scorer.dim:
        raise LibraryError(f"class vectors are {scorer.dim}-d but the library's vectors are {library.dim}-d")
    started = time.perf_counter()
    with library.write_lock(wait=wait):
        with _bar(n_images * (2 if options.calibrate else 1), progress) as bar:
            if options.calibrate:
                with library.engine.connect() as conn:
                    thresholds = calibrate(conn.connection.dbapi_connection, scorer, options.chunk,
                                           bar.update)
            run_id, n_tags, n_seen = _write_run(library, scorer, name, strategy, options, params or {},
                                                thresholds, bar.update)
    seconds = time.perf_counter() - started
    return TagResult(
        name=name, run_id=run_id, images=n_seen, tags=n_tags, seconds=round(seconds, 3),
        images_per_s=round(n_seen / seconds, 1) if seconds else 0.0, strategy=strategy,
        mode="multi-label" if options.multi_label else "single-label", notes=list(notes or []),
        thresholds=None if thresholds is None else _finite(dict(zip(scorer.labels, map(float, thresholds)))),
    )


def _write_run(library, scorer: Scorer, name: str, strategy: str, options: TagOptions, params: dict,
               thresholds: np.ndarray | None, tick: Callable[[int], None]) -> tuple[int, int, int]:
    """One transaction: drop the old run of this name, insert the new run and all its tags."""
    labels = np.array(scorer.labels, dtype=object)
    run_params = {**params, "top_k": options.top_k, "threshold": options.threshold,
                  "multi_label": options.multi_label, "calibrate": options.calibrate,
                  "logit_scale": scorer.logit_scale}
    if thresholds is not None:
        run_params["thresholds"] = _finite(dict(zip(scorer.labels, map(float, thresholds))))
    n_tags = n_seen = 0
    with library.engine.begin() as conn:
        # The first DELETE opens the write transaction; everything read after it is one snapshot.
        old = select(TagRun.id).where(TagRun.name == name).scalar_subquery()
        conn.execute(delete(Tag).where(Tag.tag_run_id == old))
        conn.execute(delete(TagRun).where(TagRun.name == name))
        run_id = conn.execute(insert(TagRun).values(
            name=name, strategy=strategy, labels=list(scorer.labels), params=run_params, created_at=utcnow(),
        )).inserted_primary_key[0]
        raw = conn.connection.dbapi_connection
        for ids, x in iter_vectors(raw, scorer.dim, options.chunk):
            rows, label_idx, scores, ranks = select_tags(scorer, x, options, thresholds)
            raw.cursor().executemany(driver_sql(raw, _INSERT_TAG), zip([run_id] * len(rows), ids[rows].tolist(), labels[label_idx].tolist(),
                                             scores.astype(float).tolist(), ranks.tolist()))
            n_tags += len(rows)
            n_seen += len(ids)
            tick(len(ids))
    return run_id, n_tags, n_seen


def _finite(thresholds: dict[str, float]) -> dict[str, float | None]:
    """JSON has no infinity: a label that can never be tagged shows as null."""
    return {k: (v if np.isfinite(v) else None) for k, v in thresholds.items()}


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", unit_scale=True, desc="tagging",
                leave=False, mininterval=0.5)


# -- reading tags back -------------------------------------------------------------------
def list_runs(library) -> list[dict]:
    with library.session() as s:
        counts = dict(s.execute(select(Tag.tag_run_id, func.count(Tag.id)).group_by(Tag.tag_run_id)).all())
        return [{"name": r.name, "id": r.id, "strategy": r.strategy, "labels": len(r.labels),
                 "tags": counts.get(r.id, 0), "created_at": r.created_at, "params": r.params}
                for r in s.scalars(select(TagRun).order_by(TagRun.name))]


def query_tags(library, run: str | None = None, label: str | None = None,
               limit: int | None = None) -> Iterator[dict]:
    """Tags joined with their image paths, best first per image, optionally filtered."""
    query = (select(TagRun.name, Image.id, Image.path, Image.path_bytes, Tag.label, Tag.score, Tag.rank)
             .join(Tag, Tag.tag_run_id == TagRun.id).join(Image, Image.id == Tag.image_id)
             .order_by(TagRun.name, Image.id, Tag.rank))
    if run is not None:
        query = query.where(TagRun.name == run)
    if label is not None:
        query = query.where(Tag.label == label)
    if limit is not None:
        query = query.limit(limit)
    with library.session() as s:
        if run is not None and s.scalar(select(TagRun.id).where(TagRun.name == run)) is None:
            known = ", ".join(r for r in s.scalars(select(TagRun.name))) or "none yet"
            raise InputError(f"no tag run named {run!r} (runs: {known})")
        for name, image_id, path, path_bytes, tag_label, score, rank in s.execute(query):
            yield {"run": name, "image_id": image_id, "path": path_from_db(path, path_bytes),
                   "label": tag_label, "score": score, "rank": rank}


# -- the whole recipe: labels + strategy (+ shots) -> tags ---------------------------------
def auto_tag(library, labels, strategy: str = "template", *, name: str | None = None,
             descriptions: str | dict | None = None, shots: str | None = None, alpha: float | None = None,
             beta: float | None = None, search_alpha_beta: bool = False, options: TagOptions | None = None,
             encoder=None, progress: bool = False, wait: bool = False, train: bool = False) -> TagResult:
    """Build class vectors for `labels` (a label file, built-in set name or Label list) and tag the library.

    Everything that can fail on bad input (labels, descriptions, shots) fails
    before the first write, so a bad run leaves the tag tables as they were.
    `train` fine-tunes the shots' cache keys (Tip-Adapter-F, `retrieval.tagging.tipf`).
    """
    options = options or TagOptions()
    options.check()
    if isinstance(labels, (str, bytes)) or hasattr(labels, "__fspath__"):
        name = name or label_set_name(labels)
        labels = load_labels(labels)
    if not name:
        raise InputError("a tag run needs a name when labels are given as a list")
    parse_strategy(strategy)  # fail on a bad strategy before loading anything heavy
    if isinstance(descriptions, (str, Path)):
        descriptions = load_descriptions(descriptions)
    encoder = encoder or library.encoder()
    classes = class_vectors(encoder, labels, strategy, descriptions)
    scale = logit_scale(encoder)
    notes = list(classes.notes)
    params: dict = {"texts_per_label": sum(classes.texts_per_label)}
    adapter = None
    if train and not shots:
        raise InputError("--train fine-tunes the example cache: give --shots DIR too")
    if shots:
        cache = fewshot.build_cache(encoder, shots, labels)
        notes.extend(cache.notes)
        if search_alpha_beta:
            found = fewshot.search_alpha_beta(cache, classes.matrix, scale)
            alpha = found["alpha"] if alpha is None else alpha
            beta = found["beta"] if beta is None else beta
            params["alpha_beta_search"] = {k: found[k] for k in ("alpha", "beta", "accuracy", "zero_shot_accuracy")}
        if train:  # after the search, on the raw cache: searching again on tuned keys would reuse the shots
            from retrieval.tagging.tipf import fine_tuned_cache

            cache, tuned = fine_tuned_cache(cache, classes.matrix, scale,
                                            fewshot.DEFAULT_ALPHA if alpha is None else alpha,
                                            fewshot.DEFAULT_BETA if beta is None else beta)
            params["tip_adapter_f"] = {"epochs": tuned.epochs, "loss": round(tuned.loss, 4),
                                       "seconds": round(tuned.seconds, 3)}
        adapter = fewshot.TipAdapter(cache, fewshot.DEFAULT_ALPHA if alpha is None else alpha,
                                     fewshot.DEFAULT_BETA if beta is None else beta)
        params["tip_adapter"] = {**adapter.describe(), "shots_dir": str(shots)}
    scorer = Scorer(classes.labels, classes.matrix, scale, adapter)
    return tag_library(library, scorer, name, strategy, options, params, progress, wait, notes)
