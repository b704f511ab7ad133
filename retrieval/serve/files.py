"""Which files the server may send: indexed ones only, and only where the index found them.

A request names an image by id (pages) or by its absolute path (`/file/...`);
either way the answer comes from the database, never from joining a request
string onto a folder. On top of that a path with `..`, a relative path, a NUL
or a path whose real location (symlinks resolved) is not itself an indexed
path is refused, and the file must still be the regular file that was indexed
(same size and modification time).
"""

from __future__ import annotations

import os
import stat

from retrieval.serve import catalog
from retrieval.serve.catalog import ImageRow
from retrieval.store.schema import path_to_db


class Refused(Exception):
    """A request for a file the server will not send; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def row_for_path(conn, requested: str) -> ImageRow:
    """The indexed image at exactly this absolute path, or Refused."""
    if "\x00" in requested:
        raise Refused(400, "bad path")
    if not requested.startswith("/"):
        raise Refused(400, "only absolute paths of indexed images")
    if ".." in requested.split("/") or "." in requested.split("/")[1:]:
        raise Refused(400, "paths with . or .. are refused")
    row = catalog.image_by_path(conn, path_to_db(requested)[0])
    if row is None:
        raise Refused(404, "not an indexed image")
    return row


def checked_path(conn, row: ImageRow) -> str:
    """The row's file, if it is still the regular file that was indexed and not a way out."""
    path = row.path
    real = os.path.realpath(path)
    if real != os.path.abspath(path) and catalog.image_by_path(conn, path_to_db(real)[0]) is None:
        raise Refused(403, "the indexed path now leads outside the indexed files (symlink)")
    try:
        st = os.stat(real)
    except OSError:
        raise Refused(404, "the indexed file is gone from disk") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(403, "not a regular file")
    if (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns):
        raise Refused(409, "the file changed since it was indexed (run `clipfind index` again)")
    return real
