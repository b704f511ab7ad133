"""The drawn-shapes generator: deterministic, scale-free, and writes real files."""

from __future__ import annotations

import random

import numpy as np
import open_clip
import pytest
from PIL import Image

from retrieval.media import synthetic


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def test_label_set_is_colour_times_shape() -> None:
    assert len(synthetic.LABELS) == 12
    assert {"red", "green", "blue", "yellow"} <= set(synthetic.COLOURS)
    assert {"circle", "square", "triangle"} <= set(synthetic.SHAPES)
    assert synthetic.LABELS == [f"{c} {s}" for c in synthetic.COLOURS for s in synthetic.SHAPES]


@pytest.mark.parametrize("hard", [False, True])
def test_draw_is_deterministic_for_a_seed(hard: bool) -> None:
    for label in synthetic.LABELS:
        a = synthetic.draw(label, 64, random.Random(7), hard=hard)
        b = synthetic.draw(label, 64, random.Random(7), hard=hard)
        c = synthetic.draw(label, 64, random.Random(8), hard=hard)
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("size", [16, 32, 100, 128, 256])
def test_draw_any_size_rgb(size: int) -> None:
    img = synthetic.draw("blue square", size, random.Random(1))
    assert img.mode == "RGB" and img.size == (size, size)


def test_draw_is_scale_invariant() -> None:
    """Same rng state at 256 px, shrunk to 32 px, is close to the 32 px drawing."""
    same, other = [], []
    for i, label in enumerate(synthetic.LABELS):
        small = _pixels(synthetic.draw(label, 32, random.Random(i)))
        big = synthetic.draw(label, 256, random.Random(i)).resize((32, 32), Image.Resampling.BICUBIC)
        unrelated = _pixels(synthetic.draw(label, 32, random.Random(i + 1000)))
        same.append(np.abs(small - _pixels(big)).mean())
        other.append(np.abs(small - unrelated).mean())
    assert max(same) < 12, same
    assert np.mean(same) * 3 < np.mean(other)


def test_shape_has_its_colour() -> None:
    """The pixels that differ most from the border are the named colour."""
    rgb = {"red": 0, "green": 1, "blue": 2}
    for colour, channel in rgb.items():
        for i in range(5):
            img = _pixels(synthetic.draw(f"{colour} circle", 64, random.Random(i)))
            bg = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
            dist = np.abs(img - bg).sum(-1)
            shape_pixels = img[dist > np.percentile(dist, 92)]
            assert int(np.argmax(shape_pixels.mean(0))) == channel, (colour, i)


def test_unknown_label_and_tiny_size_rejected() -> None:
    with pytest.raises(ValueError):
        synthetic.draw("pink hexagon", 32, random.Random(0))
    with pytest.raises(ValueError):
        synthetic.draw("red circle", 4, random.Random(0))


def test_captions_fit_the_tiny_context_length() -> None:
    tok = open_clip.SimpleTokenizer(context_length=16)
    rng = random.Random(0)
    longest = max(len(tok.encode(t.format(lab))) for t in synthetic.CAPTION_TEMPLATES for lab in synthetic.LABELS)
    assert longest + 2 <= 16  # + start and end tokens
    for _ in range(50):
        label = rng.choice(synthetic.LABELS)
        cap = synthetic.caption(label, rng)
        assert label in cap and cap in {t.format(label) for t in synthetic.CAPTION_TEMPLATES}


def test_write_collection_files_decode_with_labels(tmp_path) -> None:
    pairs = synthetic.write_collection(tmp_path / "c", per_class=3, seed=11)
    assert len(pairs) == 3 * len(synthetic.LABELS)
    assert {lab for _, lab in pairs} == set(synthetic.LABELS)
    for path, label in pairs:
        assert path.parent.name == synthetic.label_dirname(label) == label.replace(" ", "_")
        assert path.suffix == ".jpg" and path.stem.isdigit() and len(path.stem) == 4
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (128, 128)
            img.load()
    # Same seed -> the same bytes; another seed -> other pictures.
    again = synthetic.write_collection(tmp_path / "d", per_class=3, seed=11)
    other = synthetic.write_collection(tmp_path / "e", per_class=3, seed=12)
    assert [p.read_bytes() for p, _ in pairs] == [p.read_bytes() for p, _ in again]
    assert pairs[0][0].read_bytes() != other[0][0].read_bytes()


def test_write_collection_png_subset_and_size(tmp_path) -> None:
    labels = synthetic.LABELS[:2]
    pairs = synthetic.write_collection(tmp_path, per_class=2, seed=1, size=48, fmt="png", labels=labels)
    assert [lab for _, lab in pairs] == [labels[0]] * 2 + [labels[1]] * 2
    for path, _ in pairs:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (48, 48)
    with pytest.raises(ValueError):
        synthetic.write_collection(tmp_path, per_class=1, seed=1, fmt="tiff")
