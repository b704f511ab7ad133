"""A library: one directory holding `clipfind.db` (the truth) and the FAISS cache.

Opening a library creates it if needed, brings its schema to the newest
migration, and checks that the model you mean to use is the model that made
its vectors. Everything that reads or writes a library works on this class;
Python users get it with indexing, search and tagging added on top
(`retrieval.facade.Library`, exported as `from retrieval import Library`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from retrieval import config
from retrieval.errors import LibraryError
from retrieval.model.spec import ModelSpec
from retrieval.store import postgres
from retrieval.store.binding import (
    IDENTITY_KEY,
    MODEL_KEY,
    SCHEMA_HEAD,
    empty_library,
    model_mismatch,
)
from retrieval.store.integrity import (
    DamagedDatabase,
    check_pages,
    check_pages_if_small,
    library_error_for,
)
from retrieval.store.location import DB_NAME, StoreLocation, locate
from retrieval.store.reads import EngineReads, Reads
from retrieval.store.schema import Image, Meta, Run, utcnow
from retrieval.store.vectors import VectorIndex, remove_temp_files
from retrieval.store.write_lock import LOCK_NAME, sqlite_write_lock

if TYPE_CHECKING:
    from alembic.config import Config

    from retrieval.model.encoder import Encoder

@dataclass
class RunRecord:
    """One row of the runs table while its run is going: the block fills `stats`."""

    id: int
    kind: str
    status: str = "running"
    stats: dict = field(default_factory=dict)


def _alembic_config(connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("retrieval.migrations")))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    """Upgrade to head; refuse a database written by a newer clipfind."""
    if schema_revision(engine) == SCHEMA_HEAD:
        return
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.begin() as conn:
        if postgres.is_postgres(conn):  # two first opens at once: one migrates, the other waits
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": postgres.lock_key(None, "migrate")})
        config = _alembic_config(conn)
        script = ScriptDirectory.from_config(config)
        current = MigrationContext.configure(conn).get_current_revision()
        known = {rev.revision for rev in script.walk_revisions()}
        if current is not None and current not in known:
            raise LibraryError(
                f"this library's schema ({current}) is newer than this clipfind knows; "
                "upgrade clipfind to open it"
            )
        if current != script.get_current_head():
            command.upgrade(config, "head")


def schema_revision(engine: Engine) -> str | None:
    """The database's alembic revision, read with plain SQL (None for a new database, or one
    this cannot read: then `migrate` takes alembic's own path, which reports it)."""
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except DBAPIError:  # no such table yet (SQLite OperationalError, PostgreSQL ProgrammingError)
        return None
    return row[0] if row else None


