"""What an image row's columns hold, and how to read them back, without SQLAlchemy.

Why apart from `schema`: a fresh query reads rows through stdlib sqlite3
(`retrieval.store.fast_read`) and must not import the ORM models (SQLAlchemy's
import is most of a fresh query's start-up), yet it decodes the same columns.
`schema` re-exports these, so writers and readers share one definition.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np

from retrieval.store.paths import path_from_db, path_to_db  # noqa: F401 - re-exported: one import for row columns

EMBEDDING_DTYPE = np.float32


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=EMBEDDING_DTYPE).tobytes()


def blobs_to_matrix(blobs: list[bytes], dim: int) -> np.ndarray:
    """Stack stored embeddings into one (n, dim) float32 matrix without per-row copies."""
    if not blobs:
        return np.zeros((0, dim), dtype=EMBEDDING_DTYPE)
    return np.frombuffer(b"".join(blobs), dtype=EMBEDDING_DTYPE).reshape(len(blobs), dim)


def datetime_from_db(value: datetime | str | None) -> datetime | None:
    """A DateTime column read with plain SQL: PostgreSQL's driver gives a datetime, SQLite the
    text SQLAlchemy stored ("2024-05-01 12:00:00.000000"), parsed as SQLAlchemy's own SQLite
    DateTime reads it back (`datetime.fromisoformat`)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)
