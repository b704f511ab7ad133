"""Walking collections and telling what changed, without touching the database.

Incremental indexing is keyed on (path, size, mtime_ns), as in rclip: a stat
per file is cheap, hashing every file on every run is not. ``walk`` lists what
is on disk now, ``diff`` sorts it against what the database holds, and the
indexer only decodes what is new or changed. Content hashes (``content_hash``)
are for the indexer to spot moves and duplicates among the new files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.media.formats import is_candidate
from retrieval.media.regular import file_kind, open_regular

log = logging.getLogger(__name__)

OnError = Callable[[str, str], None]


@dataclass(frozen=True)
class FileEntry:
    """One image file as found on disk.

    ``path`` is absolute and not symlink-resolved (the path the user knows).
    Names that are not valid UTF-8 come through ``os.fsdecode`` as lone
    surrogates; ``open()`` and ``os`` calls accept them as they are, but to store
    one in SQLite encode it with ``os.fsencode`` (or UTF-8 + surrogateescape).
    """

    path: str
    size: int
    mtime_ns: int


@dataclass
class ScanDiff:
    """``walk`` output sorted against the database.

    ``unchanged`` also holds known paths that could not be checked this time
    (an unreadable folder): keep those rows, do not treat them as gone.
    """

    new: list[FileEntry] = field(default_factory=list)
    changed: list[FileEntry] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)


def walk(
    roots: Iterable[Path | str],
    follow_symlinks: bool = False,
    on_error: OnError | None = None,
    exclude: set[Path] | None = None,
) -> Iterator[FileEntry]:
    """Yield candidate image files under ``roots``, depth first, names sorted.

    A root may be a folder or a single file (a root that is a symlink is
    followed: the user named it). Below it, symlinked files are listed (their
    target's size and mtime); symlinked folders are entered only with
    ``follow_symlinks``, and no folder is entered twice (tracked by device and
    inode), so link loops end and overlapping roots are walked once; a file
    named as a root inside a walked folder can repeat, which ``diff`` drops.
    FIFOs and devices are never opened; they are reported to ``on_error`` as
    "not a regular file (FIFO)" and so on. ``exclude`` folders (the
    library's own directory) are skipped wherever they appear. Unreadable or
    vanished entries go to ``on_error(path, reason)`` (or the log) and the walk
    goes on: one bad folder must not stop a scan of a million files.
    """
    report = on_error or _log_error
    visited: set[tuple[int, int]] = set()
    for excluded in exclude or ():
        try:
            st = os.stat(excluded)
            visited.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    for root in roots:
        top = os.path.abspath(os.fsdecode(root))
        try:
            st = os.stat(top)
        except OSError as exc:
            report(top, _reason(exc, os.path.islink(top)))
            continue
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) not in visited:
                visited.add((st.st_dev, st.st_ino))
                yield from _walk_dir(top, follow_symlinks, report, visited)
        elif stat.S_ISREG(st.st_mode) and is_candidate(top):
            yield FileEntry(top, st.st_size, st.st_mtime_ns)
        else:
            report(top, "not an image file")


def _walk_dir(
    top: str, follow_symlinks: bool, report: OnError, visited: set[tuple[int, int]]
) -> Iterator[FileEntry]:
    # An explicit stack of listings, not recursion: trees can be very deep.
    stack = [iter(_listing(top, report))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        try:
            if entry.is_dir(follow_symlinks=False) or (
                entry.is_symlink() and entry.is_dir(follow_symlinks=True)
            ):
                if follow_symlinks or not entry.is_symlink():
                    st = entry.stat(follow_symlinks=True)
                    if (st.st_dev, st.st_ino) not in visited:
                        visited.add((st.st_dev, st.st_ino))
                        stack.append(iter(_listing(entry.path, report)))
                continue
            if not entry.is_file(follow_symlinks=True) and not entry.is_symlink():
                # FIFOs, sockets, devices: never opened, but counted as skipped
                st = entry.stat(follow_symlinks=False)
                report(entry.path, f"not a regular file ({file_kind(st.st_mode)})")
                continue
            if not is_candidate(entry.path):
                continue
            st = entry.stat(follow_symlinks=True)
            if stat.S_ISREG(st.st_mode):
                yield FileEntry(entry.path, st.st_size, st.st_mtime_ns)
            else:  # a symlink to a FIFO or device
                report(entry.path, f"not a regular file ({file_kind(st.st_mode)})")
        except OSError as exc:
            report(entry.path, _reason(exc, entry.is_symlink()))


def _listing(path: str, report: OnError) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        report(path, _reason(exc, False))
        return []


def _reason(exc: OSError, is_link: bool) -> str:
    if isinstance(exc, FileNotFoundError):
        return "broken symlink" if is_link else "vanished"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc)


def _log_error(path: str, reason: str) -> None:
    log.warning("skipped %s: %s", path, reason)


def content_digest():
    """A fresh digest of the kind every content hash is (BLAKE2b-128): local files and URLs alike,
    so the same bytes anywhere are one image."""
    return hashlib.blake2b(digest_size=16)


def content_hash(path: str | os.PathLike[str] | bytes, chunk: int = 1 << 20) -> str:
    """BLAKE2b-128 hex of the file's bytes, read in ``chunk``-sized pieces.

    128 bits is plenty to tell files apart and keeps the column short. Raises
    OSError as ``open`` does; the indexer decides whether that is "vanished".
    Only a regular file is read, and only as many bytes as it had when opened
    (``NotRegularFile`` for a FIFO or device: `/dev/zero` would never end).
    """
    digest = content_digest()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    fh, st = open_regular(path)
    left = st.st_size
    with fh:
        while left > 0 and (n := fh.readinto(view[:min(chunk, left)])):
            digest.update(view[:n])
            left -= n
    return digest.hexdigest()


def diff(
    entries: Iterable[FileEntry],
    known: Mapping[str, tuple[int, int]],
    unreachable: Iterable[str] = (),
) -> ScanDiff:
    """Sort a walk against ``known`` (path -> (size, mtime_ns) in the database).

    ``known`` must cover only the roots that were walked, or files outside them
    come back as gone. Pass the paths ``walk`` reported to ``on_error`` as
    ``unreachable``: known files at or under them stay ``unchanged`` instead of
    ``gone``, so an unmounted disk or a permission slip deletes nothing.

    A gone path plus a new one with the same ``content_hash`` is a move or
    rename; new files sharing a hash are duplicates. Detecting those is the
    indexer's job (it can reuse the stored vector instead of re-encoding).
    """
    result = ScanDiff()
    seen: set[str] = set()
    for entry in entries:
        if entry.path in seen:
            continue
        seen.add(entry.path)
        old = known.get(entry.path)
        if old is None:
            result.new.append(entry)
        elif tuple(old) != (entry.size, entry.mtime_ns):
            result.changed.append(entry)
        else:
            result.unchanged.append(entry.path)
    prefixes = tuple(p.rstrip(os.sep) for p in unreachable)
    for path in sorted(set(known) - seen):
        if any(path == p or path.startswith(p + os.sep) for p in prefixes):
            result.unchanged.append(path)
        else:
            result.gone.append(path)
    return result