class Library:
    """Paths, database, model binding and vector index of one library directory."""

    def __init__(self, root: Path, engine: Engine, store: StoreLocation | None = None) -> None:
        self.root = root
        self.engine = engine
        self.store = store or StoreLocation(root / DB_NAME)
        self._lock_fds: list[int] = []
        self.session_factory = sessionmaker(engine, expire_on_commit=False)
        self._vectors: VectorIndex | None = None
        self._encoder: Encoder | None = None

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None = None, model: ModelSpec | None = None,
             create: bool = True, check: bool = True, db: str | None = None) -> Library:
        """Open (or make) the library at `path`; `check` False skips the damaged-page check
        (for `verify`, which reports damage as a finding instead of refusing).

        `db`: a PostgreSQL URL for the metadata (default: --db, then $CLIPFIND_DB, then the
        URL the folder remembers, then the folder's own SQLite file)."""
        root = config.library_path(path)
        store = locate(root, config.database_url(db))
        db_path = store.sqlite_path
        if not store.exists() and not create:
            raise LibraryError(f"no library at {root} (run `clipfind index` to make one)")
        created_dir = _make_dir(root)
        # A library this user cannot write (a shared copy, a snapshot) is opened read-only:
        # searching it works, and writing commands refuse in one line at the write lock.
        readonly = not store.is_postgres and db_path.exists() and not (
            os.access(root, os.W_OK | os.X_OK) and os.access(db_path, os.W_OK))
        try:
            engine = store.engine(readonly=readonly)
            if not create and store.is_postgres and not postgres.holds_library(engine):
                engine.dispose()
                raise LibraryError(f"no library in {store.label} (run `clipfind index` to make one)")
            migrate(engine)
        except (OperationalError, DatabaseError) as exc:
            if created_dir:
                shutil.rmtree(root, ignore_errors=True)
            known = library_error_for(exc)
            if isinstance(known, DamagedDatabase):  # (or never a library: a stray file at that path)
                raise DamagedDatabase(known.detail, f"cannot use {store.label} as a library database",
                                      known.hint) from None
            if known is not None and store.is_postgres:
                raise known from None
            reason = " ".join(str(exc.orig if getattr(exc, "orig", None) else exc).split())[:300]
            raise LibraryError(f"cannot use {store.label} as a library database: {reason}") from exc
        except LibraryError:
            if created_dir:
                shutil.rmtree(root, ignore_errors=True)
            raise
        library = cls(root, engine, store)
        if check and not store.is_postgres:
            check_pages_if_small(engine, db_path)
        try:
            library.ensure_identity()
        except (OperationalError, DatabaseError) as exc:  # e.g. PostgreSQL: the meta table dropped
            engine.dispose()
            known = library_error_for(exc)
            if known is None:
                raise
            raise known from None
        store.remember(root)
        if model is not None:
            library.check_model_spec(model)
        return library

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    def session(self) -> Session:
        return self.session_factory()

    @contextlib.contextmanager
    def reads(self) -> Iterator[Reads]:
        """Plain-SQL reads on one connection: the same calls a query makes through stdlib
        sqlite3 (`fast_read.QueryLibrary.reads`), here through SQLAlchemy, either dialect."""
        with self.engine.connect() as conn:
            yield EngineReads(conn)

    # -- meta ------------------------------------------------------------------------
    def get_meta(self, key: str) -> dict | str | None:
        with self.session() as s:
            row = s.get(Meta, key)
            return json.loads(row.value) if row else None

    def set_meta(self, key: str, value) -> None:
        with self.session() as s, s.begin():
            s.merge(Meta(key=key, value=json.dumps(value)))

    # -- identity --------------------------------------------------------------------
    def ensure_identity(self) -> str | None:
        """The uuid that binds caches (FAISS) to this database; written on first open.

        A database made again at the same path gets a new one, so a cache built
        from the old database can never pass for this one's.
        """
        identity = self.get_meta(IDENTITY_KEY)
        if identity is None:
            try:
                self.set_meta(IDENTITY_KEY, uuid.uuid4().hex)
            except IntegrityError:  # PostgreSQL: another machine's first open wrote it first
                pass
            except (OperationalError, DatabaseError):  # a read-only library from before identities
                return None
            identity = self.get_meta(IDENTITY_KEY)
        return str(identity)

    @property
    def identity(self) -> str | None:
        identity = self.get_meta(IDENTITY_KEY)
        return None if identity is None else str(identity)

    # -- the model -------------------------------------------------------------------
    @property
    def model_record(self) -> dict | None:
        """What the library knows of the model that made its vectors (None if no model yet)."""
        record = self.get_meta(MODEL_KEY)
        return record if isinstance(record, dict) else None

    def check_model_spec(self, spec: ModelSpec) -> None:
        """Refuse a model spec other than the recorded one, before anything is loaded."""
        mismatch = model_mismatch(self.model_record, spec)
        if mismatch is not None:
            raise mismatch

    def empty_error(self) -> LibraryError:
        return empty_library(self.root)

    @property
    def loaded_encoder(self) -> Encoder | None:
        """The encoder this process already loaded for the library, if any (never loads one)."""
        return self._encoder

    def bind_encoder(self, encoder: Encoder) -> None:
        """Record the encoder's model on first use; afterwards insist on the same weights."""
        record = self.model_record
        if record is None:
            self.set_meta(MODEL_KEY, encoder.describe())
        elif record["fingerprint"] != encoder.fingerprint or record["embed_dim"] != encoder.embed_dim:
            raise LibraryError(
                f"the weights of {encoder.spec.label} are not the weights this library was made "
                f"with (fingerprint {encoder.fingerprint} vs {record['fingerprint']})"
            )
        self._encoder = encoder

    def encoder(self, spec: ModelSpec | None = None, device: str = "auto",
                precision: str = "auto", images_only: bool = False) -> Encoder:
        """The library's model, loaded once per process; `spec` defaults to the recorded one.
        `images_only`: the caller encodes only images (see `Encoder`)."""
        if self._encoder is not None and (spec is None or spec == self._encoder.spec):
            return self._encoder
        if spec is None:
            record = self.model_record
            if record is None:
                raise self.empty_error()
            spec = ModelSpec(**record["spec"])
        else:
            self.check_model_spec(spec)
        from retrieval.model.encoder import Encoder  # torch loads only when a model is needed

        self.bind_encoder(Encoder(spec, device=device, precision=precision, images_only=images_only))
        return self._encoder

    @property
    def dim(self) -> int:
        record = self.model_record
        if record is None:
            raise self.empty_error()
        return int(record["embed_dim"])

    # -- vectors ---------------------------------------------------------------------
    def vectors(self, sync: bool = True) -> VectorIndex:
        """The FAISS index, caught up with the database (built on first use)."""
        if self._vectors is None:
            self._vectors = VectorIndex(self.root, self.dim, self.identity)
        if sync:
            self._vectors.sync(self.engine)
        return self._vectors

    def image_count(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count(Image.id))) or 0

    # -- writing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def write_lock(self, wait: bool = False, check: bool = True) -> Iterator[None]:
        """One writer at a time (index, tag, remove, reindex); readers never wait.

        SQLite: an flock on `write.lock` in the folder. PostgreSQL: an advisory lock keyed
        by the library's identity, so writers on other machines wait too. Holding it, a
        writer first checks the database (`check`): SQLite, every page (writing into a
        damaged file spreads the damage); PostgreSQL, which checks its own pages, that no
        table, column or change-log trigger is missing.
        """
        if self.store.is_postgres:
            with self._advisory_write_lock(wait):
                if check:
                    check_pages(self.engine)  # the schema clipfind made is all there
                yield
            return
        with sqlite_write_lock(self.root, self.db_path, wait, self._busy):
            if check:
                check_pages(self.engine)
            yield

    @contextlib.contextmanager
    def _advisory_write_lock(self, wait: bool) -> Iterator[None]:
        if not os.access(self.root, os.W_OK):
            raise LibraryError(f"cannot write to {self.root}: permission denied (commands that "
                               "change a library need write permission on its folder)")
        key = postgres.lock_key(self.identity)
        with postgres.advisory_lock(self.engine, key, wait, self._busy) as conn:
            fd = postgres.socket_fd(conn)
            self._lock_fds = [fd] if fd is not None else []
            try:
                yield
            finally:
                self._lock_fds = []

    def _busy(self, holder: str) -> LibraryError:
        return LibraryError(f"the library at {self.root} is busy ({holder}); wait for it to finish "
                            "or use --wait")

    def lock_handles(self) -> list[str | int]:
        """What a forked worker must close so a killed writer's lock dies with it: the lock
        file (SQLite), or the socket of the connection holding the advisory lock (PostgreSQL)."""
        if self.store.is_postgres:
            return list(self._lock_fds)
        return [str(self.root / LOCK_NAME)]

    def writer_active(self) -> bool:
        """Whether some process holds the write lock now (a run marked 'running' without one was
        killed). Takes a shared lock for an instant, which works on a read-only library too."""
        if self.store.is_postgres:
            return postgres.lock_held(self.engine, postgres.lock_key(self.identity))
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases the shared lock if we got it
        return False
    # -- runs ------------------------------------------------------------------------
    @contextlib.contextmanager
    def run(self, kind: str) -> Iterator[RunRecord]:
        """Record one writing run (index, reindex, reembed, remove); call under the write lock.

        Runs a killed process left 'running' are marked interrupted first. This run
        ends 'done' when the block returns, 'interrupted' on Ctrl-C or SIGTERM (both
        arrive as KeyboardInterrupt), 'failed' on anything else, with whatever stats
        the block put in `run.stats` by then.
        """
        self.mark_stale_runs()
        record = RunRecord(self.start_run(kind), kind)
        try:
            yield record
            record.status = "done"
        except KeyboardInterrupt:
            record.status = "interrupted"
            raise
        except BaseException:
            record.status = "failed"
            raise
        finally:
            self.finish_run(record.id, record.status, record.stats)

    def mark_stale_runs(self) -> int:
        """Runs still 'running' while we hold the write lock were killed: say so.

        Also removes temp files a killed FAISS save left behind.
        """
        remove_temp_files(self.root)
        with self.session() as s, s.begin():
            result = s.execute(update(Run).where(Run.status == "running")
                               .values(status="interrupted", finished_at=utcnow()))
            return result.rowcount

    def start_run(self, kind: str, precision: str | None = None, device: str | None = None) -> int:
        with self.session() as s, s.begin():
            run = Run(kind=kind, status="running", precision=precision, device=device, stats={})
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, status: str, stats: dict) -> None:
        with self.session() as s, s.begin():
            run = s.get(Run, run_id)
            run.status, run.finished_at, run.stats = status, utcnow(), stats



def library_exists(path: str | Path | None) -> bool:
    """Whether `Library.open(path, create=False)` would find a library (without making one):
    the folder's SQLite file, or a PostgreSQL database (given or remembered) that holds one."""
    root = config.library_path(path)
    store = locate(root, config.database_url())
    if not store.is_postgres:
        return store.exists()
    engine = store.engine()
    try:
        return postgres.holds_library(engine)
    except (OperationalError, DatabaseError) as exc:
        raise (library_error_for(exc) or LibraryError(f"cannot use {store.label}: {exc}")) from None
    finally:
        engine.dispose()


def _make_dir(root: Path) -> bool:
    """Create the library directory; True if we made it (so a failure can undo it)."""
    if root.is_dir():
        if not os.access(root, os.W_OK | os.X_OK) and not (root / DB_NAME).exists():
            raise LibraryError(f"cannot write to the library directory {root}")
        return False
    try:
        root.mkdir(parents=True)
    except (PermissionError, NotADirectoryError, FileExistsError, OSError) as exc:
        raise LibraryError(f"cannot create a library at {root}: {exc.strerror or exc}") from exc
    return True
