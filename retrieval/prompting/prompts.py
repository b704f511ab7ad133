"""Prompt templates and ensembles: how words become query and class vectors.

The CLIP paper's recipe: wrap a label in templates ("a photo of a {}."), encode
each, L2-normalise, average, re-normalise. open_clip ships the paper's 80
ImageNet templates and a 7-template subset; we use those lists as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import InputError
from retrieval.prompting.cupl import descriptions_for, load_descriptions

# The template sets live in a module without numpy (a query sent to a running server names
# one, and its client must stay light); re-exported here, where tests and benches look.
from retrieval.prompting.templates import PHOTO_TEMPLATES, SINGLE_TEMPLATE, template_set  # noqa: F401


def normalise(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def ensemble(embeddings: np.ndarray) -> np.ndarray:
    """Mean of unit vectors, re-normalised: the CLIP paper's prompt ensemble."""
    return normalise(normalise(embeddings).mean(axis=0))


def encode_prompted(encoder, phrases: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """One unit vector per phrase: the ensemble of the phrase in every template.

    All phrase×template texts go through the text tower in one batched call.
    """
    if not phrases:
        return np.zeros((0, encoder.embed_dim), np.float32)
    texts = [t.format(p) for p in phrases for t in templates]
    flat = encoder.encode_texts(texts).reshape(len(phrases), len(templates), -1)
    return np.stack([ensemble(group) for group in flat])


# -- strategies for class vectors (tagging, evaluation) --------------------------------
# A strategy is one or more parts joined by "+": `raw`, `template[:TEXT]`,
# `ensemble[:SET|FILE]`, `cupl[:FILE]`. A label's class vector is the ensemble
# (mean of unit vectors, re-normalised) of *every* text its parts produce for
# every name of the label (its synonyms included), so `ensemble+cupl` pools the
# 80 template sentences and the label's descriptions into one mean.
STRATEGY_KINDS = ("raw", "template", "ensemble", "cupl")
DEFAULT_STRATEGY = "template"


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy: template lists per part, and the descriptions file if any."""

    text: str
    templates: tuple[tuple[str, ...], ...]  # one tuple per raw/template/ensemble part
    cupl: bool = False
    descriptions_file: str | None = None

    @property
    def all_templates(self) -> tuple[str, ...]:
        return tuple(t for part in self.templates for t in part)


def parse_strategy(text: str) -> Strategy:
    """`template`, `ensemble:simple7`, `ensemble+cupl:desc.json`, ...; unknown parts are errors."""
    templates: list[tuple[str, ...]] = []
    cupl, descriptions_file = False, None
    parts = [p.strip() for p in text.split("+")]
    if not text.strip() or not all(parts):
        raise InputError(f"empty strategy part in {text!r} (use e.g. template, ensemble, ensemble+cupl)")
    for part in parts:
        kind, _, arg = part.partition(":")
        kind = kind.strip().lower()
        if kind == "raw":
            templates.append(("{}",))
        elif kind == "template":
            template = arg or SINGLE_TEMPLATE[0]
            if "{}" not in template:
                raise InputError(f"template {template!r} needs a {{}} placeholder for the label")
            templates.append((template,))
        elif kind == "ensemble":
            templates.append(template_set(arg or "imagenet80"))
        elif kind == "cupl":
            if cupl:
                raise InputError(f"strategy {text!r} names cupl twice")
            cupl, descriptions_file = True, arg or None
        else:
            raise InputError(f"unknown strategy part {kind!r} in {text!r} (parts: {', '.join(STRATEGY_KINDS)}, "
                             "joined with +)")
    return Strategy(text=text, templates=tuple(templates), cupl=cupl, descriptions_file=descriptions_file)


@dataclass
class ClassVectors:
    """Unit class vectors (one row per label) and what went into them."""

    labels: list[str]
    matrix: np.ndarray
    strategy: str
    texts_per_label: list[int]
    notes: list[str] = field(default_factory=list)


def label_texts(label, strategy: Strategy, descriptions: dict[str, list[str]] | None) -> tuple[list[str], bool]:
    """Every prompt text for one label under a strategy; True when CuPL had nothing for it."""
    texts = [t.format(name) for t in strategy.all_templates for name in label.names]
    missing = False
    if strategy.cupl:
        sentences = descriptions_for(descriptions or {}, label.names)
        missing = not sentences
        texts.extend(sentences)
        if missing and not strategy.templates:
            texts = [SINGLE_TEMPLATE[0].format(name) for name in label.names]
    return texts, missing


def class_vectors(encoder, labels: Sequence, strategy: str | Strategy,
                  descriptions: dict[str, list[str]] | None = None) -> ClassVectors:
    """The (labels × dim) class matrix of a strategy; `labels` are `retrieval.tagging.labels.Label`s.

    When every label is one name under the same template list (template,
    ensemble, raw), open_clip's own `build_zero_shot_classifier` builds it; with
    synonyms or descriptions the lists differ per label and we pool them here
    with the same arithmetic.
    """
    strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    if strategy.cupl and strategy.descriptions_file:
        descriptions = load_descriptions(strategy.descriptions_file)
    if strategy.cupl and descriptions is None:
        raise InputError(f"strategy {strategy.text!r} needs descriptions: --descriptions FILE or cupl:FILE")
    notes: list[str] = []
    per_label, missing = [], []
    for label in labels:
        texts, lacks = label_texts(label, strategy, descriptions)
        per_label.append(texts)
        if lacks:
            missing.append(label.name)
    if missing:
        fallback = "its templates only" if strategy.templates else f"the template {SINGLE_TEMPLATE[0]!r}"
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        notes.append(f"{len(missing)} of {len(per_label)} labels have no descriptions, so they use "
                     f"{fallback}: {shown}")
    long = _count_truncated(encoder, [t for texts in per_label for t in texts] if strategy.cupl else [])
    if long:
        notes.append(f"{long} prompt texts are longer than the model's {encoder.context_length}-token context "
                     "and were cut short")
    uniform = not strategy.cupl and all(len(label.names) == 1 for label in labels)
    if uniform and len(labels):
        matrix = _open_clip_classifier(encoder, [label.name for label in labels], strategy.all_templates)
    else:
        matrix = _pooled(encoder, per_label)
    return ClassVectors([label.name for label in labels], matrix, strategy.text,
                        [len(t) for t in per_label], notes)


def _open_clip_classifier(encoder, names: list[str], templates: Sequence[str]) -> np.ndarray:
    from open_clip import build_zero_shot_classifier

    per_batch = max(1, 1024 // len(templates))
    with encoder.autocast():
        weights = build_zero_shot_classifier(encoder.model, encoder.tokenizer, names, list(templates),
                                             num_classes_per_batch=per_batch, device=encoder.device)
    return normalise(weights.T.float().cpu().numpy())


def _pooled(encoder, per_label: list[list[str]]) -> np.ndarray:
    flat = [t for texts in per_label for t in texts]
    embeddings = encoder.encode_texts(flat)
    out, start = [], 0
    for texts in per_label:
        out.append(ensemble(embeddings[start:start + len(texts)]))
        start += len(texts)
    return np.stack(out) if out else np.zeros((0, encoder.embed_dim), np.float32)


def _count_truncated(encoder, texts: list[str]) -> int:
    limit = getattr(encoder, "context_length", 77)
    return sum(encoder.token_count(t) > limit for t in set(texts))
