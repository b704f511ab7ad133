"""Query images sent by the browser: checked, kept by content hash, so a search URL can name one.

An upload is decoded once with the indexer's safe decoder (bounded pixels,
every failure a one-line ImageError) before it is kept; its name is its
SHA-256, so `?upload=<hash>` in a search URL can be bookmarked and the same
photo uploaded twice is stored once. A photo that is in the library is found
by its content hash and answers with its stored vector (score 1.0).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from retrieval.errors import InputError
from retrieval.media.images import open_image

DIR_NAME = "uploads"
_HASH = re.compile(r"^[0-9a-f]{64}$")


class Uploads:
    def __init__(self, library_root: Path, max_pixels: int) -> None:
        self.dir = Path(library_root) / DIR_NAME
        self.max_pixels = max_pixels

    def add(self, data: bytes) -> dict:
        """Keep `data` if it decodes as an image within the pixel limit; its hash names it."""
        if not data:
            raise InputError("the upload is empty")
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest, must_exist=False)
        if not target.exists():
            self.dir.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".upload-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                image = open_image(tmp, max_pixels=self.max_pixels)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            image = open_image(target, max_pixels=self.max_pixels)
        return {"upload": digest, "width": image.width, "height": image.height, "bytes": len(data)}

    def path(self, digest: str, must_exist: bool = True) -> Path:
        if not _HASH.match(digest):
            raise InputError("an upload is named by its 64-hex-digit SHA-256")
        target = self.dir / digest
        if must_exist and not target.is_file():
            raise InputError("no such upload (upload the image again)")
        return target
