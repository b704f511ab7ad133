"""PostgreSQL as a library's store: URLs, engines, one-line connection errors, advisory locks.

Why a module of its own: SQLite needs none of this, and a SQLite user must never need
psycopg, so nothing here imports it until a `postgresql://` URL is actually used.

Locking, and why it differs from SQLite's `write.lock` file: writers on several machines
share one PostgreSQL database, and a file lock on one machine's folder cannot stop another
machine. A session-level advisory lock, keyed by the library's identity, can: it is held by
one connection, released by the server when that connection ends (a `kill -9` included), and
never blocks readers. The change log stays in commit order by a row lock taken inside its
triggers (see migration 0001), so even writers that bypass clipfind cannot break the FAISS
catch-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from retrieval.errors import LibraryError

DRIVER = "postgresql+psycopg"
INSTALL_HINT = "pip install 'clipfind[postgres]'"
CONNECT_TIMEOUT_S = 10  # libpq waits forever by default; an unreachable host must fail in one line
_ALIASES = {"postgresql", "postgres", "postgresql+psycopg", "postgres+psycopg"}


def parse_url(value: str) -> URL:
    """A PostgreSQL URL as SQLAlchemy's URL with the psycopg 3 driver, or a one-line LibraryError."""
    try:
        url = make_url(value.strip())
    except ArgumentError:
        raise LibraryError(f"not a database URL: {redact(value)} (expected "
                           f"{DRIVER}://USER@HOST:PORT/DATABASE)") from None
    if url.drivername not in _ALIASES:
        raise LibraryError(
            f"clipfind cannot store a library in {url.drivername}:// databases; --db takes "
            f"{DRIVER}://USER@HOST:PORT/DATABASE (a SQLite library is the folder's clipfind.db, "
            "chosen by --library alone)")
    if not url.database:
        raise LibraryError(f"the database URL {safe(url)} names no database (…/DATABASE at its end)")
    return url.set(drivername=DRIVER)


def without_password(url: URL) -> URL:
    return URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)


def safe(url: URL) -> str:
    """The URL for messages and files: never the password."""
    return without_password(url).render_as_string(hide_password=False)


def redact(value: str) -> str:
    try:
        return safe(make_url(value))
    except ArgumentError:
        return value.split("@")[-1] if "@" in value else value


def make_engine(url: URL, readonly: bool = False) -> Engine:
    """An engine for the psycopg 3 driver; `readonly` makes every transaction read-only server-side."""
    try:
        import psycopg  # noqa: F401  (only to name the missing package in one line)
    except ImportError:
        raise LibraryError(f"a PostgreSQL library needs the psycopg driver: {INSTALL_HINT}") from None
    args: dict = {"application_name": f"clipfind pid {os.getpid()} on {socket.gethostname()}"[:63]}
    if "connect_timeout" not in url.query:
        args["connect_timeout"] = CONNECT_TIMEOUT_S
    if readonly:
        args["options"] = "-c default_transaction_read_only=on"
    return create_engine(url, connect_args=args, pool_pre_ping=True, json_serializer=_dumps)


def _dumps(obj) -> str:
    """JSON columns as SQLite's engine writes them (datetimes as text); a plain function, since
    psycopg warns that a closure as its dumper may leak."""
    return json.dumps(obj, default=str)


def is_postgres(engine_or_conn: Engine | Connection) -> bool:
    return engine_or_conn.dialect.name == "postgresql"


# -- errors -------------------------------------------------------------------------------
PRIVILEGES_HINT = ("the role lacks a privilege on the library: reading needs SELECT on its tables; "
                   "writing commands also need INSERT, UPDATE and DELETE on them and USAGE on their "
                   "sequences; making a library needs CREATE on the schema")
