"""Indexing keeps only the image tower it runs (retrieval.model.release, Encoder.keep_image_tower_only).

Vectors must not change (beyond float rounding between two loads), the weights let go must really be unreferenced, and
anything that needs the whole model afterwards (a text query in the same process) gets it
back. Memory itself is measured by bench/index_throughput.py, not asserted here.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from retrieval.media import synthetic
from retrieval.model import autoprecision, precision_cache, release
from retrieval.model.encoder import Encoder, ModelSpec

MODES = ["fp32", "int8", "auto", *(["onnx-int8"] if precision_cache.onnxruntime_version() else [])]
TEXTS = ["a photo of a red circle.", "a blue square"]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec(model_dir=str(tiny_model_dir))


@pytest.fixture(scope="module")
def pixels(spec) -> torch.Tensor:
    rng = random.Random(3)
    encoder = Encoder(spec, device="cpu", precision="fp32")
    return encoder.preprocess_images([synthetic.draw(label, 32, rng) for label in synthetic.LABELS])


@pytest.mark.parametrize("mode", MODES)
def test_image_vectors_unchanged_and_text_tower_comes_back(spec, pixels, mode):
    reference = Encoder(spec, device="cpu", precision=mode)
    want_images, want_texts = reference.encode_pixels(pixels), reference.encode_texts(TEXTS)
    whole = nbytes(release.tensors_of(reference.model))
    text = whole - nbytes(release.tensors_of(reference.model.visual))

    encoder = Encoder(spec, device="cpu", precision=mode)
    freed = encoder.keep_image_tower_only()  # before anything settled the precision
    assert encoder.precision == reference.precision
    assert freed >= text  # at least the text tower; the fp32 image weights too when int8/ONNX runs
    if encoder.precision != "fp32":
        assert freed > text
    np.testing.assert_allclose(encoder.encode_pixels(pixels), want_images, atol=1e-6)
    assert encoder.keep_image_tower_only() == 0  # once is enough

    np.testing.assert_allclose(encoder.encode_texts(TEXTS), want_texts, atol=1e-6)  # reloaded, same weights
    assert nbytes(release.tensors_of(encoder.model)) == whole
    np.testing.assert_allclose(encoder.encode_pixels(pixels), want_images, atol=1e-6)


def test_released_tensors_are_unreferenced_but_shared_ones_live_on():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), shared)
    holder = [shared.weight]  # what an int8 layer does with its fp32 bias
    before = shared.weight.detach().clone()
    freed = release.release_tensors(model, keep=[model[0].weight])
    assert freed == (4 + 4 * 4 + 4) * 4  # model[0].bias, shared.weight, shared.bias
    assert model[0].weight.numel() == 16 and model[1].weight.numel() == 0
    assert torch.equal(holder[0], before)  # the other holder's tensor is untouched


def test_will_measure_follows_the_precision_cache(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFIND_CACHE", str(tmp_path / "cache"))
    encoder = Encoder(spec, device="cpu", precision="fp32")
    assert not autoprecision.will_measure(encoder, "fp32")
    assert autoprecision.will_measure(encoder, "auto")  # nothing cached in this fresh cache
    encoder.set_precision("auto")
    _ = encoder.precision  # measures and caches
    assert not autoprecision.will_measure(encoder, "auto")
    assert not autoprecision.will_measure(encoder, "int8")  # judged in the same measurement


def test_heap_helpers_answer_on_this_platform():
    assert isinstance(release.trim_heap(), bool)
    assert isinstance(release.fix_mmap_threshold(), bool)
