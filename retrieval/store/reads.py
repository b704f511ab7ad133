"""Plain-SQL reads that run the same over stdlib sqlite3 and over SQLAlchemy.

Why: a fresh `clipfind search` on a SQLite library reads a handful of rows, and
importing SQLAlchemy to do it cost 0.36 s of the query's 0.4 s budget (with
the ORM models, 0.5 s; `python -X importtime`). So the reads a query makes (the
FAISS catch-up, the relevance background, filters, result rows) are written
once, as SQL with `:name` parameters, which both sqlite3 and SQLAlchemy's
`text()` bind, and run over either: a `SqliteReads` on the query path's own
connection (`retrieval.store.fast_read`), an `EngineReads` everywhere else
(PostgreSQL, writers, the server).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

Params = Mapping[str, Any] | None


class Reads:
    """Read-only statements over one connection; `dialect` is "sqlite" or "postgresql"."""

    dialect = "sqlite"

    def _execute(self, sql: str, params: Params):
        raise NotImplementedError

    def all(self, sql: str, params: Params = None) -> list[tuple]:
        return [tuple(row) for row in self._execute(sql, params)]

    def first(self, sql: str, params: Params = None) -> tuple | None:
        row = self._execute(sql, params).fetchone()
        return None if row is None else tuple(row)

    def scalar(self, sql: str, params: Params = None) -> Any:
        """The first column of the first row (None when there is no row)."""
        row = self.first(sql, params)
        return None if row is None else row[0]

    def column(self, sql: str, params: Params = None) -> list:
        """The first column of every row."""
        return [row[0] for row in self._execute(sql, params)]

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Reads]:
        """Every statement in the block sees one committed state, however many commits a writer
        makes meanwhile. Without it each SELECT saw the newest commit, so a searcher catching up
        from the change log found the row count ahead of the log it had read, and rebuilt the
        whole index on every query while an index run was writing (bench/store_engines.py)."""
        yield self


class SqliteReads(Reads):
    """Over a stdlib sqlite3 connection (it binds `:name` itself)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def _execute(self, sql: str, params: Params):
        return self.conn.execute(sql, dict(params or {}))

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Reads]:
        if self.conn.in_transaction:
            yield self
            return
        with _read_transaction(self.conn.execute):
            yield self


class EngineReads(Reads):
    """Over a SQLAlchemy connection, either dialect."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.dialect = conn.dialect.name

    def _execute(self, sql: str, params: Params):
        from sqlalchemy import text  # loaded already by whoever made the connection

        return self.conn.execute(text(sql), dict(params or {}))

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Reads]:
        if self.conn.in_transaction():  # statements ran already: too late to choose a snapshot
            yield self
            return
        if self.dialect == "postgresql":
            # READ COMMITTED (the default) takes a new snapshot per statement; REPEATABLE READ one
            # for the transaction, which ends when the connection goes back to the pool.
            self.conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield self
            return
        with _read_transaction(self.conn.exec_driver_sql):  # pysqlite begins none before a SELECT
            yield self


@contextlib.contextmanager
def _read_transaction(execute: Callable[[str], Any]) -> Iterator[None]:
    """A SQLite read transaction: WAL keeps its snapshot until it ends."""
    execute("BEGIN")
    try:
        yield
    finally:
        execute("COMMIT")


@contextlib.contextmanager
def reading(source) -> Iterator[Reads]:
    """Reads over `source`: a `Reads` as it is, a library (its own `reads()`: stdlib sqlite3 for
    a query's `QueryLibrary`, SQLAlchemy for a `Library`), or a SQLAlchemy Engine (one connection
    for the block)."""
    if isinstance(source, Reads):
        yield source
    elif hasattr(source, "reads"):
        with source.reads() as reads:
            yield reads
    else:
        with source.connect() as conn:
            yield EngineReads(conn)


def in_list(values: Sequence, name: str = "id", convert: Callable[[Any], Any] = int) -> tuple[str, dict]:
    """("(:id0, :id1, ...)", their parameters): an `IN` list both drivers bind. Keep `values` to
    `sql.IN_CHUNK` or fewer (SQLite's bound-parameter limit). `convert` makes each value one a
    driver binds (ids arrive as numpy integers, which sqlite3 refuses)."""
    keys = [f"{name}{i}" for i in range(len(values))]
    return "(" + ", ".join(f":{k}" for k in keys) + ")", {k: convert(v) for k, v in zip(keys, values)}


def readonly_uri(db_path: str | os.PathLike) -> str:
    """The SQLite URI that opens `db_path` for reading only (a shared copy, a mounted snapshot).

    A WAL database needs its `-shm` file to be read; when there is none and the folder
    cannot hold one, the file is opened as immutable, which is what a read-only copy is.
    """
    path = os.path.abspath(db_path)
    immutable = not os.access(os.path.dirname(path), os.W_OK) and not os.path.exists(f"{path}-shm")
    return f"file:{quote(path)}?mode=ro" + ("&immutable=1" if immutable else "")


def connect_sqlite(db_path: str | os.PathLike, readonly: bool) -> sqlite3.Connection:
    """A stdlib connection that can only read: `readonly_uri` for a library this user cannot
    write, else the file opened as usual with `query_only` on (the same locking and WAL
    handling as the library's engine, and no way to write by mistake)."""
    if readonly:
        conn = sqlite3.connect(readonly_uri(db_path), uri=True, timeout=30, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(os.fspath(db_path), timeout=30, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
    return conn
