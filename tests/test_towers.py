"""Indexing builds only the image tower (retrieval.model.towers, Encoder(images_only=True)).

The promise: the same fingerprint as the whole model (so libraries made before still
open), the same weights and graph (vectors bit-for-bit equal, not merely close), the
text tower back on first need, and the int8 copy made while the fp32 tower is let go.
Memory itself is measured by bench/index_throughput.py --memory, not asserted here.
"""

from __future__ import annotations

import json
import mmap
import random
import shutil

import numpy as np
import pytest
import torch

from retrieval.media import synthetic
from retrieval.model import release, towers
from retrieval.model.encoder import Encoder, ModelSpec, load_model, weights_fingerprint

TEXTS = ["a photo of a red circle.", "a blue square"]


@pytest.fixture(scope="module")
def model_dir_spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec(model_dir=str(tiny_model_dir))


@pytest.fixture(scope="module")
def pixels(model_dir_spec) -> torch.Tensor:
    rng = random.Random(5)
    encoder = Encoder(model_dir_spec, device="cpu", precision="fp32")
    return encoder.preprocess_images([synthetic.draw(label, 32, rng) for label in synthetic.LABELS])


@pytest.fixture(scope="module")
def checkpoint_specs(tiny_model_dir, tmp_path_factory) -> dict[str, ModelSpec]:
    """The tiny model as a config file + torch checkpoint: fp32, and stored in fp16 (a load
    converts it to the model's fp32)."""
    folder = tmp_path_factory.mktemp("tiny-pt")
    doc = json.loads((tiny_model_dir / "open_clip_config.json").read_text())
    config = folder / "tiny-towers.json"
    config.write_text(json.dumps(doc.get("model_cfg", doc)))
    model, _, _ = load_model(ModelSpec(model_dir=str(tiny_model_dir)), torch.device("cpu"))
    state = model.state_dict()
    torch.save(state, folder / "tiny.pt")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, folder / "tiny-fp16.pt")
    return {name: ModelSpec(model=str(config), checkpoint=str(folder / f"{name}.pt")) for name in ("tiny", "tiny-fp16")}


def assert_same_model(spec: ModelSpec, pixels_fn, precision: str = "fp32") -> Encoder:
    whole = Encoder(spec, device="cpu", precision="fp32")
    tower = Encoder(spec, device="cpu", precision="fp32", images_only=True)
    assert tower._released, "the image-tower-only build was not used"
    if precision != "fp32":  # unchecked: a first measurement of the machine would need the whole model
        whole.set_precision(precision, check=False)
        tower.set_precision(precision, check=False)
    assert tower.fingerprint == whole.fingerprint == weights_fingerprint(whole.model)
    assert tower.describe() == whole.describe()  # what a library records: fingerprint, dim, transform
    assert tower.context_length == whole.context_length
    pixels = pixels_fn(tower)
    np.testing.assert_array_equal(tower.encode_pixels(pixels), whole.encode_pixels(pixels))
    # The text tower is reloaded; text vectors differ by float rounding between two loads (test_release).
    np.testing.assert_allclose(tower.encode_texts(TEXTS), whole.encode_texts(TEXTS), atol=1e-6)
    np.testing.assert_array_equal(tower.encode_pixels(pixels), whole.encode_pixels(pixels))
    return tower


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_model_dir_tower_is_the_whole_models_image_tower(model_dir_spec, pixels, precision):
    assert_same_model(model_dir_spec, lambda _: pixels, precision)


@pytest.mark.parametrize("name", ["tiny", "tiny-fp16"])
def test_checkpoint_tower_is_the_whole_models_image_tower(checkpoint_specs, pixels, name):
    spec = checkpoint_specs[name]
    tower = Encoder(spec, device="cpu", precision="fp32", images_only=True)
    assert {t.dtype for t in release.tensors_of(tower._model.visual)} == {torch.float32}
    assert_same_model(spec, lambda _: pixels)


