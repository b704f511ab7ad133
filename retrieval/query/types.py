"""What a query is and what it answers, as plain data: terms, filters, results.

Why a module of its own: the CLI parses flags into these and the server's
client sends them as JSON, neither of which needs numpy, SQLAlchemy, FAISS or
torch, so `clipfind search` talking to a warm server (and `clipfind --help`)
starts without importing any of them. Stdlib only.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

DEFAULT_TEMPLATES = "photo"  # retrieval.prompting.prompts.PHOTO_TEMPLATES; see README for the measurement
NEGATIVE_WEIGHT = 0.5  # lambda in `retrieval.query.search`'s formula: how hard negative terms push
_WEIGHT_SUFFIX = re.compile(r"^(?P<term>.*\S)\^(?P<weight>[0-9]*\.?[0-9]+)$")


# -- the query ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    kind: str  # "text" or "image"
    value: str
    weight: float = 1.0

    def describe(self) -> str:
        shown = f'"{self.value}"' if self.kind == "text" else f"image {os.path.basename(self.value)}"
        return shown if self.weight == 1.0 else f"{self.weight:g}×{shown}"


def split_weight(term: str, default: float = 1.0) -> tuple[str, float]:
    """`beach^2` -> ("beach", 2.0): a Lucene-style per-term weight; plain terms get `default`."""
    match = _WEIGHT_SUFFIX.match(term)
    if match is None or os.path.exists(term):
        return term, default
    return match["term"], float(match["weight"])


@dataclass
class Query:
    """What to look for. Image values should be absolute paths (the server has its own cwd)."""

    positive: list[Term] = field(default_factory=list)
    negative: list[Term] = field(default_factory=list)
    templates: tuple[str, ...] | None = None  # prompt templates ("a photo of {}."); None: texts as typed
    negative_weight: float = NEGATIVE_WEIGHT

    @classmethod
    def build(cls, texts: str | Sequence[str] = (), images: str | Sequence[str] = (),
              not_texts: str | Sequence[str] = (), not_images: str | Sequence[str] = (),
              image_weight: float = 1.0, templates: str | Sequence[str] | None = DEFAULT_TEMPLATES,
              raw: bool = False, negative_weight: float = NEGATIVE_WEIGHT) -> Query:
        """Terms from plain strings; `term^W` sets one term's weight (texts default 1, images `image_weight`).

        `templates` is a template set name or file (read here, so a server in another
        folder sees the same templates) or the templates themselves.
        """
        def terms(kind: str, values, default: float) -> list[Term]:
            values = [values] if isinstance(values, (str, os.PathLike)) else list(values or ())
            out = []
            for value in values:
                value, weight = split_weight(os.fspath(value), default)
                if kind == "image":
                    value = os.path.abspath(os.path.expanduser(value))
                out.append(Term(kind, value, weight))
            return out

        return cls(
            positive=terms("text", texts, 1.0) + terms("image", images, image_weight),
            negative=terms("text", not_texts, 1.0) + terms("image", not_images, 1.0),
            templates=None if raw or templates is None else _resolve_templates(templates),
            negative_weight=negative_weight,
        )

    def describe(self) -> str:
        out = " + ".join(t.describe() for t in self.positive)
        for term in self.negative:
            out += f" − {self.negative_weight:g}×{term.describe()}"
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Query:
        return cls(positive=[Term(**t) for t in data.get("positive", [])],
                   negative=[Term(**t) for t in data.get("negative", [])],
                   templates=tuple(data["templates"]) if data.get("templates") else None,
                   negative_weight=float(data.get("negative_weight", NEGATIVE_WEIGHT)))


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
        return cls(**{k: data.get(k) for k in ("path", "after", "before", "tags", "min_score")})


def normalise_path_filter(value: str) -> str:
    """A relative path or glob is taken from the current folder, like any path on a command line."""
    value = os.path.expanduser(value)
    if value.startswith(("/", "*")):
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

    def to_dict(self) -> dict:
        """JSON-ready; a file name that is not UTF-8 shows as \\xNN and keeps its bytes in path_b64."""
        data = asdict(self)
        raw = os.fsencode(self.path)
        data["path"] = raw.decode("utf-8", "backslashreplace")
        if data["path"] != self.path:
            data["path_b64"] = base64.b64encode(raw).decode("ascii")
        data["score"] = round(float(self.score), 6)
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
