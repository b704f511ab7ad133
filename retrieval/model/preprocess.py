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


# open_clip's eval transforms this module reproduces, by the names of their steps.
_SHORTEST = ("Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize")
_SQUASH = ("Resize", "MaybeConvertMode", "MaybeToTensor", "Normalize")


def config_of_transform(transform) -> PreprocessConfig | None:
    """The config whose `preprocess` gives exactly `transform`'s pixels (an open_clip eval
    transform object), or None when it is another transform or the pixels differ at all.

    Why: a Ray decode task that runs this Pillow+numpy copy instead of the torchvision
    transform never imports torch (seconds of CPU per worker process, issue 12), and the
    pixels stay bit-identical to the single-process indexer's. The transform is read step
    by step, then checked on a drawn image of odd size; anything unexpected means None.
    """
    steps = list(getattr(transform, "transforms", None) or ())
    names = tuple(type(step).__name__ for step in steps)
    if names not in (_SHORTEST, _SQUASH):
        return None
    resize, normalize = steps[0], steps[-1]
    interpolation = getattr(getattr(resize, "interpolation", None), "value", None)
    if (interpolation not in ("bicubic", "bilinear") or getattr(resize, "max_size", None) is not None
            or getattr(resize, "antialias", True) is not True or getattr(steps[-3], "mode", None) != "RGB"):
        return None
    size = resize.size
    if names == _SHORTEST:
        side = size if isinstance(size, int) else (size[0] if len(size) == 1 else None)
        crop = tuple(steps[1].size)
        if side is None or crop != (side, side):
            return None
        cfg = PreprocessConfig((side, side), tuple(normalize.mean), tuple(normalize.std), interpolation, "shortest")
    else:
        if isinstance(size, int) or len(size) != 2:
            return None
        cfg = PreprocessConfig((int(size[0]), int(size[1])), tuple(normalize.mean), tuple(normalize.std),
                               interpolation, "squash")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or not cfg.supported:
        return None
    return cfg if _same_pixels(transform, cfg) else None


def _same_pixels(transform, cfg: PreprocessConfig) -> bool:
    from PIL import Image

    rng = np.random.default_rng(12)
    for width, height in ((301, 197), (64, 500)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = np.asarray(transform(image))
        if not np.array_equal(preprocess(image, cfg), expected):
            return False
    return True
