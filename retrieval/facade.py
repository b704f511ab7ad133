"""`from retrieval import Library`: one object that indexes, searches and tags, for Python users.

    from retrieval import Library, ModelSpec
    with Library.open("~/photos-index", model=ModelSpec(model_dir="...")) as lib:
        lib.index("~/Pictures")
        for hit in lib.search("a dog on a beach", k=5):
            print(hit.score, hit.path)
        lib.tag("animals.txt")

Why a subclass up here: the store's `Library` (directory, database, model
binding, runs) is what the indexer, the searcher and the tagger work on, so it
cannot call them itself without an import loop. This class sits above all
three and adds the convenience methods; everything else is the store's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from retrieval.model.spec import ModelSpec
from retrieval.query.search import search
from retrieval.query.types import SearchResponse
from retrieval.store import library as store

if TYPE_CHECKING:
    from retrieval.index.indexer import IndexResult
    from retrieval.learn.concepts import LearnResult
    from retrieval.tagging.autotag import TagResult


class Library(store.Library):
    """A library directory with `index`, `search` and `tag`; see `retrieval.store.library.Library`."""

    def index(self, paths: str | os.PathLike | Iterable[str | os.PathLike], model: ModelSpec | None = None,
              **options: Any) -> IndexResult:
        """Add the images under `paths` or bring them up to date; returns an `IndexResult`.

        `options`: `device`, `precision`, `ray` (a `retrieval.index.ray_pipeline.RayOptions`: decode
        and encode on Ray) and the fields of `retrieval.index.indexer.IndexOptions` (workers,
        batch_size, index_type, dry_run, ...). See `retrieval.index.indexer.index_paths`.
        """
        # Deferred: the indexer's encoding stage imports torch, and searching needs none of it.
        from retrieval.index.indexer import IndexOptions, index_paths

        device, precision = options.pop("device", "auto"), options.pop("precision", "auto")
        ray, make_stages = options.pop("ray", None), None
        if ray is not None:
            from retrieval.index.ray_engine import ray_stages

            make_stages = ray_stages(ray)
        roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        return index_paths(self, roots, model, device, precision, IndexOptions(**options), make_stages)

    def search(self, text: str | Iterable[str] = (), **options: Any) -> SearchResponse:
        """Text and/or image search; typed results. See `retrieval.query.search.search` for the options."""
        return search(self, text, **options)

    def tag(self, labels: Any, strategy: str = "template", **kwargs: Any) -> TagResult:
        """Auto-tag every stored vector; see `retrieval.tagging.autotag.auto_tag` for the options."""
        # Deferred: tagging imports torch, which a search answered from stored vectors never needs.
        from retrieval.tagging.autotag import auto_tag

        return auto_tag(self, labels, strategy, encoder=kwargs.pop("encoder", None) or self.encoder(), **kwargs)

    def learn_concept(self, name: str, positive: Iterable[str], **options: Any) -> LearnResult:
        """Learn and store concept `name` from example files or folders; search it with `search(concept=name)`.

        `options`: negative, prompt, method (auto|probe|coop), replace. See
        `retrieval.learn.concepts.learn_concept`.
        """
        from retrieval.learn.concepts import learn_concept

        return learn_concept(self, name, list(positive), **options)
