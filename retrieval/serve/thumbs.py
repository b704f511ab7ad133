"""Thumbnails on demand: EXIF-upright WebP in two sizes, cached on disk by content hash.

Keyed by the content hash the indexer stored, so a moved or renamed file keeps
its thumbnails and identical copies share them. A page of 60 results asks for
60 thumbnails at once; a lock per key makes sure each original is decoded at
most once even when requests race. JPEGs decode at a reduced scale (Pillow's
draft mode), which is most of the cost of a miss on a 12-MP photo.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from retrieval.media.images import open_image

SIZES = {"small": 320, "large": 1280}
QUALITY = {"small": 75, "large": 85}
DIR_NAME = "thumbs"


class ThumbnailCache:
    def __init__(self, library_root: Path) -> None:
        self.dir = _writable_dir(Path(library_root) / DIR_NAME)
        self.decodes = 0  # originals decoded, for tests and the benchmark
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path_for(self, content_hash: str, size: str) -> Path:
        return self.dir / size / content_hash[:2] / f"{content_hash}.webp"

    def get(self, content_hash: str, size: str, original: str,
            read: Callable[[], bytes] | None = None) -> tuple[Path, bool]:
        """(thumbnail file, whether it was already cached); makes it from `original` if needed.

        `read`: fetches the original's bytes (a URL row), called only on a miss, under the key's lock.
        """
        target = self.path_for(content_hash, size)
        if target.exists():
            return target, True
        key = f"{size}/{content_hash}"
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if target.exists():  # made by the request we waited for
                return target, True
            self._make(original, target, SIZES[size], QUALITY[size], read() if read else None)
        with self._guard:
            self._locks.pop(key, None)
        return target, False

    def _make(self, original: str, target: Path, px: int, quality: int, data: bytes | None) -> None:
        image = open_image(original, draft_size=(px, px), data=data)
        self.decodes += 1
        image.thumbnail((px, px))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".thumb-", suffix=".webp")
        try:
            with os.fdopen(fd, "wb") as fh:
                image.save(fh, "WEBP", quality=quality, method=2)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _writable_dir(preferred: Path) -> Path:
    """The library's own cache folder, or a private temp one when the library is read-only."""
    try:
        preferred.mkdir(exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"clipfind-thumbs-{os.getuid()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    return fallback
