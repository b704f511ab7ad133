"""Pillow+numpy preprocessing gives open_clip's eval transform's pixels."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.model.preprocess import PreprocessConfig, preprocess, preprocess_batch

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def sample_images(count: int = 24, seed: int = 3) -> list[Image.Image]:
    """Noise and gradients in odd sizes and modes (RGB, L, RGBA, P), plus real photos when present."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = int(rng.integers(7, 700)), int(rng.integers(7, 700))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        images.append(image.convert(("RGB", "L", "RGBA", "P")[i % 4]))
    if CIFAR.is_dir():
        photos = sorted(CIFAR.glob("*/00[0-1]*.jpg"))
        images += [Image.open(p).convert("RGB") for p in random.Random(seed).sample(photos, 8)]
    return images


@pytest.fixture(scope="module")
def open_clip_transform():
    return pytest.importorskip("open_clip.transform").image_transform


@pytest.mark.parametrize("size, mode, interpolation", [
    (32, "shortest", "bicubic"), (224, "shortest", "bicubic"), (256, "shortest", "bilinear"),
    (64, "squash", "bicubic")])
def test_pixels_match_open_clip(open_clip_transform, size, mode, interpolation):
    reference = open_clip_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                    resize_mode=mode, interpolation=interpolation)
    cfg = PreprocessConfig((size, size), OPENAI_MEAN, OPENAI_STD, interpolation, mode)
    for image in sample_images():
        expected = reference(image).numpy()
        got = preprocess(image, cfg)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() < 1e-5, image.size


def test_config_from_open_clip_model_cfg(tiny_model_dir):
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    cfg = PreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(model))
    assert cfg.supported and PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    images = sample_images(8)
    expected = np.stack([transform(image).numpy() for image in images])
    assert np.abs(preprocess_batch(images, cfg) - expected).max() < 1e-5


def test_letterbox_is_left_to_torch():
    cfg = PreprocessConfig((224, 224), OPENAI_MEAN, OPENAI_STD, resize_mode="longest")
    assert not cfg.supported
    with pytest.raises(ValueError):
        preprocess(Image.new("RGB", (10, 10)), cfg)


def test_imports_no_torch():
    code = ("import sys; from PIL import Image; from retrieval.model.preprocess import PreprocessConfig, "
            "preprocess; preprocess(Image.new('RGB', (50, 40)), PreprocessConfig((32, 32), (0.5,)*3, (0.5,)*3)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
