"""What a query is and what it answers, as plain data: terms, filters, results.

Why a module of its own: the CLI parses flags into these and the server's
client sends them as JSON, neither of which needs numpy, SQLAlchemy, FAISS or
torch, so `clipfind search` talking to a warm server (and `clipfind --help`)
starts without importing any of them. Stdlib only.
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

from retrieval.errors import UsageError

DEFAULT_TEMPLATES = "photo"  # retrieval.prompting.prompts.PHOTO_TEMPLATES; see README for the measurement
NEGATIVE_WEIGHT = 0.5  # lambda in `retrieval.query.search`'s formula: how hard negative terms push
# A weight past this is a typo or an attack, not a preference: 1e39 overflows float32 to inf
# and the query to NaN, which used to come back as "no results". Ratios of 1000 are plenty.
MAX_WEIGHT = 1e3
_WEIGHT_SUFFIX = re.compile(r"^(?P<term>.*\S)\^(?P<weight>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)$")


# -- the query ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    kind: str  # "text", "image" or "concept" (a name from `clipfind concept learn`)
    value: str
    weight: float = 1.0

    def describe(self) -> str:
        shown = {"text": f'"{self.value}"', "concept": f"concept {self.value}"}.get(
            self.kind, f"image {os.path.basename(self.value)}")
        return shown if self.weight == 1.0 else f"{self.weight:g}×{shown}"


def check_weight(weight: float, what: str) -> float:
    """A finite weight within +-MAX_WEIGHT, else a usage error (exit 2) naming the term."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise UsageError(f"the weight of {what} must be a number, not {weight!r}") from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise UsageError(f"the weight of {what} is {weight!r}; use a finite number between "
                         f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    return value


def split_weight(term: str, default: float = 1.0) -> tuple[str, float]:
    """`beach^2` -> ("beach", 2.0): a Lucene-style per-term weight; plain terms get `default`."""
    match = _WEIGHT_SUFFIX.match(term)
    if match is None or os.path.exists(term):
        return term, default
    return match["term"], check_weight(float(match["weight"]), repr(match["term"]))


@dataclass
class Query:
    """What to look for. Image values should be absolute paths (the server has its own cwd)."""

    positive: list[Term] = field(default_factory=list)
    negative: list[Term] = field(default_factory=list)
    templates: tuple[str, ...] | None = None  # prompt templates ("a photo of {}."); None: texts as typed
    negative_weight: float = NEGATIVE_WEIGHT
    more_like: list[str] = field(default_factory=list)  # relevance feedback (Rocchio), absolute paths
    less_like: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, texts: str | Sequence[str] = (), images: str | Sequence[str] = (),
              not_texts: str | Sequence[str] = (), not_images: str | Sequence[str] = (),
              image_weight: float = 1.0, templates: str | Sequence[str] | None = DEFAULT_TEMPLATES,
              raw: bool = False, negative_weight: float = NEGATIVE_WEIGHT, concepts: str | Sequence[str] = (),
              more_like: str | Sequence[str] = (), less_like: str | Sequence[str] = ()) -> Query:
        """Terms from plain strings; `term^W` sets one term's weight (texts default 1, images `image_weight`).

        `templates` is a template set name or file (read here, so a server in another
        folder sees the same templates) or the templates themselves.
        """
        check_weight(image_weight, "--image terms")
        check_weight(negative_weight, "the negative terms")

        def terms(kind: str, values, default: float) -> list[Term]:
            values = [values] if isinstance(values, (str, os.PathLike)) else list(values or ())
            out = []
            for value in values:
                value, weight = split_weight(os.fspath(value), default)
                if kind == "image":
                    # image terms only: a text query does not import it
                    from retrieval.media.remote import is_url

                    value = value if is_url(value) else os.path.abspath(os.path.expanduser(value))
                out.append(Term(kind, value, weight))
            return out

        return cls(
            positive=terms("text", texts, 1.0) + terms("image", images, image_weight)
            + terms("concept", concepts, 1.0),
            negative=terms("text", not_texts, 1.0) + terms("image", not_images, 1.0),
            templates=None if raw or templates is None else _resolve_templates(templates),
            negative_weight=negative_weight,
            more_like=[t.value for t in terms("image", more_like, 1.0)],
            less_like=[t.value for t in terms("image", less_like, 1.0)],
        )

    def describe(self) -> str:
        out = " + ".join(t.describe() for t in self.positive)
        for term in self.negative:
            out += f" − {self.negative_weight:g}×{term.describe()}"
        if self.more_like or self.less_like:
            out += f" (more like {len(self.more_like)}, less like {len(self.less_like)})"
        return out.lstrip(" ")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Query:
        return cls(positive=[Term(**t) for t in data.get("positive", [])],
                   negative=[Term(**t) for t in data.get("negative", [])],
                   templates=tuple(data["templates"]) if data.get("templates") else None,
                   negative_weight=float(data.get("negative_weight", NEGATIVE_WEIGHT)),
                   more_like=list(data.get("more_like") or []), less_like=list(data.get("less_like") or []))


