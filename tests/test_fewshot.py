"""Tip-Adapter: shots folders, the logit arithmetic, the alpha/beta search, and a measured gain.

Where zero-shot is weak: the labels are named with words the tiny model's text
tower never saw for these shapes ("red disc", "blue box", "green wedge"), so
its prompts only carry the colour; the image tower still tells the shapes
apart, which a few labelled examples let Tip-Adapter use. (The drawn "hard"
split is no good for this: the tiny model's image vectors barely separate its
classes, so no method on top of them gains much; see the issue note.)
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from retrieval.errors import InputError
from retrieval.media import synthetic
from retrieval.model.encoder import Encoder, ModelSpec
from retrieval.prompting import prompts
from retrieval.tagging import fewshot
from retrieval.tagging.autotag import logit_scale
from retrieval.tagging.labels import Label, from_names

ALIAS = {"circle": "disc", "square": "box", "triangle": "wedge"}
ALIAS_NAMES = [f"{c} {ALIAS[s]}" for c, s in (label.split() for label in synthetic.LABELS)]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir) -> Encoder:
    return Encoder(ModelSpec(model_dir=str(tiny_model_dir)), precision="fp32")  # exact arithmetic


def drawn(encoder, seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    images, targets = [], []
    for index, label in enumerate(synthetic.LABELS):
        for i in range(per_class):
            images.append(synthetic.draw(label, 128, random.Random(f"fewshot/{seed}/{label}/{i}")))
            targets.append(index)
    return encoder.encode_images(images), np.array(targets)


def test_find_shots_matches_folders_to_labels_and_rejects_bad_folders(tmp_path):
    labels = [Label("red circle", ("red disc",)), Label("blue square"), Label("green triangle")]
    synthetic.write_collection(tmp_path / "shots", per_class=2, seed=3, labels=["red circle", "blue square"])
    (tmp_path / "shots" / "red_circle").rename(tmp_path / "shots" / "Red_Disc")
    (tmp_path / "shots" / "blue_square" / "notes.txt").write_text("not an image")
    paths, targets, notes = fewshot.find_shots(tmp_path / "shots", labels)
    assert targets == [0, 0, 1, 1] and all(p.endswith(".jpg") for p in paths)
    assert notes == [f"1 labels have no examples in {tmp_path / 'shots'} and rely on zero-shot alone: green triangle"]
    (tmp_path / "shots" / "green_triangle").mkdir()
    with pytest.raises(InputError, match="green_triangle has no images"):
        fewshot.find_shots(tmp_path / "shots", labels)
    shutil.rmtree(tmp_path / "shots" / "green_triangle")
    (tmp_path / "shots" / "purple_star").mkdir()
    with pytest.raises(InputError, match="purple_star matches no label"):
        fewshot.find_shots(tmp_path / "shots", labels)
    with pytest.raises(InputError, match="does not exist"):
        fewshot.find_shots(tmp_path / "nowhere", labels)


def test_adapter_logits_equal_the_formula():
    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    x, classes, keys = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(4, 8)))
    targets = np.array([0, 2, 2, 1])
    cache = fewshot.ShotCache(keys.astype(np.float32), targets, 3, [], [])
    got = 10.0 * x @ classes.T + fewshot.TipAdapter(cache, alpha=2.0, beta=3.0).logits(
        torch.from_numpy(x.astype(np.float32))).numpy()
    want = np.zeros((5, 3))
    for i in range(5):
        for c in range(3):
            want[i, c] = 10.0 * x[i] @ classes[c] + 2.0 * sum(
                np.exp(-3.0 * (1 - x[i] @ keys[k])) for k in range(4) if targets[k] == c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fewshot.tip_logits(x, classes, 10.0, keys, targets, 2.0, 3.0), want, rtol=1e-10)


def test_search_is_leave_one_out():
    # Two tight pairs: a's examples sit on class b's text vector. Each example's
    # nearest *other* example is its twin, so the cache corrects zero-shot only
    # when an example is not allowed to vote for itself.
    classes = np.array([[1.0, 0.0], [0.0, 1.0]])
    keys = np.array([[0.2, 0.98], [0.25, 0.97], [0.97, 0.25], [0.98, 0.2]])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    cache = fewshot.ShotCache(keys, np.array([0, 0, 1, 1]), 2, [], [])
    found = fewshot.search_alpha_beta(cache, classes, 10.0, alphas=(0.0, 100.0), betas=(10.0,))
    assert found["zero_shot_accuracy"] == 0.0
    assert (found["alpha"], found["beta"], found["accuracy"]) == (100.0, 10.0, 1.0)
    with pytest.raises(InputError, match="at least two"):
        fewshot.search_alpha_beta(fewshot.ShotCache(keys[:1], np.array([0]), 2, [], []), classes, 10.0)


def test_tip_adapter_beats_zero_shot_where_zero_shot_is_weak(encoder, tmp_path):
    labels = from_names(ALIAS_NAMES)
    classes = prompts.class_vectors(encoder, labels, "template").matrix
    scale = logit_scale(encoder)
    test_x, test_y = drawn(encoder, seed=1, per_class=20)
    # The shots go through the real folder path: files on disk, decoded, encoded.
    root = tmp_path / "shots"
    for label, alias in zip(synthetic.LABELS, ALIAS_NAMES):
        synthetic.write_collection(root, per_class=8, seed=2, labels=[label])
        (root / synthetic.label_dirname(label)).rename(root / alias.replace(" ", "_"))
    cache = fewshot.build_cache(encoder, root, labels)
    assert len(cache.targets) == 96 and cache.notes == []
    zero_shot = np.mean((test_x @ classes.T).argmax(axis=1) == test_y)
    found = fewshot.search_alpha_beta(cache, classes, scale)
    tuned = fewshot.tip_logits(test_x, classes, scale, cache.keys, cache.targets, found["alpha"], found["beta"])
    default = fewshot.tip_logits(test_x, classes, scale, cache.keys, cache.targets, 1.0, 5.5)
    tuned_acc, default_acc = np.mean(tuned.argmax(1) == test_y), np.mean(default.argmax(1) == test_y)
    print(f"\nalias labels, 8 shots: zero-shot {zero_shot:.3f}, tip-adapter default {default_acc:.3f}, "
          f"searched (alpha={found['alpha']}, beta={found['beta']}) {tuned_acc:.3f}")
    real_names = prompts.class_vectors(encoder, from_names(synthetic.LABELS), "template").matrix
    assert zero_shot < np.mean((test_x @ real_names.T).argmax(axis=1) == test_y) - 0.15  # weak, as meant
    # Measured over retrained tiny models: zero-shot 0.37-0.58, Tip-Adapter 0.76-0.88.
    assert tuned_acc > zero_shot + 0.2 and default_acc > zero_shot + 0.15


def test_search_keeps_zero_shot_when_it_is_already_right(encoder):
    labels = from_names(synthetic.LABELS)
    classes = prompts.class_vectors(encoder, labels, "template").matrix
    keys, targets = drawn(encoder, seed=4, per_class=4)
    found = fewshot.search_alpha_beta(fewshot.ShotCache(keys, targets, 12, [], []), classes, logit_scale(encoder))
    assert found["accuracy"] >= found["zero_shot_accuracy"]
