"""`clipfind index FOLDER` when nothing changed: the same answer, on the standard library alone.

Why: an unchanged re-run of 1,000 files took 1.41 s, of which ~1 s was importing
SQLAlchemy (the planner and `Library`), numpy and FAISS (bench/rerun.py, quiet
machine); the work itself, a stat per file and a few reads, was under 0.2 s.

`unchanged_rerun` does what the full path (`index_paths`) does on such a run, through
stdlib sqlite3: it takes the same write lock, checks every page as every writer does,
walks and diffs with the planner's own `survey` (one rule for "unchanged"), and
writes the same `runs` row. It answers only when the full path would change nothing
else, and returns None (the caller then runs the full path, which says in its own
words whatever is wrong) on any doubt: PostgreSQL, URLs, a schema to migrate, no
model or identity yet, another model named, damage, the lock held, a killed run to
mark, a killed save's temp files, a FAISS cache that is missing, unreadable, behind
the database, frozen, on disk or due to be rebuilt, a change log to prune, and any
file new, changed, gone or unreadable. ONNX exports are the query's business
(`store.onnx_exports`); the full path does not look at them on such a run either.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval import config
from retrieval.errors import LibraryError
from retrieval.index.planner import IndexResult, plan_index, run_counts, run_stats, survey
from retrieval.media import remote
from retrieval.media.formats import DEFAULT_MAX_PIXELS
from retrieval.store.binding import model_mismatch, read_binding
from retrieval.store.index_state import (
    EXACT_LIMIT,
    INDEX_FILE,
    index_file_sound,
    last_log_seq,
    read_state,
    temp_files,
)
from retrieval.store.integrity import damage_of
from retrieval.store.location import DB_NAME, POINTER_NAME
from retrieval.store.reads import SqliteReads
from retrieval.store.write_lock import sqlite_write_lock

if TYPE_CHECKING:
    from retrieval.model.spec import ModelSpec


class _Library:
    """What the planner asks of a library (`root`, `reads()`), over this run's connection."""

    def __init__(self, root: Path, reads: SqliteReads) -> None:
        self.root = root
        self._reads = reads

    @contextlib.contextmanager
    def reads(self) -> Iterator[SqliteReads]:
        yield self._reads


def unchanged_rerun(library_path: str | os.PathLike | None, roots: Sequence[str], spec: ModelSpec | None = None,
                    follow_symlinks: bool = False, retry_failed: bool = False,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[IndexResult, dict] | None:
    """(the run's result, the library's model record) when nothing under `roots` changed and
    the library has nothing pending; None to run the full path (see the module docstring).

    `roots` as `planner.check_roots` gives them. The run is recorded as the full path records it.
    """
    root = config.library_path(library_path)
    db_path = root / DB_NAME
    if config.database_url() or (root / POINTER_NAME).exists() or not db_path.is_file():
        return None  # PostgreSQL, a --db a SQLite folder refuses, or no library yet
    if any(remote.is_url(r) for r in roots) or temp_files(root):
        return None
    try:
        with sqlite_write_lock(root, db_path, wait=False, busy=LibraryError):
            started, started_at = time.perf_counter(), _db_now()
            conn = sqlite3.connect(os.fspath(db_path), timeout=30, isolation_level=None)
            try:
                for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):  # as the engine's
                    conn.execute(f"PRAGMA {pragma}")
                return _rerun(conn, root, roots, spec, follow_symlinks, retry_failed, max_pixels,
                              started, started_at)
            finally:
                conn.close()
    except (LibraryError, sqlite3.Error, OSError, ValueError, TypeError):
        return None  # busy, read-only, damaged, unreadable...: the full path words it


def _rerun(conn: sqlite3.Connection, root: Path, roots: Sequence[str], spec: ModelSpec | None,
           follow_symlinks: bool, retry_failed: bool, max_pixels: int, started: float,
           started_at: str) -> tuple[IndexResult, dict] | None:
    reads = SqliteReads(conn)
    binding = read_binding(reads)
    if binding is None:
        return None
    record, identity = binding
    if spec is not None and model_mismatch(record, spec) is not None:
        return None
    if damage_of(reads) is not None:  # every page, as `Library.write_lock` checks before writing
        return None
    if reads.scalar("SELECT count(*) FROM runs WHERE status = 'running'"):
        return None  # a killed run: `Library.run` marks it interrupted
    if not _index_current(root, reads, int(record["embed_dim"]), identity):
        return None
    library = _Library(root, reads)
    surveyed = survey(library, roots, follow_symlinks, retry_failed, max_pixels)
    if not surveyed.nothing_to_do:
        return None
    plan = plan_index(library, roots, surveyed=surveyed)  # nothing to hash: counts and known failures
    stats = run_stats(plan, run_counts(), plan.skipped, started)
    stats["faiss"] = "ok"  # what `refresh_vectors` says of a cache `_index_current` accepts
    cursor = conn.execute(
        "INSERT INTO runs (kind, status, started_at, finished_at, precision, device, stats) "
        "VALUES ('index', 'done', :started, :finished, NULL, NULL, :stats)",
        {"started": started_at, "finished": _db_now(), "stats": json.dumps(stats, default=str)})
    return IndexResult(os.path.abspath(root), plan, stats, list(plan.skipped), cursor.lastrowid), record


def _index_current(root: Path, reads: SqliteReads, dim: int, identity: str) -> bool:
    """Whether `refresh_vectors` would leave the saved FAISS index as it is and prune nothing:
    it loads (state of this database, a sound file of `dim`-d vectors), is neither frozen nor
    on disk, covers the last logged change and every row, is not a flat index past the exact
    limit it would rebuild, and the change log is empty."""
    try:
        state = read_state(root)
    except (OSError, ValueError, TypeError):
        return False
    if state.library_id != identity or state.frozen or state.on_disk:
        return False
    count = int(reads.scalar("SELECT count(*) FROM images"))
    chosen = reads.scalar("SELECT value FROM meta WHERE key = 'index_type'")
    if state.factory == "Flat" and count >= EXACT_LIMIT and (chosen is None or json.loads(chosen) is None):
        return False
    return (count == state.ntotal and last_log_seq(reads) == state.watermark
            and reads.scalar("SELECT 1 FROM vector_log LIMIT 1") is None
            and index_file_sound(root / INDEX_FILE, dim, state.ntotal))


def _db_now() -> str:
    """Now, in UTC, as SQLAlchemy stores a DateTime in SQLite (what `Library.run` writes)."""
    return datetime.now(timezone.utc).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
