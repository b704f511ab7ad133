"""One writer at a time on a SQLite library: an flock on `write.lock` in its folder.

Apart from `library` (SQLAlchemy) so that an unchanged `clipfind index` re-run
(`retrieval.index.rerun`, stdlib only) takes the very lock every writer takes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from retrieval.errors import LibraryError

LOCK_NAME = "write.lock"


@contextlib.contextmanager
def sqlite_write_lock(root: Path, db_path: Path, wait: bool,
                      busy: Callable[[str], LibraryError]) -> Iterator[None]:
    """Hold the library's write lock for the block; `busy(holder)` is raised when another
    process holds it and `wait` is False. The lock file says which process holds it."""
    lock_path = Path(root) / LOCK_NAME
    for needed in (root, db_path):
        if not os.access(needed, os.W_OK):
            raise LibraryError(f"cannot write to {needed}: permission denied (commands that "
                               "change a library need write permission on its folder and files)")
    try:
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise LibraryError(f"cannot take the write lock {lock_path}: {exc.strerror or exc} "
                           "(commands that change a library need write permission on it)") from None
    with handle as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise busy(holder) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)