def random_pixels(encoder: Encoder) -> torch.Tensor:
    return torch.rand(2, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(1))


def test_random_weights_tower_is_drawn_as_the_whole_model(checkpoint_specs):
    assert_same_model(ModelSpec(model=checkpoint_specs["tiny"].model, random_weights=True), random_pixels)


@pytest.mark.slow
def test_random_resnet_tower_is_drawn_as_the_whole_model():
    assert_same_model(ModelSpec(model="RN50", random_weights=True), random_pixels)  # another image tower builder


def test_int8_copy_lets_the_fp32_tower_go(model_dir_spec, pixels):
    reference = Encoder(model_dir_spec, device="cpu", precision="int8")
    encoder = Encoder(model_dir_spec, device="cpu", precision="fp32", images_only=True)
    fp32_bytes = sum(t.numel() * t.element_size() for t in release.tensors_of(encoder._model.visual))
    encoder.set_precision("int8", check=False)
    left = [t for t in release.tensors_of(encoder._model.visual) if t.numel()]
    in_use = {id(t) for t in release.tensors_of(encoder._image_model.visual)}
    assert all(id(t) in in_use for t in left)  # only what the int8 tower shares (norms, embeddings) is left
    assert sum(t.numel() * t.element_size() for t in left) < fp32_bytes / 2
    np.testing.assert_array_equal(encoder.encode_pixels(pixels), reference.encode_pixels(pixels))
    encoder.set_precision("fp32", check=False)  # the fp32 tower again: reloaded, same vectors
    np.testing.assert_array_equal(encoder.encode_pixels(pixels),
                                  Encoder(model_dir_spec, device="cpu", precision="fp32").encode_pixels(pixels))


def test_sources_it_does_not_cover_load_the_whole_model(tiny_model_dir, tmp_path):
    folder = tmp_path / "two-weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.pth").write_bytes(b"")  # more than one weights file: open_clip's choice, not ours
    spec = ModelSpec(model_dir=str(folder))
    encoder = Encoder(spec, device="cpu", precision="fp32", images_only=True)
    assert encoder._released is None
    assert encoder.fingerprint == Encoder(ModelSpec(model_dir=str(tiny_model_dir)), device="cpu").fingerprint


def test_file_pages_are_dropped_only_inside_the_files_mapping(tmp_path):
    path = tmp_path / "w.pt"
    values = torch.arange(4 * mmap.PAGESIZE, dtype=torch.float32)
    torch.save({"w": values}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)["w"]
    ranges = release.file_ranges(path)
    assert ranges, "torch.load(mmap=True) should map the file"
    assert release.drop_file_pages(mapped, ranges) > 0
    assert torch.equal(mapped, values)  # read again from the file
    anonymous = values.clone()
    assert release.drop_file_pages(anonymous, ranges) == 0  # never on memory the file does not back
    assert torch.equal(anonymous, values)


def test_fingerprint_parts_are_the_encoders(model_dir_spec):
    model, _, _ = load_model(model_dir_spec, torch.device("cpu"))
    samples = {name: towers.sample(t) for name, t in model.state_dict().items()}
    assert towers.fingerprint_of(samples) == weights_fingerprint(model)
    samples.pop(next(iter(samples)))
    assert towers.fingerprint_of(samples) != weights_fingerprint(model)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_vit_b_32_random_weights_tower_is_the_whole_models(precision):
    spec = ModelSpec(model="ViT-B-32", random_weights=True)
    assert_same_model(spec, random_pixels, precision)


def test_a_failing_tower_build_falls_back_to_the_whole_model(model_dir_spec, monkeypatch):
    def fails(*_args, **_kwargs):
        raise RuntimeError("cannot map this checkpoint")

    monkeypatch.setattr(towers, "load_image_tower", fails)
    encoder = Encoder(model_dir_spec, device="cpu", precision="fp32", images_only=True)
    assert encoder._released is None
    assert encoder.fingerprint == Encoder(model_dir_spec, device="cpu", precision="fp32").fingerprint
