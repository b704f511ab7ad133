"""`clipfind tag --concepts`: every stored concept as a label, tagged from the stored vectors.

A concept is a direction with its own decision point (the cosine where its
probe's probability crosses 0.5), so this is a multi-label run with one
threshold per concept taken from the concept itself, not calibrated. Tag
scores are cosines to the concept's direction, as in any multi-label run.
Concepts learned with another model are left out with a note.
"""

from __future__ import annotations

import numpy as np

from retrieval.errors import InputError
from retrieval.store.concepts import list_concepts
from retrieval.tagging.autotag import Scorer, TagOptions, TagResult, tag_library

RUN_NAME = "concepts"


def tag_concepts(library, name: str = RUN_NAME, top_k: int | None = None, progress: bool = False,
                 wait: bool = False) -> TagResult:
    """Tag every image with every concept whose probability there is at least 0.5."""
    fingerprint = (library.model_record or {}).get("fingerprint")
    concepts = list_concepts(library)
    usable = [c for c in concepts if c.fingerprint == fingerprint]
    notes = [f"concept {c.name!r} was learned with another model; left out" for c in concepts if c not in usable]
    if not usable:
        raise InputError("no concepts to tag with (learn one: clipfind concept learn NAME FILES...)")
    scorer = Scorer([c.name for c in usable], np.stack([c.direction for c in usable]), 1.0)
    thresholds = np.array([c.threshold for c in usable], np.float32)
    params = {"concepts": {c.name: {"method": c.method, "threshold": c.threshold} for c in usable}}
    return tag_library(library, scorer, name, "concepts", TagOptions(top_k=top_k), params, progress, wait,
                       notes, thresholds=thresholds)
