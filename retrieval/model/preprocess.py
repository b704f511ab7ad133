"""open_clip's eval image transform with Pillow and numpy only, for torch-free image queries.

open_clip's transform is torchvision's Resize (Pillow's resampling on PIL
images), CenterCrop, convert("RGB"), ToTensor and Normalize; every step is
reproduced here on the same Pillow calls, so pixels match to float rounding
(`tests/test_preprocess.py` compares with open_clip's own transform). The
settings come from the model's `preprocess_cfg`, recorded beside the exported
image tower when it is exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Pillow loads where an image is resized: a text query reads only the config
    from PIL import Image

RESIZE_MODES = ("shortest", "squash")  # open_clip's "longest" (letterbox) is left to torch


@dataclass(frozen=True)
class PreprocessConfig:
    """What open_clip's eval transform needs to know: size, statistics, how to resize."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_open_clip(cls, cfg: dict) -> PreprocessConfig:
        """From `open_clip.get_model_preprocess_cfg(model)` (size may be an int or a pair)."""
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        mean, std = cfg.get("mean"), cfg.get("std")
        mean = (mean,) * 3 if isinstance(mean, (int, float)) else mean
        std = (std,) * 3 if isinstance(std, (int, float)) else std
        return cls(size=(int(size[0]), int(size[1])), mean=tuple(float(m) for m in mean),
                   std=tuple(float(s) for s in std),
                   interpolation=cfg.get("interpolation") or "bicubic",
                   resize_mode=cfg.get("resize_mode") or "shortest")

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        return cls(size=tuple(data["size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
                   interpolation=data.get("interpolation", "bicubic"),
                   resize_mode=data.get("resize_mode", "shortest"))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def supported(self) -> bool:
        """Whether `preprocess` reproduces this transform (else image queries use torch)."""
        square = self.size[0] == self.size[1]
        return self.resize_mode == "squash" or (self.resize_mode == "shortest" and square)


def _resample(name: str) -> Image.Resampling:
    # open_clip: 'bilinear' is bilinear, anything else ('bicubic', 'random') is bicubic at eval.
    from PIL import Image

    return Image.Resampling.BILINEAR if name == "bilinear" else Image.Resampling.BICUBIC


def _resize_shortest(image: Image.Image, side: int, resample: Image.Resampling) -> Image.Image:
    """torchvision's Resize(int): the short side becomes `side`, the long one int(side*long/short)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = side, int(side * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, resample)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's CenterCrop on a PIL image that is at least the crop size."""
    image_width, image_height = image.size
    top = int(round((image_height - height) / 2.0))
    left = int(round((image_width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One PIL image -> (3, H, W) float32, as open_clip's eval transform makes it."""
    if not cfg.supported:
        raise ValueError(f"resize mode {cfg.resize_mode!r} at {cfg.size} is not reproduced without torch")
    height, width = cfg.size
    resample = _resample(cfg.interpolation)
    if cfg.resize_mode == "squash":
        image = image.resize((width, height), resample)
    else:
        image = _center_crop(_resize_shortest(image, height, resample), height, width)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """(N, 3, H, W) float32 for a list of PIL images."""
    if not images:
        return np.zeros((0, 3, *cfg.size), np.float32)
    return np.stack([preprocess(image, cfg) for image in images])
