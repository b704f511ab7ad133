"""Which files are images worth trying, told from names and first bytes: no Pillow.

Why apart from `images`: walking a folder (`media.scan`) needs only this, and an
unchanged `clipfind index` re-run walks and stops (`retrieval.index.rerun`);
importing Pillow for it was a tenth of that run. `images` re-exports all of it.
"""

from __future__ import annotations

import os
import stat

from retrieval.errors import InputError
from retrieval.media.regular import PathArg

# 100 MP: above every common camera; a decode past it costs > 300 MB of RGB.
# Pillow itself refuses more than 2 * Image.MAX_IMAGE_PIXELS (~179 MP by default)
# while reading the header; that is reported as "too_large" too.
DEFAULT_MAX_PIXELS = 100_000_000

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib",
     ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

KINDS = ("corrupt", "truncated", "empty", "not_image", "too_large", "unreadable",
         "vanished", "unsupported")

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}


class ImageError(InputError):
    """An image that cannot be used; ``kind`` is one of ``KINDS``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def sniff_format(path: PathArg) -> str | None:
    """Format from the file's first bytes, in Pillow's names; None if no image.

    Extensions lie (``.jpg`` that is a PNG, exports without a suffix), so the
    content decides. Non-regular files (FIFOs, devices) are never opened.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return None
    return sniff_bytes(head)


def sniff_bytes(head: bytes) -> str | None:
    """`sniff_format` on a file's first 64 bytes, already read."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 18:
        if int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
            return "BMP"
    if head[4:8] == b"ftyp" and len(head) >= 12:
        box_end = min(len(head), int.from_bytes(head[:4], "big") or len(head))
        brands = {head[8:12]} | {head[i:i + 4] for i in range(16, box_end - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
    return None


def is_candidate(path: PathArg) -> bool:
    """Worth trying to index: an image extension, or no extension and image bytes.

    Files with another extension are not sniffed (``photo.jpg_original`` backups
    from exiftool are copies we do not want twice).
    """
    suffix = os.path.splitext(os.fsdecode(path))[1].lower()
    if suffix in IMAGE_EXTENSIONS:
        return True
    return suffix == "" and sniff_format(path) is not None