_CONNECT_HINTS = (
    ("password authentication failed", "wrong user or password"),
    ("no password supplied", "a password is needed (in the URL, $PGPASSWORD or ~/.pgpass)"),
    ("does not exist", None),  # the server's own words say which database or role
    ("connection refused", "nothing answers there (is the server running, on that port?)"),
    ("failed to resolve host", "no such host"),
    ("could not translate host name", "no such host"),
    ("timeout expired", f"no answer within {CONNECT_TIMEOUT_S} s"),
    ("no route to host", "no route to that host"),
)


def error_for(exc: BaseException, where: str = "the library database") -> LibraryError | None:
    """The one-line LibraryError for a PostgreSQL failure a user can fix, else None."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    try:
        import psycopg
    except ImportError:  # pragma: no cover - no driver, no psycopg errors either
        return None
    if not isinstance(orig, psycopg.Error):
        return None
    message = " ".join(str(orig).split())
    lowered = message.lower()
    sqlstate = getattr(orig, "sqlstate", None) or ""
    if isinstance(orig, psycopg.OperationalError) and not sqlstate or sqlstate.startswith("08") \
            or sqlstate in ("28P01", "28000", "3D000"):
        reason = next((hint or _server_words(message) for key, hint in _CONNECT_HINTS if key in lowered),
                      _server_words(message))
        return LibraryError(f"cannot connect to {where}: {reason}")
    if sqlstate == "25006":  # read_only_sql_transaction
        return LibraryError("the library database is read-only for this user: writing commands need a "
                            "role that may write it")
    if sqlstate == "42501":  # insufficient_privilege
        return LibraryError(f"the database refused: {_server_words(message, orig)} ({PRIVILEGES_HINT})")
    if sqlstate in ("53100", "53200"):  # disk full, out of memory
        return LibraryError(f"the database server cannot write ({_server_words(message, orig)}); nothing "
                            "committed is lost, run the command again when it has room")
    if sqlstate.startswith("57P"):  # admin shutdown, crash shutdown, cannot connect now
        return LibraryError(f"the database server went away: {_server_words(message, orig)}; run the "
                            "command again (nothing committed is lost)")
    return None


# -- a damaged schema: tables, columns or the change-log triggers gone --------------------------
LOG_TRIGGERS = ("images_vector_add", "images_vector_change", "images_vector_del")  # migration 0001
RESTORE_HINT = "run `clipfind verify`, or restore the database from a backup (pg_dump makes one)"
_SCHEMA_STATES = {"42P01", "42703", "42883"}  # undefined table, column, function


def schema_damage(conn: Connection, tables: dict[str, set[str]]) -> str | None:
    """What is missing of the schema clipfind made (`tables`: name -> columns, and the change-log
    triggers), in one line; None when nothing is. The PostgreSQL counterpart of SQLite's
    quick_check: the server guards its pages, but a dropped table or trigger is damage too."""
    have: dict[str, set[str]] = {}
    for table, column in conn.execute(text(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()")):
        have.setdefault(table, set()).add(column)
    missing = []
    for table, columns in sorted(tables.items()):
        if table not in have:
            missing.append(f"table {table} is missing")
        else:
            missing += [f"column {table}.{c} is missing" for c in sorted(columns - have[table])]
    triggers = set(conn.execute(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal "
                                     "AND tgrelid = to_regclass('images')")).scalars())
    missing += [f"trigger {t} on images is missing" for t in LOG_TRIGGERS if t not in triggers]
    if not missing:
        return None
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    return "; ".join(missing[:3]) + more


def schema_error_words(exc: BaseException) -> str | None:
    """The server's words for a statement that met a missing table, column or function, else None."""
    if getattr(exc, "sqlstate", None) not in _SCHEMA_STATES:
        return None
    return _server_words(str(exc), exc)


