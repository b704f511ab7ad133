"""Opening only regular files, and reading no more than their size.

`/dev/zero`, `/dev/urandom` or a FIFO named `photo.jpg` never end (or never
start): hashing or decoding one used to pin a core forever, and through the
server it held the lock every query needs. Everything that reads a file the
user named, or that a walk found, opens it here: the open does not block (a
FIFO with no writer would), the kind of file is checked on the open
descriptor (no stat-then-open race), and reads stop at the size it had.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

PathArg = str | os.PathLike[str] | bytes


class NotRegularFile(OSError):
    """A FIFO, device, socket or folder where a file's bytes were wanted."""

    def __init__(self, path: PathArg, mode: int) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({file_kind(mode)})", os.fsdecode(path))


def file_kind(mode: int) -> str:
    """'FIFO', 'character device', ... for a stat mode: what the one-line error names."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "folder"), (stat.S_ISREG, "file")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: PathArg) -> tuple[BinaryIO, os.stat_result]:
    """(binary file, its stat) if `path` is a regular file; NotRegularFile or OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, st.st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0), st
    except BaseException:
        os.close(fd)
        raise

