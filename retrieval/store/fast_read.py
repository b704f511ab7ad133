"""A SQLite library opened for one query through stdlib sqlite3: no SQLAlchemy, no alembic.

Why: a fresh `clipfind search` spent 1.03 s of its 2.63 s importing, and
SQLAlchemy with the ORM models was half of that (`python -X importtime`, quiet
machine). A query needs only a few reads: the model record and identity, the
schema revision, the FAISS catch-up, the relevance background, filters and the
result rows (`retrieval.store.reads`, the same SQL either way). So
`open_for_query` opens a SQLite library with one read-only sqlite3 connection
(`QueryLibrary`) when that covers it, and otherwise `Library.open` as before:
PostgreSQL (`--db`, a folder's `database.json`), a schema that needs
migrating, a library without an identity or a model yet, or any error
reading those (the full path then says what is wrong in its own words). Past
opening, whatever `QueryLibrary` does not answer itself (the torch encoder, a
concept's worded refusal, anything that writes) goes to a full `Library`,
opened on first need: the fast path falls back, it never fails.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval import config
from retrieval.errors import LibraryError
from retrieval.store.binding import empty_library, model_mismatch, read_binding
from retrieval.store.integrity import check_pages_if_small
from retrieval.store.location import DB_NAME, POINTER_NAME
from retrieval.store.reads import SqliteReads, connect_sqlite
from retrieval.store.vectors import VectorIndex

if TYPE_CHECKING:
    from retrieval.model.spec import ModelSpec
    from retrieval.store.library import Library


class QueryLibrary:
    """What a query reads of a SQLite library, over one sqlite3 connection that cannot write.

    The model record and identity are read once, at open: it serves one query (a
    long-lived reader, the server, opens a `Library`). Any attribute it lacks is
    the full `Library`'s, opened by `open_full` on first use.
    """

    dialect = "sqlite"  # what `integrity` and `reads` ask first: answered without the full library

    def __init__(self, root: Path, conn: sqlite3.Connection, record: dict, identity: str,
                 open_full: Callable[[], Library]) -> None:
        self.root = root
        self.identity = identity
        self._conn = conn
        self._reads = SqliteReads(conn)
        self._record = record
        self._open_full = open_full
        self._full: Library | None = None
        self._vectors: VectorIndex | None = None

    @classmethod
    def open(cls, root: Path, open_full: Callable[[], Library]) -> QueryLibrary | None:
        """The SQLite library at `root`, or None when this path does not cover it (see the module
        docstring): the caller then opens a `Library`."""
        if config.database_url() or (root / POINTER_NAME).exists():
            return None  # PostgreSQL, or a --db that a SQLite folder refuses (Library.open words it)
        db_path = root / DB_NAME
        if not db_path.is_file():
            return None
        readonly = not (os.access(root, os.W_OK | os.X_OK) and os.access(db_path, os.W_OK))
        conn = None
        try:
            conn = connect_sqlite(db_path, readonly)
            binding = _read_binding(SqliteReads(conn), db_path)
        except (sqlite3.Error, LibraryError):  # damaged, locked, not a library: Library.open says which
            binding = None
        if binding is None:
            if conn is not None:
                conn.close()
            return None
        return cls(root, conn, *binding, open_full)

    # -- what a query asks ------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    @property
    def model_record(self) -> dict:
        return self._record

    @property
    def dim(self) -> int:
        return int(self._record["embed_dim"])

    def check_model_spec(self, spec: ModelSpec) -> None:
        mismatch = model_mismatch(self._record, spec)
        if mismatch is not None:
            raise mismatch

    def empty_error(self):
        return empty_library(self.root)

    @contextlib.contextmanager
    def reads(self) -> Iterator[SqliteReads]:
        yield self._reads

    def vectors(self, sync: bool = True) -> VectorIndex:
        """The FAISS index, caught up with the database (as `Library.vectors`)."""
        if self._vectors is None:
            self._vectors = VectorIndex(self.root, self.dim, self.identity, mapped=True)
        if sync:
            self._vectors.sync(self, reader=True)
        return self._vectors

    def encoder(self, spec: ModelSpec | None = None, device: str = "auto", precision: str = "auto"):
        """The torch encoder (a query that cannot use ONNX Runtime): the full library's."""
        return self.full.encoder(spec, device, precision)

    # -- everything else ----------------------------------------------------------------
    @property
    def full(self) -> Library:
        """The same library opened through SQLAlchemy, for what this view does not cover."""
        if self._full is None:
            self._full = self._open_full()
        return self._full

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never for our own fields (nor while they are being set)
            raise AttributeError(name)
        return getattr(self.full, name)

    def close(self) -> None:
        self._conn.close()
        if self._full is not None:
            self._full.close()

    def __enter__(self) -> QueryLibrary:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_binding(reads: SqliteReads, db_path: Path) -> tuple[dict, str] | None:
    """(model record, identity) when the database is current and bound, else None. A damaged
    small file raises DamagedDatabase (`check_pages_if_small`, as `Library.open` checks it)."""
    binding = read_binding(reads)
    if binding is not None:
        check_pages_if_small(reads, db_path)
    return binding


def open_for_query(path: str | os.PathLike | None, model: ModelSpec | None = None) -> QueryLibrary | Library:
    """The library `search`/`similar` read: a `QueryLibrary` where it covers the library, else
    `Library.open(create=False)`. Both refuse a `model` other than the recorded one."""
    root = config.library_path(path)

    def open_full() -> Library:
        from retrieval.store.library import Library

        return Library.open(root, create=False)

    library = QueryLibrary.open(root, open_full)
    if library is None:
        from retrieval.store.library import Library

        return Library.open(root, model=model, create=False)
    if model is not None:
        try:
            library.check_model_spec(model)
        except BaseException:
            library.close()
            raise
    return library