def _server_words(message: str, orig: BaseException | None = None) -> str:
    """libpq's 'connection to server at "h", port p failed: FATAL:  reason' -> 'reason'; a server
    error's primary message alone (not the 'LINE 2: CREATE TABLE ...' that follows it)."""
    primary = getattr(getattr(orig, "diag", None), "message_primary", None)
    if primary:
        return " ".join(primary.split()).rstrip(".")[:300]
    tail = message.rsplit("failed:", 1)[-1]
    for prefix in ("FATAL:", "ERROR:"):
        tail = tail.split(prefix, 1)[-1]
    return tail.split(" Is the server running")[0].strip().rstrip(".")[:300] or message[:300]


# -- advisory locks -----------------------------------------------------------------------
def lock_key(identity: str | None, purpose: str = "write") -> int:
    """A signed 64-bit advisory-lock key for this library (two libraries never share one)."""
    digest = hashlib.blake2b(f"clipfind {purpose} {identity or ''}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def advisory_lock(engine: Engine, key: int, wait: bool, busy_message) -> Iterator[Connection]:
    """Hold a session-level advisory lock on its own autocommit connection for the block.

    `busy_message(holder)` builds the LibraryError raised when `wait` is False and another
    session holds it; `holder` names that session (its application_name and address).
    """
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        if wait:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        elif not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
            raise busy_message(_holder(conn, key))
        guard = _CommitGuard(conn.execute(text("SELECT pg_backend_pid()")).scalar_one(), key)
        event.listen(engine, "commit", guard)
        try:
            yield conn
        finally:
            event.remove(engine, "commit", guard)
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            except DBAPIError:  # the connection died: the server dropped the lock with it
                pass
    finally:
        conn.close()


class LostLock(LibraryError):
    """The session holding the write lock ended (server restart, network, an administrator)."""

    def __init__(self) -> None:
        super().__init__("lost the library's write lock: the database session holding it ended (the "
                         "server restarted, the network dropped, or an administrator closed it); the "
                         "transaction in flight was rolled back and everything committed before it is "
                         "kept: run the command again")


class _CommitGuard:
    """Refuses every commit on the engine while the write lock's session no longer holds it.

    Why: the lock lives on one connection and the writes go through others, which the pool
    reconnects silently; without this a writer whose lock session died would go on writing,
    unlocked, beside the next writer. The check runs inside the committing transaction, so a
    refused commit rolls back; what remains is the instant between the check and the commit.
    """

    def __init__(self, pid: int, key: int) -> None:
        self.pid = pid
        self.classid, self.objid = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF

    def __call__(self, conn: Connection) -> None:
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                           "AND pid = %s AND classid = %s AND objid = %s AND objsubid = 1)",
                           (self.pid, self.classid, self.objid))
            held = cursor.fetchone()[0]
        finally:
            cursor.close()
        if not held:
            raise LostLock()


def lock_held(engine: Engine, key: int) -> bool:
    """Whether any session holds the advisory lock now (a shared try-lock for an instant)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if conn.execute(text("SELECT pg_try_advisory_lock_shared(:k)"), {"k": key}).scalar_one():
            conn.execute(text("SELECT pg_advisory_unlock_shared(:k)"), {"k": key})
            return False
        return True


def _holder(conn: Connection, key: int) -> str:
    classid, objid = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    row = conn.execute(text(
        "SELECT a.application_name, a.client_addr FROM pg_locks l JOIN pg_stat_activity a "
        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :c "
        "AND l.objid = :o AND l.objsubid = 1 LIMIT 1"), {"c": classid, "o": objid}).first()
    if row is None:
        return "another session"
    where = f" from {row.client_addr}" if row.client_addr else ""
    return f"{row.application_name or 'another session'}{where}"


def socket_fd(conn: Connection) -> int | None:
    """The connection's socket, for forked workers to close (so a killed parent frees the lock)."""
    try:
        return int(conn.connection.dbapi_connection.fileno())
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - not psycopg
        return None


def holds_library(engine: Engine) -> bool:
    """Whether the database has been made a library (read-only commands must not make one)."""
    with engine.connect() as conn:
        return conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar_one()


def database_bytes(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