def _resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    from retrieval.prompting.templates import template_set

    return template_set(templates) if isinstance(templates, str) else tuple(templates)


@dataclass
class Filters:
    """Restrictions on which images may be returned; all of them must hold."""

    path: str | None = None  # a folder or file prefix, or a glob over the full path (* ? [...])
    after: datetime | None = None  # taken (EXIF) at or after, else file modified at or after
    before: datetime | None = None  # strictly before
    tags: tuple[str, ...] = ()  # every one of these tag labels
    min_score: float | None = None
    min_relevance: float | None = None  # calibrated relevance in [0, 1]; see retrieval.query.relevance
    until_irrelevant: bool = False  # stop the list where relevance falls below relevance.CUT

    @property
    def selects_rows(self) -> bool:
        return bool(self.path or self.after or self.before or self.tags)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("after", "before"):
            data[key] = data[key].isoformat() if data[key] else None
        data["tags"] = list(self.tags)
        return data

    @classmethod
    def from_dict(cls, data: dict | None) -> Filters:
        data = dict(data or {})
        for key in ("after", "before"):
            data[key] = datetime.fromisoformat(data[key]) if data.get(key) else None
        data["tags"] = tuple(data.get("tags") or ())
        data["until_irrelevant"] = bool(data.get("until_irrelevant"))
        return cls(**{k: data.get(k) for k in ("path", "after", "before", "tags", "min_score", "min_relevance",
                                               "until_irrelevant")})


def normalise_path_filter(value: str) -> str:
    """A relative path or glob is taken from the current folder, like any path on a command line;
    a URL prefix (`s3://bucket/photos`, `zip://photos::file:///x.zip`) is kept as it is."""
    from retrieval.media.remote import is_url  # path filters only

    value = os.path.expanduser(value)
    if value.startswith(("/", "*")) or is_url(value):
        return value
    return os.path.join(os.path.abspath("."), value)


# -- results -----------------------------------------------------------------------------
@dataclass
class SearchResult:
    rank: int
    score: float
    image_id: int
    path: str  # as `open()` wants it (undecodable bytes as surrogates)
    size: int
    width: int | None
    height: int | None
    taken_at: datetime | None
    relevance: float | None = None  # calibrated per query, in [0, 1]; see retrieval.query.relevance

    def to_dict(self) -> dict:
        """JSON-ready; a file name that is not UTF-8 shows as \\xNN and keeps its bytes in path_b64."""
        data = asdict(self)
        raw = os.fsencode(self.path)
        data["path"] = raw.decode("utf-8", "backslashreplace")
        if data["path"] != self.path:
            data["path_b64"] = base64.b64encode(raw).decode("ascii")
        data["score"] = round(float(self.score), 6)
        data["relevance"] = None if self.relevance is None else round(float(self.relevance), 4)
        data["taken_at"] = self.taken_at.isoformat() if self.taken_at else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SearchResult:
        data = dict(data)
        data["taken_at"] = datetime.fromisoformat(data["taken_at"]) if data.get("taken_at") else None
        if data.get("path_b64"):
            data["path"] = os.fsdecode(base64.b64decode(data["path_b64"]))
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


@dataclass
class SearchResponse:
    """Results plus what a person should know about them (warnings, model, timings in ms)."""

    results: list[SearchResult]
    query: str
    model: str = ""
    random_weights: bool = False
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    text_cache: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})
    library_size: int = 0

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index):
        return self.results[index]

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "results"}
        data["results"] = [r.to_dict() for r in self.results]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SearchResponse:
        data = dict(data)
        results = [SearchResult.from_dict(r) for r in data.pop("results", [])]
        return cls(results=results, **{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
