"""Request bodies of the JSON API, as pydantic models: wrong types are a 400, never a 500.

They mirror `retrieval.query.search.Query` / `Filters` (what the CLI's client
sends) and the shorthand `{"text": ..., "k": ...}`; `to_query` / `to_filters`
turn them into those dataclasses. Numbers must be finite, lists are bounded,
so a hostile body is refused before any work is done.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_K = 1000
MAX_TERMS = 32
MAX_TEXT = 1000
# Weights beyond this are a typo, and overflow float32 on the way to NaN (issue 15 item 6).
MAX_WEIGHT = 1e6

Text = Annotated[str, Field(max_length=MAX_TEXT)]
RowId = Annotated[int, Field(ge=1, le=2**62)]  # an SQLite rowid (bigger ints overflow the driver)
Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)]
TextList = Annotated[list[Text], Field(max_length=MAX_TERMS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TermModel(_Strict):
    kind: Literal["text", "image", "concept"]
    value: Text
    weight: Weight = 1.0


class QueryModel(_Strict):
    """`retrieval.query.search.Query.to_dict()`, as the CLI sends it."""

    positive: Annotated[list[TermModel], Field(max_length=MAX_TERMS)] = []
    negative: Annotated[list[TermModel], Field(max_length=MAX_TERMS)] = []
    templates: Annotated[list[Annotated[str, Field(max_length=500)]], Field(min_length=1, max_length=200)] | None = None
    negative_weight: Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)] = 0.5
    more_like: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=MAX_TERMS)] = []
    less_like: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=MAX_TERMS)] = []


class FiltersModel(_Strict):
    """`retrieval.query.search.Filters.to_dict()`: all must hold."""

    path: Annotated[str, Field(max_length=4096)] | None = None
    after: datetime | None = None
    before: datetime | None = None
    tags: Annotated[list[Text], Field(max_length=MAX_TERMS)] = []
    min_score: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] | None = None
    min_relevance: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    until_irrelevant: bool = False

    def to_filters(self):
        from retrieval.query.types import Filters

        return Filters(path=self.path, after=self.after, before=self.before, tags=tuple(self.tags),
                       min_score=self.min_score, min_relevance=self.min_relevance,
                       until_irrelevant=self.until_irrelevant)


class SearchRequest(_Strict):
    """Either `query` (the full form) or the shorthand fields `text`, `image`, `not`, `not_image`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    query: QueryModel | None = None
    text: Text | TextList | None = None
    image: Text | TextList | None = None
    not_: Text | TextList | None = Field(None, alias="not")
    not_image: Text | TextList | None = None
    raw: bool = False
    # A set name or the templates themselves; never a file name (that would read the server's files).
    template: Literal["single", "photo", "simple7", "imagenet80"] | Annotated[
        list[Annotated[str, Field(max_length=500)]], Field(min_length=1, max_length=200)] | None = None
    filters: FiltersModel | None = None
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 10

    def to_query(self):
        from retrieval.query.types import DEFAULT_TEMPLATES, Query, Term

        if self.query is not None:
            q = self.query
            return Query(positive=[Term(t.kind, t.value, t.weight) for t in q.positive],
                         negative=[Term(t.kind, t.value, t.weight) for t in q.negative],
                         templates=tuple(q.templates) if q.templates else None,
                         negative_weight=q.negative_weight, more_like=list(q.more_like),
                         less_like=list(q.less_like))
        return Query.build(self.text or (), self.image or (), self.not_ or (), self.not_image or (),
                           raw=self.raw, templates=self.template or DEFAULT_TEMPLATES)


class SimilarRequest(_Strict):
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    filters: FiltersModel | None = None
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 10


class JobRequest(_Strict):
    """Start an index run over `folders`, or a tagging run from the labels file `labels`."""

    folders: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(max_length=64)] = []
    labels: Annotated[str, Field(max_length=4096)] | None = None
