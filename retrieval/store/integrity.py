"""Telling a damaged, read-only or full library apart from a bug, in one line each.

SQLite reports a damaged page only when something reads it, as
`sqlite3.DatabaseError: database disk image is malformed` from whichever
statement got there first; a read-only file or folder as "attempt to write a
readonly database"; a full disk as "database or disk is full" or, when the
write itself fails (a file-size limit), "disk I/O error". `library_error_for`
turns each into a `LibraryError` (exit 4) that says what to do, so no command
shows a traceback for them.

How much is checked up front, and why: `PRAGMA quick_check` reads every page
(measured 3.3 s for a 420 MB database of 100k 512-d vectors, load 8.9 on
2 cores), which a writer can afford once per run but a one-second query
cannot. So writers check the whole file under the write lock; readers check
it when it is small (`READ_CHECK_LIMIT`) and otherwise report damage the
moment they meet it.
"""

from __future__ import annotations

import errno
import os
import sqlite3

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from retrieval.errors import LibraryError

# Bytes of database a read-only command checks before answering: quick_check of a 16 MiB file
# (4,000 rows of 2 KB vectors) took 55-184 ms at load 13.6 on 2 cores, a cost a query can carry.
READ_CHECK_LIMIT = 16 << 20
RESTORE_HINT = "run `clipfind verify`, or restore from a backup (`clipfind backup` makes one)"
_DAMAGE = ("malformed", "not a database", "corrupt")  # "not a database": page 1 overwritten
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DamagedDatabase(LibraryError):
    """The library's SQLite file has damaged pages, or its PostgreSQL schema lost a table, column
    or trigger: nothing may be trusted or written."""

    def __init__(self, detail: str, what: str = "the library database is damaged",
                 hint: str = RESTORE_HINT) -> None:
        self.detail, self.hint = detail, hint
        super().__init__(f"{what}: {detail}; {hint}")


def restore_hint(engine: Engine) -> str:
    """How to get a sound database back: `clipfind backup` copies SQLite, pg_dump PostgreSQL."""
    if engine.dialect.name == "postgresql":
        from retrieval.store.postgres import RESTORE_HINT as PG_RESTORE_HINT

        return PG_RESTORE_HINT
    return RESTORE_HINT


def damage_of(engine: Engine) -> str | None:
    """What `PRAGMA quick_check` finds wrong (first few lines), or None when the file is sound.

    PostgreSQL: the server checks its own pages (checksums, WAL) and says so in the error of
    whichever statement meets damage; what is checked here is that the schema clipfind made is
    all there (a table, column or change-log trigger dropped by hand is damage too)."""
    if engine.dialect.name == "postgresql":
        from retrieval.store.postgres import schema_damage
        from retrieval.store.schema import Base

        tables = {t.name: {c.name for c in t.columns} for t in Base.metadata.tables.values()}
        with engine.connect() as conn:
            return schema_damage(conn, tables)
    if engine.dialect.name != "sqlite":
        return None
    try:
        with engine.connect() as conn:
            rows = [str(r[0]) for r in conn.execute(text("PRAGMA quick_check(5)"))]
    except DBAPIError as exc:
        if isinstance(exc.orig, sqlite3.OperationalError) and not _is_damage(exc.orig):
            raise  # locked, read-only...: not a verdict on the pages
        return _first_line(exc.orig)
    if rows == ["ok"]:
        return None
    return one_line(rows)


def one_line(findings: list[str], keep: int = 3) -> str:
    """quick_check's findings (multi-line rows, a '*** in database main ***' banner) as one line."""
    lines = [ln.strip() for row in findings for ln in str(row).splitlines()
             if ln.strip() and not ln.strip().startswith("***")]
    more = f" (and {len(lines) - keep} more)" if len(lines) > keep else ""
    return "; ".join(lines[:keep])[:300] + more


def check_pages(engine: Engine) -> None:
    """Raise DamagedDatabase if any page of the database (PostgreSQL: its schema) is damaged."""
    detail = damage_of(engine)
    if detail is not None:
        raise DamagedDatabase(detail, hint=restore_hint(engine))


def check_pages_if_small(engine: Engine, db_path: str | os.PathLike) -> None:
    """The whole-file check for read-only commands, when it costs well under a second."""
    if engine.dialect.name != "sqlite":
        return
    try:
        size = os.path.getsize(db_path) + _size_or_zero(f"{os.fspath(db_path)}-wal")
    except OSError:
        return
    if size <= READ_CHECK_LIMIT:
        check_pages(engine)


def library_error_for(exc: BaseException) -> LibraryError | None:
    """The one-line LibraryError for a storage failure (damage, read-only, disk full), else None."""
    if isinstance(exc, LibraryError):
        return exc
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if type(orig).__module__.startswith("psycopg"):  # only loaded when a library uses PostgreSQL
        from retrieval.store.postgres import RESTORE_HINT as PG_RESTORE_HINT
        from retrieval.store.postgres import error_for, schema_error_words

        words = schema_error_words(orig)
        if words is not None:
            return DamagedDatabase(words, hint=PG_RESTORE_HINT)
        return error_for(orig)
    if isinstance(orig, sqlite3.Error):
        message = _first_line(orig)
        lowered = message.lower()
        if _is_damage(orig):
            return DamagedDatabase(message)
        if "readonly" in lowered or "read-only" in lowered:
            return LibraryError("the library database is read-only for this user: writing commands "
                                "need write permission on clipfind.db and its folder")
        if "disk is full" in lowered or "disk i/o error" in lowered:
            return LibraryError(f"cannot write the library ({message}): the disk is full or a file "
                                "size limit was reached; free space and run the command again "
                                "(nothing committed is lost)")
        if "unable to open" in lowered:
            return LibraryError(f"cannot open the library database: {message}")
        return None
    if isinstance(orig, OSError) and orig.errno in _FULL_ERRNOS:
        return LibraryError(f"cannot write {orig.filename or 'a library file'}: "
                            f"{orig.strerror or orig}; free space and run the command again "
                            "(nothing committed is lost)")
    return None


def _is_damage(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(
        word in str(exc).lower() for word in _DAMAGE)


def _first_line(exc: BaseException) -> str:
    return one_line([str(exc)]) or type(exc).__name__


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
