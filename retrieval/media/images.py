"""Safe image decoding for indexing and queries.

A collection of a hundred thousand photos always holds a few broken ones:
empty files, half-copied JPEGs, a text file named ``.jpg``, a 30 000-pixel
panorama. The indexer must skip those with a one-line reason and carry on, so
everything here either returns an RGB ``PIL.Image`` or raises ``ImageError``
with a short ``kind`` the caller can count and report, never a raw
PIL/OS exception. Nothing here changes Pillow's global settings
(``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``), so other code is unaffected.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError, features

from retrieval.media.formats import (  # noqa: F401 - re-exported: what a file is, told without Pillow
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    KINDS,
    ImageError,
    is_candidate,
    sniff_bytes,
    sniff_format,
)
from retrieval.media.regular import NotRegularFile, PathArg, open_regular

try:  # HEIC/HEIF photos from phones need a plugin; optional.
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except Exception:  # a broken plugin is the same as no plugin
    HEIF_SUPPORTED = False

try:  # Pillow >= 11.2 decodes AVIF itself when built with libavif.
    AVIF_SUPPORTED = bool(features.check_module("avif"))
except ValueError:
    AVIF_SUPPORTED = False
if not AVIF_SUPPORTED:
    try:
        import pillow_avif  # noqa: F401 - importing registers the plugin

        AVIF_SUPPORTED = True
    except Exception:
        AVIF_SUPPORTED = False

_ORIENTATION = 0x0112
_DATETIME = 306
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 36867
_SUBSEC_ORIGINAL = 37521
_OFFSET_ORIGINAL = 36881


@dataclass
class ImageInfo:
    """Header facts; width/height are as displayed (after EXIF orientation)."""

    width: int
    height: int
    format: str | None
    taken_at: datetime | None


def open_image(
    path: PathArg,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    data: bytes | None = None,
) -> Image.Image:
    """Decode the first frame, upright and RGB, or raise ImageError.

    ``draft_size`` is the smallest (width, height) the caller needs after EXIF
    orientation; JPEGs then decode at 1/2, 1/4 or 1/8 scale while keeping each
    side >= that size, which is most of the cost of feeding a small model.
    ``data``: the file's bytes, already read (an object behind a URL, `media.remote`).
    """
    with _opened(path, data) as img:
        _check_pixels(img, max_pixels, path)
        orientation = _orientation(img)
        try:
            if draft_size is not None:
                want = draft_size[::-1] if orientation in (5, 6, 7, 8) else draft_size
                img.draft("RGB", (max(1, want[0]), max(1, want[1])))
            img.load()
        except Exception as exc:  # plugins raise anything
            raise _decode_error(exc, path) from exc
        try:
            upright = ImageOps.exif_transpose(img) if orientation != 1 else img
        except Exception:  # bad EXIF must not lose a good image
            upright = img
        try:
            rgb = _to_rgb(upright)
        except Exception as exc:
            raise _decode_error(exc, path) from exc
        # A result that is still `img` would hold our closed file; detach it.
        return rgb.copy() if rgb is img else rgb


def read_info(path: PathArg, data: bytes | None = None) -> ImageInfo:
    """Size, format and capture time from the header alone (no pixel decode)."""
    with _opened(path, data) as img:
        width, height = img.size
        if _orientation(img) in (5, 6, 7, 8):
            width, height = height, width
        return ImageInfo(width, height, img.format, _taken_at(img))


def _name(path: PathArg) -> str:
    return os.path.basename(os.fsdecode(path)) or os.fsdecode(path)


@contextmanager
def _opened(path: PathArg, data: bytes | None = None) -> Iterator[Image.Image]:
    """A header-parsed PIL image on an open file (or on `data`), with every failure mapped."""
    name = _name(path)
    if data is not None:
        if not data:
            raise ImageError("empty", f"{name}: empty file (0 bytes)")
        with io.BytesIO(data) as fh:
            yield _parse_header(fh, path)
        return
    try:
        raw, st = open_regular(path)  # never blocks on a FIFO, never reads a device
    except NotRegularFile as exc:
        raise ImageError("not_image", f"{name}: {exc.strerror}") from None
    except OSError as exc:
        raise _os_error(exc, path) from exc
    with raw:
        if st.st_size == 0:
            raise ImageError("empty", f"{name}: empty file (0 bytes)")
        with io.BufferedReader(raw) as fh:
            yield _parse_header(fh, path)


def _parse_header(fh: BinaryIO, path: PathArg) -> Image.Image:
    name = _name(path)
    try:
        fmt = sniff_bytes(fh.read(64))
        fh.seek(0)
    except OSError as exc:
        raise _os_error(exc, path) from exc
    if fmt == "HEIF" and not HEIF_SUPPORTED:
        raise ImageError("unsupported", f"{name}: HEIC/HEIF needs `pip install pillow-heif`")
    if fmt == "AVIF" and not AVIF_SUPPORTED:
        raise ImageError("unsupported", f"{name}: AVIF needs `pip install pillow-avif-plugin`")
    try:
        with warnings.catch_warnings():  # our own pixel limit decides, and says so in the skip report
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fh)
    except UnidentifiedImageError as exc:
        if fmt is not None:
            raise ImageError("corrupt", f"{name}: {fmt} header unreadable") from exc
        if os.path.splitext(os.fsdecode(path))[1].lower() in IMAGE_EXTENSIONS:
            raise ImageError("corrupt", f"{name}: not a valid image despite its name") from exc
        raise ImageError("not_image", f"{name}: not an image file") from exc
    except Exception as exc:  # plugins raise anything: struct.error, ValueError, ...
        raise _decode_error(exc, path) from exc


def _os_error(exc: OSError, path: PathArg) -> ImageError:
    name = _name(path)
    if isinstance(exc, FileNotFoundError):
        return ImageError("vanished", f"{name}: file no longer exists")
    if isinstance(exc, PermissionError):
        return ImageError("unreadable", f"{name}: permission denied")
    return ImageError("unreadable", f"{name}: {exc.strerror or exc}")


def _decode_error(exc: Exception, path: PathArg) -> ImageError:
    name = _name(path)
    if isinstance(exc, MemoryError):
        return ImageError("too_large", f"{name}: out of memory while decoding")
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError("too_large", f"{name}: {exc}")
    text = str(exc)
    if "truncated" in text or isinstance(exc, EOFError):
        return ImageError("truncated", f"{name}: truncated file (incomplete copy or download?)")
    if isinstance(exc, OSError) and exc.errno is not None:
        return _os_error(exc, path)
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return ImageError("corrupt", f"{name}: cannot decode ({first_line})")


def _check_pixels(img: Image.Image, max_pixels: int, path: PathArg) -> None:
    (width, height), name = img.size, _name(path)
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"{name}: header says {width}x{height}")
    if width * height > max_pixels:
        raise ImageError("too_large", f"{name}: {width}x{height} is over {max_pixels:,} pixels")


def _exif(img: Image.Image) -> Image.Exif | None:
    """EXIF without decoding pixels (so a PNG's eXIf chunk after IDAT is not seen)."""
    if img.format == "PNG" and "exif" not in img.info:
        return None
    try:
        return img.getexif()
    except Exception:  # malformed EXIF is common and must not cost the image
        return None


def _orientation(img: Image.Image) -> int:
    value = (_exif(img) or {}).get(_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _taken_at(img: Image.Image) -> datetime | None:
    exif = _exif(img)
    try:
        sub = exif.get_ifd(_EXIF_IFD) if exif is not None else {}
    except Exception:
        sub = {}
    when = _parse_exif_datetime(sub.get(_DATETIME_ORIGINAL))
    if when is None:
        return _parse_exif_datetime(exif.get(_DATETIME)) if exif is not None else None
    subsec = str(sub.get(_SUBSEC_ORIGINAL) or "").strip("\x00 ")
    if subsec.isdigit():
        when = when.replace(microsecond=int(subsec[:6].ljust(6, "0")))
    offset = str(sub.get(_OFFSET_ORIGINAL) or "").strip("\x00 ")
    if len(offset) == 6 and offset[0] in "+-" and offset[1:3].isdigit() and offset[4:].isdigit():
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
        if delta < timedelta(hours=24):
            when = when.replace(tzinfo=timezone(-delta if offset[0] == "-" else delta))
    return when


def _parse_exif_datetime(value: object) -> datetime | None:
    """EXIF "YYYY:MM:DD HH:MM:SS" (camera local time); blanks and zeros are None."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip("\x00 ")[:19].replace("-", ":").replace("T", " ")
    try:
        return datetime.strptime(text, "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for the encoder; transparency goes on white, 16-bit is scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16"):
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
    if mode in ("I", "F"):
        low, high = img.getextrema()
        if high > 255:
            scale = 1 / 256 if high <= 65535 and low >= 0 else 255 / max(high - low, 1)
            shift = 0 if high <= 65535 and low >= 0 else -low * scale
            img = img.point(lambda v: v * scale + shift)
        return img.convert("L").convert("RGB")
    return img.convert("RGB")
