"""Which files the server may send: indexed ones only, and only where the index found them.

A request names an image by id (pages) or by its absolute path (`/file/...`);
either way the answer comes from the database, never from joining a request
string onto a folder. On top of that a path with `..`, a relative path, a NUL
or a path whose real location (symlinks resolved) is not itself an indexed
path is refused, and the file must still be the regular file that was indexed
(same size and modification time).

A row indexed from an fsspec URL (`s3://...`, `file:///...`, `memory://...`) keeps its
URL as its path: it is read through `media.remote`, under the same promises (gone: 404,
changed since indexing: 409) and a size cap, since its bytes are held in memory whole.
"""

from __future__ import annotations

import os
import stat

from retrieval.errors import UsageError
from retrieval.media import remote
from retrieval.serve import catalog
from retrieval.serve.catalog import ImageRow
from retrieval.store.schema import path_to_db

MAX_OBJECT_BYTES = 64 << 20  # a URL row's object is held in memory: a camera's RAW fits, a video not


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


def is_remote(row: ImageRow) -> bool:
    """Indexed from an fsspec URL (its path is the URL), not from a local file."""
    return remote.is_url(row.path)


def checked_object(row: ImageRow, max_bytes: int | None = None) -> bytes:
    """A URL row's bytes, if the object is still the one that was indexed and not over `max_bytes`
    (default `MAX_OBJECT_BYTES`)."""
    max_bytes = MAX_OBJECT_BYTES if max_bytes is None else max_bytes
    too_large = Refused(413, f"the object is larger than the server reads ({max_bytes >> 20} MiB)")
    if row.size > max_bytes:  # refused before anything is fetched
        raise too_large
    try:
        return remote.read_indexed(row.path, row.size, row.mtime_ns, max_bytes)
    except FileNotFoundError:
        raise Refused(404, "the indexed object is gone from its store") from None
    except remote.ObjectChanged:
        raise Refused(409, "the object changed since it was indexed (run `clipfind index` again)") from None
    except remote.ObjectTooLarge:
        raise too_large from None
    except UsageError as exc:  # no backend for the protocol (s3fs, ...) on this server
        raise Refused(501, f"this server cannot read the object: {exc}") from None
    except PermissionError:
        raise Refused(502, "the object's store refused the read (permission denied)") from None
    except OSError as exc:
        raise Refused(502, f"the object's store did not answer: {exc.strerror or exc}") from None
    except Exception as exc:  # backends raise their own types (botocore, aiohttp, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise Refused(502, f"the object's store failed the read: {first}") from None
