"""The model door: every kind of spec, the offline error, device/precision choice, encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from retrieval.errors import ModelError
from retrieval.media.synthetic import LABELS, draw
from retrieval.model.encoder import Encoder, ModelSpec, choose_device, resolve_precision


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir) -> Encoder:
    return Encoder(ModelSpec(model_dir=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def tiny_config_and_checkpoint(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model as a bare config JSON + a torch checkpoint: the `--checkpoint` door."""
    out = tmp_path_factory.mktemp("ckpt")
    cfg = json.loads((tiny_model_dir / "open_clip_config.json").read_text())["model_cfg"]
    config_file = out / "tiny-arch.json"
    config_file.write_text(json.dumps(cfg))
    state = load_file(str(tiny_model_dir / "open_clip_model.safetensors"))
    checkpoint = out / "tiny.pt"
    torch.save(state, checkpoint)
    return config_file, checkpoint


def _pictures(n_per_label: int = 2, seed: int = 5) -> tuple[list[Image.Image], list[str]]:
    import random

    rng = random.Random(seed)
    labels = [lab for lab in LABELS for _ in range(n_per_label)]
    return [draw(lab, 64, rng) for lab in labels], labels


def test_model_dir_encodes_unit_vectors(tiny_encoder):
    images, _ = _pictures()
    image_vecs = tiny_encoder.encode_images(images)
    text_vecs = tiny_encoder.encode_texts(["a photo of a red circle.", "a blue square"])
    assert image_vecs.shape == (len(images), tiny_encoder.embed_dim)
    assert text_vecs.shape == (2, tiny_encoder.embed_dim)
    assert image_vecs.dtype == np.float32 and text_vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_vecs, axis=1), 1.0, atol=1e-5)


def test_encoding_is_deterministic(tiny_encoder):
    images, _ = _pictures(1)
    first = tiny_encoder.encode_images(images)
    second = tiny_encoder.encode_images(images, batch_size=5)  # other batching, same answer
    np.testing.assert_allclose(first, second, atol=1e-5)
    np.testing.assert_array_equal(tiny_encoder.encode_texts(["a red star"]),
                                  tiny_encoder.encode_texts(["a red star"]))


def test_tiny_model_is_aligned_through_the_encoder(tiny_encoder):
    """Zero-shot through our own encoder (not just open_clip) is far above chance (1/12)."""
    images, labels = _pictures(n_per_label=10, seed=77)
    classes = tiny_encoder.encode_texts([f"a photo of a {lab}." for lab in LABELS])
    predicted = (tiny_encoder.encode_images(images) @ classes.T).argmax(axis=1)
    accuracy = np.mean([LABELS[p] == lab for p, lab in zip(predicted, labels)])
    assert accuracy >= 0.7, accuracy


@pytest.mark.parametrize("door", ["checkpoint", "pretrained"])
def test_checkpoint_with_config_json_round_trips(tiny_encoder, tiny_config_and_checkpoint, door):
    """`--model arch.json --checkpoint FILE` and `--pretrained FILE` both load FILE (the second once
    built unseeded random weights instead)."""
    config_file, checkpoint = tiny_config_and_checkpoint
    loaded = Encoder(ModelSpec(model=str(config_file), **{door: str(checkpoint)}))
    images, _ = _pictures(1)
    np.testing.assert_allclose(loaded.encode_images(images), tiny_encoder.encode_images(images), atol=1e-5)
    assert loaded.fingerprint == tiny_encoder.fingerprint


def test_checkpoint_for_the_wrong_architecture_is_one_clear_error(tiny_config_and_checkpoint, tmp_path):
    config_file, checkpoint = tiny_config_and_checkpoint
    cfg = json.loads(config_file.read_text())
    cfg["embed_dim"] = 32  # another architecture
    other = tmp_path / "other-arch.json"
    other.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="do not match the architecture"):
        Encoder(ModelSpec(model=str(other), checkpoint=str(checkpoint)))


def test_corrupt_checkpoint_is_one_clear_error(tiny_config_and_checkpoint, tmp_path):
    config_file, _ = tiny_config_and_checkpoint
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelError, match="could not load"):
        Encoder(ModelSpec(model=str(config_file), checkpoint=str(broken)))


def test_unknown_model_and_tag_and_missing_files():
    with pytest.raises(ModelError, match="unknown model"):
        Encoder(ModelSpec(model="ViT-Nope-99", pretrained="openai"))
    with pytest.raises(ModelError, match="no pretrained tag"):
        Encoder(ModelSpec(model="ViT-B-32", pretrained="no-such-tag"))
    with pytest.raises(ModelError, match="not found"):
        Encoder(ModelSpec(model="ViT-B-32", checkpoint="/nonexistent/weights.pt"))
    with pytest.raises(ModelError, match="open_clip_config.json"):
        Encoder(ModelSpec(model_dir="/nonexistent/dir"))
    with pytest.raises(ModelError, match="exactly one model source"):
        ModelSpec(model="ViT-B-32")


def test_pretrained_tag_offline_fails_fast_with_instructions(tmp_path):
    """The real download path runs up to the download, then says how to work offline."""
    code = (
        "from retrieval.model.encoder import Encoder, ModelSpec\n"
        "Encoder(ModelSpec(model='ViT-B-32', pretrained='laion2b_s34b_b79k'))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not get weights for ViT-B-32 / laion2b_s34b_b79k" in last
    assert "--checkpoint" in last and "--model-dir" in last


def test_device_and_precision_choice_on_cpu():
    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        pytest.skip("CPU-only expectations")
    assert choose_device("auto").type == "cpu"
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("int8", cpu) == "int8"
    with pytest.raises(ModelError, match="needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ModelError, match="no CUDA GPU"):
        choose_device("cuda")
    with pytest.raises(ModelError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_random_weights_only_when_asked_and_labelled():
    spec = ModelSpec(model="ViT-B-32", random_weights=True)
    assert "RANDOM" in spec.label
    assert ModelSpec.from_json(spec.to_json()) == spec
