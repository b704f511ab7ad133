"""Stored concepts: save, read back, list and remove, always checked against the library's model.

A concept is a direction in one model's embedding space; with any other
weights it points at nothing in particular. So reading one back compares its
fingerprint with the library's model and refuses a mismatch (exit 4), and
saving one refuses a name that exists unless the caller asks to replace it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from retrieval.errors import InputError, LibraryError
from retrieval.store.reads import reading
from retrieval.store.schema import Concept, blobs_to_matrix, utcnow, vector_to_blob


@dataclass
class ConceptRecord:
    """What a learned concept is: sigmoid(scale * cos(direction, image) + bias) = P(image shows it)."""

    name: str
    method: str
    direction: np.ndarray
    scale: float
    bias: float
    fingerprint: str
    prompt: str | None = None
    params: dict = field(default_factory=dict)
    created_at: datetime | None = None

    @property
    def threshold(self) -> float:
        """The cosine at which the probability crosses 0.5."""
        return -self.bias / self.scale

    def probability(self, cosines: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.scale * np.asarray(cosines, np.float64) + self.bias)))

    def to_dict(self, with_vector: bool = False) -> dict:
        data = {"name": self.name, "method": self.method, "scale": round(self.scale, 6),
                "bias": round(self.bias, 6), "threshold": round(self.threshold, 6),
                "fingerprint": self.fingerprint, "prompt": self.prompt, "params": self.params,
                "created_at": self.created_at.isoformat() if self.created_at else None}
        if with_vector:
            data["direction"] = [round(float(v), 7) for v in self.direction]
        return data


def _check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise InputError("a concept needs a name")
    return name


def _record(row: Concept) -> ConceptRecord:
    return ConceptRecord(name=row.name, method=row.method,
                         direction=blobs_to_matrix([row.direction], row.embed_dim)[0].copy(),
                         scale=row.scale, bias=row.bias, fingerprint=row.fingerprint, prompt=row.prompt,
                         params=dict(row.params or {}), created_at=row.created_at)


def _library_fingerprint(library) -> str:
    record = library.model_record
    if record is None:
        raise LibraryError(f"the library at {library.root} has no model yet; index some images first")
    return str(record["fingerprint"])


def save_concept(library, concept: ConceptRecord, replace: bool = False) -> None:
    """Write one concept in one transaction; an existing name is an error unless `replace`."""
    name = _check_name(concept.name)
    if concept.fingerprint != _library_fingerprint(library):
        raise LibraryError(f"concept {name!r} was learned with other weights than this library's model")
    row = Concept(name=name, method=concept.method, fingerprint=concept.fingerprint,
                  embed_dim=int(concept.direction.shape[0]), direction=vector_to_blob(concept.direction),
                  scale=float(concept.scale), bias=float(concept.bias), prompt=concept.prompt,
                  params=concept.params, created_at=utcnow())
    concept.created_at = row.created_at
    try:
        with library.session() as s, s.begin():
            if replace:
                s.execute(delete(Concept).where(Concept.name == name))
            s.add(row)
    except IntegrityError:
        raise InputError(f"a concept named {name!r} exists; choose another name, or --replace it") from None


def concept_exists(library, name: str) -> bool:
    with library.session() as s:
        return s.scalar(select(Concept.id).where(Concept.name == name.strip())) is not None


def load_concept(library, name: str, fingerprint: str | None = None) -> ConceptRecord:
    """The concept `name`, refused (exit 4) if the library's model is not the one that learned it.

    `fingerprint`: the library's model fingerprint when the caller already holds it (a warm
    Searcher does), which saves reading the model record again on every query.
    """
    name = _check_name(name)
    with library.session() as s:
        row = s.scalar(select(Concept).where(Concept.name == name))
        if row is None:
            known = ", ".join(s.scalars(select(Concept.name).order_by(Concept.name))) or "none yet"
            raise InputError(f"no concept named {name!r} (concepts: {known})")
    record = _record(row)
    if record.fingerprint != (fingerprint or _library_fingerprint(library)):
        raise LibraryError(f"concept {name!r} was learned with other weights (fingerprint "
                           f"{record.fingerprint[:12]}) than this library's model; learn it again")
    return record


def list_concepts(library) -> list[ConceptRecord]:
    """Every stored concept, by name (including any from another model: `list` shows them all)."""
    with library.session() as s:
        return [_record(row) for row in s.scalars(select(Concept).order_by(Concept.name))]


def remove_concept(library, name: str) -> None:
    name = _check_name(name)
    with library.session() as s, s.begin():
        if s.execute(delete(Concept).where(Concept.name == name)).rowcount == 0:
            raise InputError(f"no concept named {name!r}")


def concept_direction(library, name: str, fingerprint: str) -> np.ndarray:
    """Only a concept's unit direction, for a query: one plain SELECT (no ORM session).

    A warm query pays for this on every search with --concept; errors (no such concept,
    another model's concept) are left to `load_concept`, which words them.
    """
    with reading(library) as reads:
        row = reads.first("SELECT direction, embed_dim, fingerprint FROM concepts WHERE name = :name",
                          {"name": name.strip()})
    if row is None or row[2] != fingerprint:
        return load_concept(library, name, fingerprint).direction  # raises the worded error
    return blobs_to_matrix([row[0]], row[1])[0].copy()
