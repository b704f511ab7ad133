"""The tiny test model: trained here, loads through open_clip, and really works.

The zero-shot bound (0.75) is far above chance (1/12) and below what the
model measured when it was made (0.925 on 128 px JPEGs, 0.93 at 32 px).
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from retrieval import config
from retrieval.devmodels import tiny as testmodels
from retrieval.devmodels import training
from retrieval.media import synthetic

HELDOUT_COLLECTION_SEED = 31337  # write_collection seeds never meet training's rng stream
MIN_ZERO_SHOT = 0.75


def test_config_layout_and_metadata(tiny_model_dir: Path) -> None:
    assert tiny_model_dir.name == f"tiny-shapes-{testmodels.model_key()}"
    doc = json.loads((tiny_model_dir / "open_clip_config.json").read_text())
    assert doc["model_cfg"] == testmodels.TINY_MODEL_CFG
    assert doc["model_cfg"]["embed_dim"] == 64
    assert {"mean", "std"} <= set(doc["preprocess_cfg"])
    meta = doc["clipfind"]
    assert meta["name"] == "tiny-shapes" and meta["key"] == testmodels.model_key()
    assert meta["labels"] == synthetic.LABELS
    assert meta["train_seconds"] > 0
    assert meta["heldout_zero_shot_top1"] >= MIN_ZERO_SHOT
    assert meta["heldout_zero_shot_top1_128px_jpeg"] >= MIN_ZERO_SHOT
    assert (tiny_model_dir / "open_clip_model.safetensors").is_file()


def test_loads_through_open_clip_local_dir(tiny_model_dir: Path) -> None:
    name = "local-dir:" + str(tiny_model_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    assert tokenizer.context_length == 16
    assert tokenizer(["a photo of a red circle."]).shape == (1, 16)
    saved = load_file(str(tiny_model_dir / "open_clip_model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    x = preprocess(synthetic.draw("red circle", 128, random.Random(0)))
    assert x.shape == (3, 32, 32)
    with torch.no_grad():
        assert model.encode_image(x[None]).shape == (1, 64)
        assert model.encode_text(tokenizer(["a red circle"])).shape == (1, 64)


def test_zero_shot_on_heldout_jpeg_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    """240 pictures the model never saw, written as 128 px JPEGs and read back."""
    pairs = synthetic.write_collection(tmp_path, per_class=20, seed=HELDOUT_COLLECTION_SEED, size=128, fmt="jpg")
    images = [Image.open(p).convert("RGB") for p, _ in pairs]
    labels = [lab for _, lab in pairs]
    acc = testmodels.zero_shot_accuracy(tiny_model_dir, images, labels, synthetic.LABELS)
    print(f"\ntiny model zero-shot top-1 on {len(images)} held-out 128px JPEGs: {acc:.3f} (chance {1 / 12:.3f})")
    assert acc >= MIN_ZERO_SHOT


def test_zero_shot_at_training_size_and_hard_variant(tiny_model_dir: Path) -> None:
    """32 px pictures work too; the hard variant is clearly harder (room for few-shot)."""
    easy, easy_labels = testmodels.heldout_images(32, jpeg=False, per_class=10)
    hard, hard_labels = testmodels.heldout_images(128, jpeg=True, hard=True, per_class=10)
    acc_easy = testmodels.zero_shot_accuracy(tiny_model_dir, easy, easy_labels, synthetic.LABELS)
    acc_hard = testmodels.zero_shot_accuracy(tiny_model_dir, hard, hard_labels, synthetic.LABELS)
    print(f"\nzero-shot top-1: easy 32px {acc_easy:.3f}, hard 128px JPEG {acc_hard:.3f}")
    assert acc_easy >= MIN_ZERO_SHOT
    assert acc_hard <= acc_easy - 0.25


def test_cache_hit_is_fast_and_does_not_retrain(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "open_clip_model.safetensors"
    before = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = testmodels.ensure_tiny_model()
    assert again == tiny_model_dir
    assert time.perf_counter() - t0 < 2.0
    assert weights.stat().st_mtime_ns == before


def _fake_train(calls: list[int], delay: float = 0.3, fail: bool = False):
    def fake(out: Path, key: str, log) -> None:
        calls.append(1)
        time.sleep(delay)
        if fail:
            raise RuntimeError("training blew up")
        (out / testmodels.WEIGHTS_FILE).write_bytes(b"w")
        (out / testmodels.CONFIG_FILE).write_text(json.dumps({"model_cfg": {}, "clipfind": {"key": key}}))

    return fake


def test_concurrent_callers_train_once_and_publish_whole(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(testmodels, "_train_into", _fake_train(calls))
    models = tmp_path / "models"
    key = testmodels.model_key()
    (models / f".tmp-tiny-shapes-{key}-crashed").mkdir(parents=True)  # left by a killed trainer
    (models / f"tiny-shapes-{key}").mkdir()  # incomplete: no weights
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(testmodels.ensure_tiny_model(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3
    assert testmodels.read_meta(results[0])["key"] == key
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == [f"tiny-shapes-{key}"]


def test_failed_training_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(testmodels, "_train_into", _fake_train(calls, delay=0, fail=True))
    with pytest.raises(RuntimeError, match="blew up"):
        testmodels.ensure_tiny_model(tmp_path)
    assert [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_cache_root_from_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CLIPFIND_CACHE", str(tmp_path / "c"))
    assert config.cache_root() == tmp_path / "c"
    monkeypatch.delenv("CLIPFIND_CACHE")
    assert config.cache_root() == Path.home() / ".cache" / "clipfind"


# --- the trainer, on its own -------------------------------------------------

def test_lr_schedule_warms_up_then_decays() -> None:
    f = [training.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:])) and f[-1] < 0.02


def test_soft_targets_treat_same_class_as_positives() -> None:
    """Soft targets prefer captions of one class to agree; plain CLIP pushes them apart."""
    ids = torch.tensor([0, 0, 1])
    merged = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # the two class-0 items coincide
    separated = torch.eye(3)
    loss = {(name, soft): float(training.clip_loss(10 * e @ e.t(), ids, soft_targets=soft))
            for name, e in (("merged", merged), ("separated", separated)) for soft in (True, False)}
    assert loss["merged", True] < loss["separated", True]
    assert loss["separated", False] < loss["merged", False]


@pytest.mark.parametrize("busy", [True, False])
def test_thread_tuner_avoids_oversubscription(busy: bool) -> None:
    """Busy machine: 2 threads are 20x slower, so almost every step runs on 1.
    Idle machine: 2 threads are faster, so almost every step runs on 2."""
    tuner = training.ThreadTuner([1, 2])
    used = []
    for step in range(600):
        n = tuner.threads_for(step)
        used.append(n)
        tuner.record(0.1 if n == 1 else (2.0 if busy else 0.06), step)
    on_two = used.count(2)
    assert on_two <= 8 if busy else on_two >= 590


def _micro_run(seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = open_clip.CLIP(**copy.deepcopy(testmodels.TINY_MODEL_CFG))
    tok = open_clip.SimpleTokenizer(context_length=16)
    stats = training.train_clip(model, tok, testmodels.shapes_sampler(seed), steps=4, batch_size=8,
                                lr=1e-3, warmup=2, seed=seed, threads=1)
    return stats, {k: v.clone() for k, v in model.state_dict().items()}


def test_train_clip_runs_and_is_repeatable() -> None:
    stats, a = _micro_run(5)
    _, b = _micro_run(5)
    _, c = _micro_run(6)
    assert stats["steps"] == 4 and stats["threads"] == 1
    assert all(k in stats for k in ("seconds", "cpu_seconds", "first_loss", "last_loss", "logit_scale"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
