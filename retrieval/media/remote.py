"""Images named by fsspec URLs (`s3://bucket/photos/`, `gs://...`, `file:///data/x.jpg`, `memory://...`).

Why fsspec: a collection in an object store is listed, hashed and read the same way
whatever the store, and fsspec (a dependency of torch and of Ray Data already) owns the
protocols; the backend of each (s3fs, gcsfs, ...) is the user's to install. A URL row
keeps its URL as its path, so a re-run diffs it by (URL, size, mtime) like a local file.
Local paths never come through here: they keep `media.regular`'s guards (no FIFOs, no
devices). Every failure is one line: an unknown protocol or a missing backend is a usage
error, an unreadable object is skipped like an unreadable file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from retrieval.errors import InputError, UsageError
from retrieval.media.formats import IMAGE_EXTENSIONS, ImageError
from retrieval.media.scan import FileEntry, content_digest

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created", "ctime",
               "date_time")  # date_time: a zip member's (y, m, d, H, M, S), no zone (read as UTC)


class ObjectChanged(Exception):
    """The object is not the one that was indexed: another size or modification time."""


class ObjectTooLarge(Exception):
    """The object is larger than the caller will hold in memory."""


def is_url(path: str | os.PathLike | bytes) -> bool:
    """A URL for fsspec (`scheme://...`, chains like `zip://a.jpg::file:///x.zip` included)."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return bool(_URL.match(text))


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`, or one line saying what to install."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise UsageError(f"{url}: URLs need fsspec: pip install 'clipfind[ray]'") from None
    try:
        return url_to_fs(url)
    except ImportError as exc:  # a known protocol whose backend (s3fs, gcsfs, ...) is missing
        first = (str(exc).strip().splitlines() or ["its fsspec backend is not installed"])[0]
        raise UsageError(f"{url}: {first}") from None
    except ValueError as exc:  # "Protocol not known: ..."
        raise UsageError(f"{url}: {exc}") from None


def canonical(url: str) -> str:
    """The URL as it is stored: fsspec's own spelling (`file:///a/b.jpg`, `memory:///x`)."""
    fs, path = filesystem(url)
    if "::" in url:  # a chained URL: fsspec cannot write one back; keep the user's, less end slashes
        head, _, chain = url.partition("::")
        prefix = _folder_prefix(head)
        return f"{prefix if prefix.endswith('://') else prefix[:-1]}::{chain.rstrip('/')}"
    return fs.unstrip_protocol(path.rstrip("/") or "/")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return bool(fs.exists(path))
    except OSError:
        return False


def mtime_ns(info: dict) -> int:
    """Modification time from an fsspec info dict (each backend names it differently); 0 if none."""
    for key in _MTIME_KEYS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, tuple) and len(value) == 6:
            try:
                value = datetime(*value, tzinfo=timezone.utc)
            except (TypeError, ValueError):
                continue
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            value = (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
        if isinstance(value, (int, float)):
            return int(round(float(value) * 1e9))
    return 0


def walk(roots: Iterable[str], on_error: Callable[[str, str], None]) -> tuple[list[FileEntry], set[str]]:
    """(image objects at or under the URL `roots`, the roots that are folders/prefixes).

    Only image extensions are listed (an object store cannot be sniffed without a read per
    object). A root that does not answer is reported to `on_error`, and the walk goes on.
    """
    entries, folders = [], set()
    for root in roots:
        fs, path = filesystem(root)
        try:
            info = fs.info(path)
            if info.get("type") == "directory":
                folders.add(root)
                found = fs.find(path, detail=True)
                for name in sorted(found):
                    item = found[name]
                    if item.get("type", "file") == "file" and _is_image_name(name):
                        entries.append(FileEntry(_join(root, path, name), int(item.get("size") or 0),
                                                 mtime_ns(item)))
            elif _is_image_name(path):
                entries.append(FileEntry(root, int(info.get("size") or 0), mtime_ns(info)))
            else:
                on_error(root, "not an image file")
        except FileNotFoundError:
            on_error(root, "vanished")
        except PermissionError:
            on_error(root, "permission denied")
        except OSError as exc:
            on_error(root, exc.strerror or str(exc))
    return entries, folders


def stat(url: str) -> tuple[int, int]:
    """(size, mtime_ns) of one object; OSError as the backend raises it."""
    fs, path = filesystem(url)
    info = fs.info(path)
    return int(info.get("size") or 0), mtime_ns(info)


def content_hash(url: str, chunk: int = 1 << 20) -> str:
    """The same BLAKE2b-128 as `media.scan.content_hash`, so a URL and a local copy of the
    same bytes are one image (a duplicate, not a second encoding)."""
    digest = content_digest()
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_bytes(url: str) -> bytes:
    """The object's bytes, or ImageError (vanished / unreadable) like a local file's."""
    name = url.rsplit("/", 1)[-1] or url
    try:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageError("vanished", f"{name}: file no longer exists") from None
    except PermissionError:
        raise ImageError("unreadable", f"{name}: permission denied") from None
    except (OSError, UsageError) as exc:
        raise ImageError("unreadable", f"{name}: {getattr(exc, 'strerror', None) or exc}") from None


def read_indexed(url: str, size: int, mtime: int, max_bytes: int) -> bytes:
    """The bytes of the object indexed as (url, size, mtime), read whole but never past `max_bytes`.

    Why a second check after the read: the store may replace the object between the listing and
    the read, so what comes back must still be `size` bytes. FileNotFoundError (gone),
    ObjectChanged, ObjectTooLarge, UsageError (no backend) or OSError (the store did not answer).
    """
    fs, path = filesystem(url)
    info = fs.info(path)
    if info.get("type", "file") != "file":
        raise FileNotFoundError(url)
    if (int(info.get("size") or 0), mtime_ns(info)) != (size, mtime):
        raise ObjectChanged(url)
    if size > max_bytes:
        raise ObjectTooLarge(url)
    with fs.open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ObjectTooLarge(url)
    if len(data) != size:
        raise ObjectChanged(url)
    return data


def check(url: str) -> str:
    """`url` canonical, once it is known to exist; else one line (exit 5 / 2)."""
    text = canonical(url)
    if not exists(text):
        raise InputError(f"no such file or folder: {text}")
    return text


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name.rsplit("/", 1)[-1])[1].lower() in IMAGE_EXTENSIONS


def _join(root: str, path: str, name: str) -> str:
    """The URL of `name` (a path inside the filesystem of `root`, found under `path`).

    A chained root names the inner path first: `zip://photos::file:///x.zip` holds
    `zip://photos/a.jpg::file:///x.zip`, not `.../x.zip/a.jpg`."""
    rest = name[len(path.rstrip("/")):].lstrip("/") if name.startswith(path.rstrip("/")) else name
    head, sep, chain = root.partition("::")
    return f"{_folder_prefix(head)}{rest}{sep}{chain}"


def _folder_prefix(head: str) -> str:
    """`zip://photos/` for `zip://photos` or `zip://photos/`, and `zip://` for the archive's root."""
    scheme, _, inner = head.partition("://")
    inner = inner.rstrip("/")
    return f"{scheme}://{inner}/" if inner else f"{scheme}://"
