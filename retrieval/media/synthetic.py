"""Deterministic synthetic labelled images (coloured shapes) drawn with Pillow.

Why: no pretrained CLIP weights can be downloaded here, so the test suite trains
its own tiny open_clip model on these drawings and uses them as a collection
whose true labels are known ("a red circle" must find red circles).

Every picture is a function of (label, size, rng state) only.  Geometry and the
noise texture are defined on a unit square, so the same rng state drawn at 32 px
and at 256 px gives the same picture at two resolutions (the model is trained
at 32 px and later fed files of 128 px that open_clip resizes down).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

# Base RGB of every colour the generator can draw.  The default label set uses
# the first four; the extra ones exist for "unknown class" style tests.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 70, 215),
    "yellow": (230, 205, 30),
    "purple": (140, 40, 170),
    "orange": (240, 130, 20),
}
ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

COLOURS: list[str] = ["red", "green", "blue", "yellow"]
SHAPES: list[str] = ["circle", "square", "triangle"]
LABELS: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]

CAPTION_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a {}.",
    "a {} on a plain background.",
    "an image showing a {}.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "a small {}.",
    "a large {}.",
    "a noisy picture of a {}.",
    "there is a {} in the image.",
]

_NOISE_GRID = 32  # noise texture resolution, independent of output size


def parse_label(label: str) -> tuple[str, str]:
    """Split "red circle" into ("red", "circle"); raise ValueError if unknown."""
    parts = label.split()
    if len(parts) != 2 or parts[0] not in PALETTE or parts[1] not in ALL_SHAPES:
        raise ValueError(f"unknown synthetic label {label!r}")
    return parts[0], parts[1]


def caption(label: str, rng: random.Random) -> str:
    """A random caption for a label, so the text tower sees varied phrasings."""
    return rng.choice(CAPTION_TEMPLATES).format(label)


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (unit coordinates) of a shape with circumradius r."""
    if shape == "square":
        offs = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [r] * 4
    elif shape == "triangle":
        offs = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [r] * 3
    elif shape == "star":
        offs = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + rr * math.cos(a + angle), cy + rr * math.sin(a + angle)) for a, rr in zip(offs, radii)]


def draw(label: str, size: int, rng: random.Random, hard: bool = False) -> Image.Image:
    """Draw one RGB image of `label` ("<colour> <shape>") at size×size pixels.

    The rng decides position, size, rotation, colour jitter, background and
    noise; the caller owns it so sequences are reproducible.  `hard=True` gives
    small, low-contrast shapes under heavy noise: zero-shot accuracy of the
    tiny model drops clearly there, which leaves room for few-shot methods.
    """
    colour, shape = parse_label(label)
    if size < 8:
        raise ValueError("size must be at least 8 pixels")
    # --- all random draws first, in a fixed order, independent of `size` ---
    if hard:
        radius = rng.uniform(0.13, 0.22)
        jitter, tint, noise_std, mix = 35, 40, 30.0, rng.uniform(0.15, 0.35)
    else:
        radius = rng.uniform(0.24, 0.42)
        jitter, tint, noise_std, mix = 20, 25, 14.0, 0.0
    cx = rng.uniform(radius, 1 - radius)
    cy = rng.uniform(radius, 1 - radius)
    # Small tilt only: at 32 px a freely rotated square is hard to tell from a
    # circle for a 2-layer ViT; hard mode spins shapes freely.
    angle = rng.uniform(-math.pi, math.pi) if hard else rng.uniform(-0.3, 0.3)
    grey = rng.uniform(70, 190)
    bg = [grey + rng.uniform(-tint, tint) for _ in range(3)]
    gain = rng.uniform(0.8, 1.1)
    fg = [b * gain + rng.uniform(-jitter, jitter) for b in PALETTE[colour]]
    fg = [f * (1 - mix) + g * mix for f, g in zip(fg, bg)]  # hard: fade into background
    noise_bytes = rng.randbytes(_NOISE_GRID * _NOISE_GRID * 3)

    # --- render: supersampled shape mask, then a scale-free noise texture ---
    ss = 4 if size <= 64 else 2
    big = size * ss
    mask = Image.new("L", (big, big), 0)
    pen = ImageDraw.Draw(mask)
    if shape == "circle":
        r = radius * 0.85  # roughly the visual area of the polygons
        pen.ellipse([(cx - r) * big, (cy - r) * big, (cx + r) * big, (cy + r) * big], fill=255)
    else:
        pts = _shape_points(shape, cx, cy, radius, angle)
        pen.polygon([(x * big, y * big) for x, y in pts], fill=255)
    mask = mask.resize((size, size), Image.Resampling.BOX)
    img = Image.composite(Image.new("RGB", (size, size), _rgb(fg)), Image.new("RGB", (size, size), _rgb(bg)), mask)
    # Uniform noise on a fixed 32x32 grid, upsampled: same texture at any size.
    k = noise_std * math.sqrt(12) / 255.0  # uniform bytes scaled to std noise_std
    grid = np.frombuffer(noise_bytes, dtype=np.uint8).astype(np.float32).reshape(_NOISE_GRID, _NOISE_GRID, 3)
    noise = Image.fromarray(np.clip(128.0 + (grid - 127.5) * k, 0, 255).round().astype(np.uint8), mode="RGB")
    if size != _NOISE_GRID:
        noise = noise.resize((size, size), Image.Resampling.BILINEAR)
    return ImageChops.add(img, noise, scale=1.0, offset=-128)


def _rgb(values: list[float]) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, round(v))) for v in values)
    return r, g, b


def label_dirname(label: str) -> str:
    """Directory name used for a label on disk ("red circle" -> "red_circle")."""
    return label.replace(" ", "_")


def write_collection(
    root: Path,
    per_class: int,
    seed: int,
    size: int = 128,
    fmt: str = "jpg",
    labels: list[str] | None = None,
    hard: bool = False,
) -> list[tuple[Path, str]]:
    """Write `per_class` images per label as root/<red_circle>/<nnnn>.<fmt>.

    Each file has its own rng seeded from (seed, label, index), so a collection
    is reproducible file by file and a different seed gives disjoint pictures.
    Returns (path, label) pairs in label-then-index order.
    """
    root = Path(root)
    fmt = fmt.lower().lstrip(".")
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(fmt)
    if pil_format is None:
        raise ValueError(f"unsupported image format {fmt!r}")
    out: list[tuple[Path, str]] = []
    for label in labels or LABELS:
        folder = root / label_dirname(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = random.Random(f"{seed}/{label}/{i}/{int(hard)}")
            path = folder / f"{i:04d}.{fmt}"
            img = draw(label, size, rng, hard=hard)
            if pil_format == "JPEG":
                img.save(path, pil_format, quality=90)
            else:
                img.save(path, pil_format)
            out.append((path, label))
    return out
