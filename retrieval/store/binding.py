"""What a library is bound to, in words both ways of opening it share: its schema revision,
its identity key and its model.

Apart from `library` (SQLAlchemy) so that `fast_read` (stdlib sqlite3, for queries) checks
the same facts with the same messages without importing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import LibraryError
from retrieval.model.spec import ModelSpec

if TYPE_CHECKING:
    from retrieval.store.reads import Reads

# The newest migration (`retrieval/migrations/versions`; tests/test_migrations.py checks it is
# alembic's head). A database already there opens without importing alembic: 15 MB of a text
# query's peak RSS and ~0.1 s of its start-up.
SCHEMA_HEAD = "0002_concepts"
IDENTITY_KEY = "library_id"
MODEL_KEY = "model"


def model_mismatch(record: dict | None, spec: ModelSpec) -> LibraryError | None:
    """The refusal for a model spec other than the recorded one (None when they agree or no
    model is recorded yet), decided before anything is loaded."""
    if record is not None and record["spec"] != json.loads(spec.to_json()):
        return LibraryError(
            f"this library was made with {record['label']}, not {spec.label}; use that model, "
            "or another --library"
        )
    return None


def empty_library(root: Path) -> LibraryError:
    """The one error for "nothing indexed here yet", whichever command meets it (exit 4)."""
    return LibraryError(f"the library at {root} is empty: run `clipfind index FOLDER` first")


def read_binding(reads: Reads) -> tuple[dict, str] | None:
    """(model record, identity) of a library whose schema is current and whose model is recorded;
    None otherwise (a migration, an identity or a first model to write: `Library.open`'s work)."""
    if reads.scalar("SELECT version_num FROM alembic_version") != SCHEMA_HEAD:
        return None
    meta = dict(reads.all("SELECT key, value FROM meta WHERE key IN (:model, :identity)",
                          {"model": MODEL_KEY, "identity": IDENTITY_KEY}))
    record = json.loads(meta.get(MODEL_KEY, "null"))
    identity = json.loads(meta.get(IDENTITY_KEY, "null"))
    if not isinstance(record, dict) or identity is None:
        return None
    return record, str(identity)
