"""Deciding what an indexing run must do, before it does anything.

Walk the roots, diff them against the database by (path, size, mtime), then
hash only the new and changed files: a gone path plus a new path with the same
bytes is a move (the row keeps its id and vector), a file whose bytes a row
already has is a duplicate (the vector is copied), a new mtime over the same
bytes is a touch. Only what is left needs decoding and encoding. Nothing here
writes.

Plain SQL over `store.reads` and the standard library only (no SQLAlchemy, numpy
or Pillow at import): an unchanged re-run (`retrieval.index.rerun`) runs the same
walk and diff through stdlib sqlite3, so both paths decide "unchanged" by one rule.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from retrieval.errors import InputError
from retrieval.media import remote
from retrieval.media.formats import DEFAULT_MAX_PIXELS, ImageError
from retrieval.media.scan import FileEntry, ScanDiff, content_hash, diff, walk
from retrieval.store.paths import path_from_db, path_to_db
from retrieval.store.reads import in_list, reading
from retrieval.store.sql import in_chunks, under_folder

if TYPE_CHECKING:
    from retrieval.store.library import Library

REMEMBERED_FAILURES = ("corrupt", "truncated", "empty", "not_image", "too_large")
_SCAN_KINDS = {"permission denied": "unreadable", "vanished": "vanished",
               "broken symlink": "vanished", "not an image file": "not_image"}

@dataclass
class Skipped:
    path: str
    kind: str
    message: str
    known: bool = False  # failed in an earlier run, untouched since: not recorded again


@dataclass
class Work:
    """One file to act on. `row_id`: the row it updates (None: a new row); `source_id`: copy its vector."""

    entry: FileEntry
    digest: str
    row_id: int | None = None
    source_id: int | None = None


@dataclass
class Plan:
    scanned: int = 0
    unchanged: int = 0
    encode: list[Work] = field(default_factory=list)
    copies: list[Work] = field(default_factory=list)  # same content as a stored row
    late_copies: list[Work] = field(default_factory=list)  # same content as a file encoded this run
    moves: list[Work] = field(default_factory=list)
    touches: list[Work] = field(default_factory=list)  # new mtime, same bytes
    gone: list[tuple[int, str]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    known_bad: int = 0  # skipped without a retry: failed before, untouched since

    def counts(self) -> dict:
        return {"scanned": self.scanned, "unchanged": self.unchanged, "to_encode": len(self.encode),
                "duplicates": len(self.copies) + len(self.late_copies), "moved": len(self.moves),
                "touched": len(self.touches), "removed": len(self.gone), "known_bad": self.known_bad}


def run_counts() -> Counter:
    """What a run has done so far, in the order its stats list them (the indexer adds to it)."""
    return Counter(indexed=0, encoded=0)


def run_stats(plan: Plan, done: Counter, skipped: Sequence[Skipped], started: float) -> dict:
    """A run's statistics, as its `runs` row and the `index` summary give them: the plan's counts,
    what was `done` (`run_counts`; its skips and seconds are set here), the skips by kind."""
    done["skipped"] = len(skipped)
    done["seconds"] = round(time.perf_counter() - started, 3)
    return {**plan.counts(), **done, "skipped_by_kind": dict(Counter(s.kind for s in skipped))}


@dataclass
class IndexResult:
    library: str
    plan: Plan
    stats: dict
    skipped: list[Skipped]
    run_id: int | None = None
    status: str = "done"
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def nothing_indexed(self) -> bool:
        """The roots held something, and not one image of it is usable in the library."""
        usable = self.plan.unchanged + self.stats.get("indexed", 0)
        return bool(self.skipped) and usable == 0


class Survey(NamedTuple):
    """A walk sorted against the database, before any file is hashed (`survey`)."""

    entries: int  # files found
    found: ScanDiff  # `found.new` without the known failures
    rows: dict[str, tuple[int, int, int, str]]  # known_rows of the walked roots
    scan_errors: list[Skipped]  # unreadable folders, vanished files, FIFOs...
    known_bad: list[Skipped]  # failed before and untouched since: reported, not retried

    @property
    def nothing_to_do(self) -> bool:
        """Every file unchanged, none gone, nothing new but known failures, nothing unreadable."""
        return not (self.found.new or self.found.changed or self.found.gone or self.scan_errors)


def survey(library: Library | None, roots: Sequence[str], follow_symlinks: bool = False,
           retry_failed: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> Survey:
    """Walk and diff, and set aside the known failures: everything `plan_index` does before hashing.

    `library`: anything with `root` and `reads()` (a `Library`, or the re-run's stdlib view),
    or None (plan against an empty library).
    """
    scan_errors: list[Skipped] = []

    def on_error(path: str, reason: str) -> None:
        kind = "not_image" if reason.startswith("not a regular file") else _SCAN_KINDS.get(reason, "unreadable")
        scan_errors.append(Skipped(path, kind, f"{path}: {reason}"))

    exclude = {Path(library.root)} if library else None
    urls = [r for r in roots if remote.is_url(r)]
    local = [r for r in roots if not remote.is_url(r)]
    entries = list(walk(local, follow_symlinks, on_error, exclude))
    found_urls, url_folders = remote.walk(urls, on_error) if urls else ([], set())
    entries += found_urls
    # folders (and prefixes) are matched by prefix, one query each; files by IN, a chunk a query,
    # so a file list of a million lines costs a few thousand queries, not a million
    folders = [r for r in local if os.path.isdir(r)] + sorted(url_folders)
    files = [r for r in roots if r not in folders]
    rows = known_rows(library, folders, files) if library else {}
    found = diff(entries, {p: (r[1], r[2]) for p, r in rows.items()},
                 unreachable=[s.path for s in scan_errors])
    known_bad: list[Skipped] = []
    if library and not retry_failed:
        found.new = _drop_known_failures(library, folders, files, found.new, known_bad, max_pixels)
    return Survey(len(entries), found, rows, scan_errors, known_bad)


def plan_index(library: Library | None, roots: Sequence[str], follow_symlinks: bool = False,
               retry_failed: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
               surveyed: Survey | None = None) -> Plan:
    """Walk, diff and hash: decide what each file needs, touching nothing.

    `library` None plans against an empty library (a dry run before the first). A root may
    be a folder, a file or an fsspec URL (`media.remote`: an object or a prefix).
    `surveyed`: the `survey` of these roots, when the caller made it already.
    """
    s = surveyed or survey(library, roots, follow_symlinks, retry_failed, max_pixels)
    found, rows = s.found, s.rows
    plan = Plan(scanned=s.entries, unchanged=len(found.unchanged), skipped=s.scan_errors + s.known_bad,
                known_bad=len(s.known_bad))

    digests = _hash_all(found.new + found.changed, plan.skipped)
    gone_by_hash: dict[str, list[tuple[int, str]]] = {}
    for path in found.gone:
        gone_by_hash.setdefault(rows[path][3], []).append((rows[path][0], os.path.basename(path)))
    gone_ids = {rows[p][0] for p in found.gone}
    stored = stored_ids(library, set(digests.values()), gone_ids) if library else {}
    encoding: set[str] = set()

    def place(work: Work) -> None:
        if work.digest in stored and stored[work.digest] != work.row_id:
            work.source_id = stored[work.digest]
            plan.copies.append(work)
        elif work.digest in encoding:
            plan.late_copies.append(work)
        else:
            encoding.add(work.digest)
            plan.encode.append(work)

    def move(entry: FileEntry, digest: str, candidates: list[tuple[int, str]], i: int) -> None:
        row_id = candidates.pop(i)[0]
        plan.moves.append(Work(entry, digest, row_id=row_id))
        stored.setdefault(digest, row_id)  # another copy of the moved file copies its vector

    new = [e for e in found.new if e.path in digests]
    rest = []
    for entry in new:  # a moved file usually keeps its name: match those first
        candidates = gone_by_hash.get(digests[entry.path], [])
        same_name = [i for i, (_, name) in enumerate(candidates) if name == os.path.basename(entry.path)]
        if same_name:
            move(entry, digests[entry.path], candidates, same_name[0])
        else:
            rest.append(entry)
    for entry in rest:
        digest = digests[entry.path]
        if gone_by_hash.get(digest):
            move(entry, digest, gone_by_hash[digest], -1)
        else:
            place(Work(entry, digest))
    for entry in found.changed:
        if entry.path not in digests:
            continue
        row_id, old_digest = rows[entry.path][0], rows[entry.path][3]
        work = Work(entry, digests[entry.path], row_id=row_id)
        plan.touches.append(work) if work.digest == old_digest else place(work)
    moved = {w.row_id for w in plan.moves}
    plan.gone = [(rows[p][0], p) for p in found.gone if rows[p][0] not in moved]
    return plan


def known_rows(library: Library, roots: Sequence[str],
               files: Sequence[str] = ()) -> dict[str, tuple[int, int, int, str]]:
    """path -> (id, size, mtime_ns, hash) for the rows at or under the roots, and of `files`."""
    out: dict[str, tuple[int, int, int, str]] = {}
    with reading(library) as reads:
        for where, params in scopes(roots, files):
            sql = f"SELECT id, path, path_bytes, size, mtime_ns, content_hash FROM images WHERE {where}"
            for row_id, path, path_bytes, size, mtime_ns, digest in reads.all(sql, params):
                out[path_from_db(path, path_bytes)] = (row_id, size, mtime_ns, digest)
    return out


def scopes(folders: Sequence[str], files: Sequence[str] = ()) -> Iterable[tuple[str, dict]]:
    """(WHERE clause, parameters) on `path`: one per folder (itself or under it), one per
    chunk of exact `files`."""
    for folder in folders:
        yield under_folder(path_to_db(folder)[0])
    for part in in_chunks(sorted({path_to_db(f)[0] for f in files})):
        listed, params = in_list(part, "f", str)
        yield f"path IN {listed}", params


class _Failure(NamedTuple):
    kind: str
    message: str
    at: object  # datetime (PostgreSQL) or SQLAlchemy's text form of one (SQLite)


def _drop_known_failures(library: Library, roots: Sequence[str], files: Sequence[str],
                         entries: list[FileEntry], known_bad: list[Skipped], max_pixels: int) -> list[FileEntry]:
    """Files that failed to decode and have not been touched since: report, do not retry.

    Without this, every run over a folder with one broken JPEG would load the model
    just to fail on it again. A new mtime or ctime (rewrite, chmod, copy) retries it.
    """
    if not entries:
        return entries
    failed: dict[str, _Failure] = {}
    with reading(library) as reads:
        for where, params in scopes(roots, files):
            # the newest failure per path (a window, not SQLite's bare-column max(): PostgreSQL too)
            sql = (f"SELECT path, kind, message, at FROM (SELECT path, kind, message, at, "
                   "row_number() OVER (PARTITION BY path ORDER BY at DESC, id DESC) AS newest "
                   f"FROM errors WHERE kind IN ({','.join(repr(k) for k in REMEMBERED_FAILURES)}) "
                   f"AND {where}) AS failures WHERE newest = 1")
            for path, kind, message, at in reads.all(sql, params):
                failed[path] = _Failure(kind, message, at)
    if not failed:
        return entries
    keep = []
    for entry in entries:
        row = failed.get(path_to_db(entry.path)[0])
        if row is not None and _still_failing(entry.path, row, max_pixels):
            known_bad.append(Skipped(entry.path, row.kind, row.message, known=True))
        else:
            keep.append(entry)
    return keep


def _still_failing(path: str, row: _Failure, max_pixels: int) -> bool:
    """Untouched since it failed (and, if too large, still over today's pixel limit)."""
    try:
        failed_at = datetime.fromisoformat(str(row.at)).replace(tzinfo=timezone.utc).timestamp()
        if remote.is_url(path):  # an object store keeps no ctime; a rewrite renews the mtime
            changed_at = remote.stat(path)[1] / 1e9
        else:
            st = os.stat(path)
            changed_at = max(st.st_mtime, st.st_ctime)
    except (OSError, ValueError):
        return False
    if changed_at >= failed_at:
        return False
    if row.kind != "too_large" or remote.is_url(path):  # a URL's pixel limit: read it again
        return True
    from retrieval.media.images import read_info  # Pillow: only for a too-large file's header

    try:  # the limit may have been raised: a header read (no decode) tells
        info = read_info(path)
    except ImageError as exc:
        return exc.kind == "too_large"
    return info.width * info.height > max_pixels


def _hash_all(entries: list[FileEntry], skipped: list[Skipped]) -> dict[str, str]:
    """Content hashes in a few threads (hashlib releases the GIL); failures become Skipped."""
    def one(entry: FileEntry) -> tuple[FileEntry, str | Skipped]:
        try:
            return entry, (remote.content_hash if remote.is_url(entry.path) else content_hash)(entry.path)
        except FileNotFoundError:
            return entry, Skipped(entry.path, "vanished", f"{entry.path}: file no longer exists")
        except PermissionError:
            return entry, Skipped(entry.path, "unreadable", f"{entry.path}: permission denied")
        except OSError as exc:
            return entry, Skipped(entry.path, "unreadable", f"{entry.path}: {exc.strerror or exc}")

    digests: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for entry, result in pool.map(one, entries):
            if isinstance(result, Skipped):
                skipped.append(result)
            else:
                digests[entry.path] = result
    return digests


def stored_ids(library: Library, digests: set[str], exclude: set[int]) -> dict[str, int]:
    """content hash -> id of a stored row with that content (not one about to be deleted)."""
    out: dict[str, int] = {}
    if not digests:
        return out
    with reading(library) as reads:
        for part in in_chunks(sorted(digests)):
            listed, params = in_list(part, "h", str)
            for row_id, digest in reads.all(
                    f"SELECT id, content_hash FROM images WHERE content_hash IN {listed} ORDER BY id", params):
                if row_id not in exclude:
                    out.setdefault(digest, row_id)
    return out


def check_roots(roots: Iterable[str | os.PathLike], missing_ok: bool = False) -> list[str]:
    """Absolute roots (URLs in fsspec's spelling); a missing one is a typo to report, not a
    folder to empty. `missing_ok` (a file list's lines): kept, and skipped as vanished."""
    out = [remote.canonical(r) if remote.is_url(r) else os.path.abspath(r)
           for r in (os.fsdecode(x) for x in roots)]
    if not out:
        raise InputError("nothing to index: give one or more folders or image files")
    if not missing_ok:
        for root in out:
            if not (remote.exists(root) if remote.is_url(root) else os.path.lexists(root)):
                raise InputError(f"no such file or folder: {root}")
    return out


def read_file_list(lines: Iterable[str], source: str = "the file list") -> list[str]:
    """The paths and URLs of a file list: one a line; blank lines are skipped."""
    out = [line.rstrip("\r\n") for line in lines]
    out = [line for line in out if line.strip()]
    if not out:
        raise InputError(f"{source} names no files")
    return out

