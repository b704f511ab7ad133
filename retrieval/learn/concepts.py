"""`concept learn`: example files -> vectors -> a probe (or CoOp prompt) -> a stored concept.

Everything that can fail on bad input (name taken, no examples, unreadable
files, an unknown method) fails before the concept is written, and the write
is one row in one transaction: a failed learn leaves nothing behind.

Methods:
* `probe` (and `auto`): logistic regression over the vectors, pulled toward
  the --prompt's text vector (`retrieval.learn.probe`). Milliseconds.
* `coop`: the prompt's context words learned through the text tower
  (`retrieval.learn.coop`); the concept is the learned prompt's text vector.
  Seconds to minutes on a CPU, and it needs the model's own text transformer.
* `tip-f` learns label sets (`clipfind tag --shots DIR --train`), not single
  concepts: asked for here, it is a usage error that says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import InputError
from retrieval.learn import coop, probe
from retrieval.learn.examples import example_vectors, sample_negatives
from retrieval.store.concepts import ConceptRecord, concept_exists, save_concept
from retrieval.tagging.autotag import logit_scale

METHODS = ("auto", "probe", "coop", "tip-f")
FEW_POSITIVES = 4  # below this, without a --prompt, a probe mostly memorises its examples
SAME_PICTURE = 0.9999  # cosine above which two examples are the same picture for learning


@dataclass
class LearnResult:
    concept: ConceptRecord
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {**self.concept.to_dict(), "notes": self.notes, "seconds": round(self.seconds, 3)}


def _identical(vectors: np.ndarray) -> bool:
    return len(vectors) > 1 and float((vectors @ vectors[0]).min()) > SAME_PICTURE


def learn_concept(library, name: str, positive: list[str], negative: list[str] = (), prompt: str | None = None,
                  method: str = "auto", replace: bool = False, lam: float | None = None,
                  searcher=None) -> LearnResult:
    """Learn concept `name` from example files/folders and store it in `library`."""
    from retrieval.query.search import Searcher

    started = time.perf_counter()
    name = name.strip()
    if not name:
        raise InputError("a concept needs a name")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if method == "tip-f":
        raise InputError("tip-f learns a set of labels, not one concept: use `clipfind tag --labels FILE "
                         "--shots DIR --train`; for a concept use --method probe or coop")
    if not replace and concept_exists(library, name):
        raise InputError(f"a concept named {name!r} exists; choose another name, or --replace it")
    if not positive:
        raise InputError("no positive examples: give --positive FILE or FOLDER")
    if prompt is not None and not prompt.strip():
        raise InputError("--prompt is empty")
    searcher = searcher or Searcher(library)
    pos = example_vectors(searcher, list(positive), "positive")
    notes = list(pos.notes)
    if _identical(pos.vectors):
        notes.append(f"all {len(pos)} positive examples are the same picture; the concept is learned from one")
    if negative:
        neg = example_vectors(searcher, list(negative), "negative")
        notes.extend(neg.notes)
        negatives, negative_source = neg.vectors, "given"
    else:
        negatives = sample_negatives(library, {i for i in pos.ids if i is not None})
        negative_source = "sampled from the library"
    if len(negatives) == 0:
        raise InputError("no negative examples: the library holds only the positives; give --negative FILES")
    if len(pos) < FEW_POSITIVES and prompt is None:
        notes.append(f"only {len(pos)} positive example(s) and no --prompt: the concept may stick to these "
                     "pictures; a --prompt describing it gives it a prior")
    chosen = "probe" if method == "auto" else method
    text_vector, scale = None, 1.0
    warnings: list[str] = []
    if prompt is not None:
        text_vector = searcher.text_vectors([prompt.strip()], None, warnings)[0]
        scale = logit_scale(searcher.encoder())
    params: dict = {"positives": len(pos), "negatives": int(len(negatives)), "negative_source": negative_source,
                    "positive_paths": pos.paths[:100]}
    if chosen == "probe":
        fitted = probe.fit_probe(pos.vectors, negatives, text_vector, scale, lam)
        direction, weight_scale, bias = fitted.direction, fitted.scale, fitted.bias
        params.update(lam=lam if lam is not None else probe.DEFAULT_LAMBDA if prompt else probe.NO_PRIOR_LAMBDA,
                      prior_scale=scale if prompt else None, iterations=fitted.iterations)
    else:
        encoder = searcher.encoder()
        scale = logit_scale(encoder)
        result = coop.learn_prompts(encoder.model, encoder.tokenizer, [prompt.strip() if prompt else name],
                                    np.concatenate([pos.vectors, negatives]),
                                    np.r_[np.ones(len(pos)), np.zeros(len(negatives))], scale)
        direction, weight_scale, bias = result.text_vectors[0], scale, result.bias
        params.update(steps=result.steps, init=coop.DEFAULT_INIT, train_seconds=round(result.seconds, 3))
    record = ConceptRecord(name=name, method=chosen, direction=np.asarray(direction, np.float32),
                           scale=float(weight_scale), bias=float(bias),
                           fingerprint=str(searcher.record["fingerprint"]), prompt=prompt, params=params)
    save_concept(library, record, replace=replace)
    return LearnResult(record, notes + warnings, time.perf_counter() - started)
