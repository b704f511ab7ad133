"""What a Ray engine's worker processes pay to start (issue 12), without a Ray cluster:
decode tasks run open_clip's transform as Pillow+numpy with the same pixels bit for bit and
import no torch; an encoder actor imports open_clip without transformers/timm when its model
needs neither, and builds the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.media import synthetic
from retrieval.model.lean_import import unneeded
from retrieval.model.preprocess import config_of_transform
from retrieval.model.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
open_clip = pytest.importorskip("open_clip")


def fresh(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def eval_transform(**kwargs):
    from open_clip.transform import image_transform

    return image_transform(64, is_train=False, **kwargs)


@pytest.mark.parametrize("kwargs, resize_mode", [({}, "shortest"), ({"resize_mode": "squash"}, "squash"),
                                                 ({"interpolation": "bilinear"}, "shortest")])
def test_open_clip_eval_transforms_are_read_as_configs(kwargs, resize_mode):
    cfg = config_of_transform(eval_transform(**kwargs))
    assert cfg is not None and cfg.resize_mode == resize_mode and cfg.size == (64, 64)
    assert cfg.interpolation == kwargs.get("interpolation", "bicubic")


def test_transforms_it_does_not_reproduce_stay_torch():
    assert config_of_transform(eval_transform(resize_mode="longest")) is None
    assert config_of_transform(lambda image: image) is None
    shortest = eval_transform()
    shortest.transforms[-1].mean = (0.5, 0.5, 0.5, 0.5)  # a step that reads right but computes otherwise
    assert config_of_transform(shortest) is None


def test_decode_tasks_give_the_indexers_pixels_bit_for_bit_without_torch(tmp_path, tiny_model_dir):
    """`decode_files` in a fresh process given the config (as a decode worker gets it) vs here
    given the model's own transform (what the single-process indexer runs), on drawn photos,
    CIFAR photos when present, and a broken file."""
    from retrieval.index.ray_pipeline import decode_files, pixel_transform

    synthetic.write_collection(tmp_path / "photos", per_class=2, seed=5)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a photo")
    cifar = sorted((ROOT.parent / "shared" / "data" / "cifar10" / "test").glob("*/000[0-2].jpg"))
    files = [str(p) for p in sorted((tmp_path / "photos").rglob("*.jpg"))] + [str(p) for p in cifar]
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = pixel_transform(transform)
    assert type(cfg).__name__ == "PreprocessConfig"
    batch = {"key": np.arange(len(files)), "path": np.asarray([p.encode() for p in files], object)}
    np.save(tmp_path / "batch.npy", batch, allow_pickle=True)
    got = fresh(f"""
import json, sys, numpy as np
from retrieval.index.ray_pipeline import decode_files
from retrieval.model.preprocess import PreprocessConfig
batch = np.load("{tmp_path / 'batch.npy'}", allow_pickle=True).item()
out = decode_files(batch, PreprocessConfig.from_dict({json.dumps(cfg.to_dict())}), {size})
np.save("{tmp_path / 'out.npy'}", out, allow_pickle=True)
print(json.dumps({{"torch": [m for m in ("torch", "torchvision", "open_clip") if m in sys.modules]}}))
""")
    assert got["torch"] == [], got  # the worker imported none of them
    lean = np.load(tmp_path / "out.npy", allow_pickle=True).item()
    full = decode_files(batch, transform, size)
    for column in ("key", "ok", "pixels", "width", "height", "format", "taken_at", "kind", "message"):
        assert np.array_equal(lean[column], full[column]), column
    assert int(lean["ok"].sum()) == len(files) - 1 and sorted(set(lean["kind"]) - {""}) == ["corrupt"]


def test_optional_libraries_a_model_does_not_need(tmp_path):
    assert unneeded(ModelSpec(model="ViT-B-32", random_weights=True)) == ["transformers", "timm"]
    assert unneeded(ModelSpec(model="roberta-ViT-B-32", random_weights=True)) == ["timm"]  # an HF text tower
    assert unneeded(ModelSpec(model="ViT-B-16-SigLIP", random_weights=True)) == []  # timm tower, HF tokenizer
    assert unneeded(ModelSpec(model="no-such-model", random_weights=True)) == []  # unknown: import all
    assert unneeded(ModelSpec(model_dir=str(tmp_path))) == []  # no config there


def test_an_actor_builds_the_same_model_without_transformers(tiny_model_dir):
    code = f"""
import json, sys
from retrieval.model.lean_import import import_open_clip
from retrieval.model.spec import ModelSpec
spec = ModelSpec(model_dir="{tiny_model_dir}")
import_open_clip(spec)
lean = [m for m in ("transformers", "timm", "open_clip") if m in sys.modules]
from retrieval.model.encoder import Encoder
encoder = Encoder(spec, device="cpu", precision="fp32")
import transformers  # importable again afterwards
print(json.dumps({{"lean": lean, "fingerprint": encoder.fingerprint}}))
"""
    from retrieval.model.encoder import Encoder

    got = fresh(code)
    assert got["lean"] == ["open_clip"], got
    assert got["fingerprint"] == Encoder(ModelSpec(model_dir=str(tiny_model_dir)), device="cpu",
                                         precision="fp32").fingerprint


@pytest.mark.parametrize("items, wanted, actors", [(30, 2, 1), (33, 2, 2), (1000, 2, 2), (None, 2, 2), (0, 2, 1)])
def test_no_more_encoder_actors_than_batches(monkeypatch, items, wanted, actors):
    """A small job asks for no actor it could not feed (each would load the model for nothing,
    and Ray Data warns that the pool cannot be filled); the cores are shared as for that many."""
    ray = pytest.importorskip("ray")
    from retrieval.index.ray_pipeline import RayOptions, plan_layout

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # the layout's only input from Ray
    layout = plan_layout(RayOptions(actors=wanted), "cpu", None, items)
    assert layout.actors == actors
    assert layout.actor_cpus == (1.0 if actors == 1 else 0.75)
