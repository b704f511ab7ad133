"""What a library is bound to, in words both ways of opening it share: its schema revision,
its identity key and its model.

Apart from `library` (SQLAlchemy) so that `fast_read` (stdlib sqlite3, for queries) checks
the same facts with the same messages without importing it.
"""

from __future__ import annotations

import json
from pathlib import Path

from retrieval.errors import LibraryError
from retrieval.model.spec import ModelSpec

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
