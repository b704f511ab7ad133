"""One file in, its preprocessed pixels and header facts out (or why it is unusable): no torch.

The DataLoader pipeline (`retrieval.media.pipeline`) and the Ray engine's decode tasks
(`retrieval.index.ray_pipeline`) both decode through `decode_file`, so a file gives the
same pixels, the same skip kind and the same message on either engine. It imports no
torch: a Ray decode task whose transform is the Pillow+numpy one
(`retrieval.model.preprocess`) never pays torch's import in its worker process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from retrieval.media.images import DEFAULT_MAX_PIXELS, ImageError, open_image, read_info
from retrieval.media.remote import is_url, read_bytes


@dataclass
class Decoded:
    """A file the worker could use: its pixels (a tensor or an array, as the transform made
    them) plus what the database row needs."""

    key: int
    pixels: Any
    width: int
    height: int
    format: str | None
    taken_at: datetime | None


@dataclass
class Failed:
    key: int
    kind: str
    message: str


def decode_file(path: str, key: int, preprocess: Callable, draft: tuple[int, int],
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded | Failed:
    """`path` (or an fsspec URL) decoded upright at JPEG draft size `draft`, through `preprocess`."""
    try:
        data = read_bytes(path) if is_url(path) else None  # read once, through fsspec
        info = read_info(path, data)
        image = open_image(path, max_pixels, draft_size=draft, data=data)
        pixels = preprocess(image)
    except ImageError as exc:
        return Failed(key, exc.kind, str(exc))
    except MemoryError:
        return Failed(key, "too_large", f"{os.path.basename(path)}: out of memory while decoding")
    except Exception as exc:  # a transform that chokes must not kill the worker
        return Failed(key, "corrupt", f"{os.path.basename(path)}: cannot preprocess ({exc})")
    taken = info.taken_at.replace(tzinfo=None) if info.taken_at else None  # camera wall time
    return Decoded(key, pixels, info.width, info.height, info.format, taken)
