"""Label sets, prompt strategies, and class vectors checked against a hand computation.

The hand computation encodes every prompt text on its own through the model
(no batching, no open_clip classifier builder), normalises, averages and
re-normalises in numpy: the arithmetic the CLIP paper and CuPL specify.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.errors import InputError
from retrieval.model.encoder import Encoder, ModelSpec
from retrieval.prompting import prompts
from retrieval.tagging import labels as labels_mod
from retrieval.tagging.labels import Label


@pytest.fixture(scope="module")
def encoder(tiny_model_dir) -> Encoder:
    return Encoder(ModelSpec(model_dir=str(tiny_model_dir)), precision="fp32")  # exact arithmetic


def by_hand(encoder: Encoder, texts: list[str]) -> np.ndarray:
    rows = np.stack([encoder.encode_texts([t])[0] for t in texts]).astype(np.float64)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    mean = rows.mean(axis=0)
    return mean / np.linalg.norm(mean)


# -- label sets ----------------------------------------------------------------------------
def test_label_file_with_synonyms_comments_and_blank_lines(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("# animals\n\ncat: kitty,  house cat , cat\n  dog  \nred   fox:\n")
    assert labels_mod.load_labels(f) == [Label("cat", ("kitty", "house cat")), Label("dog"), Label("red fox")]
    assert labels_mod.label_set_name(f) == "labels"


@pytest.mark.parametrize("text, message", [
    ("", "has no labels"),
    ("# only a comment\n\n", "has no labels"),
    ("cat\ndog\nCat: kitty\n", r"'Cat' appears twice \(lines 1 and 3\)"),
    (": kitty\n", "line 1: a synonym list needs a label"),
])
def test_bad_label_files(tmp_path, text, message):
    f = tmp_path / "labels.txt"
    f.write_text(text)
    with pytest.raises(InputError, match=message):
        labels_mod.load_labels(f)


def test_builtin_label_sets():
    imagenet = labels_mod.load_labels("imagenet1k")
    assert len(imagenet) == 1000 and imagenet[0].name == "tench"
    assert [label.name for label in labels_mod.load_labels("cifar10")][:3] == ["airplane", "automobile", "bird"]
    cifar100 = labels_mod.load_labels("cifar100")
    assert len(cifar100) == 100 and cifar100[1].name == "aquarium fish"
    with pytest.raises(InputError, match="built-in sets: imagenet1k, cifar10, cifar100"):
        labels_mod.load_labels("no-such-set")


# -- strategies ----------------------------------------------------------------------------
def test_parse_strategies():
    assert prompts.parse_strategy("raw").all_templates == ("{}",)
    assert prompts.parse_strategy("template").all_templates == ("a photo of a {}.",)
    assert prompts.parse_strategy("template:a drawing of a {}.").all_templates == ("a drawing of a {}.",)
    assert len(prompts.parse_strategy("ensemble").all_templates) == 80
    simple = prompts.parse_strategy("ensemble:simple7+cupl:d.json")
    assert len(simple.all_templates) == 7 and simple.cupl and simple.descriptions_file == "d.json"
    assert not prompts.parse_strategy("cupl").templates


@pytest.mark.parametrize("text, message", [
    ("magic", "unknown strategy part 'magic'"),
    ("template+", "empty strategy part"),
    ("template:a photo", "needs a {} placeholder"),
    ("cupl+cupl", "names cupl twice"),
    ("ensemble:nonexistent", "no template set or file named 'nonexistent'"),
])
def test_bad_strategies(text, message):
    with pytest.raises(InputError, match=message.replace("{}", r"\{\}")):
        prompts.parse_strategy(text)


def test_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\na {}.\na drawing of a {}.\n")
    assert prompts.parse_strategy(f"ensemble:{f}").all_templates == ("a {}.", "a drawing of a {}.")
    f.write_text("no placeholder\n")
    with pytest.raises(InputError, match="needs a {} placeholder".replace("{}", r"\{\}")):
        prompts.parse_strategy(f"ensemble:{f}")


# -- class vectors: the arithmetic ---------------------------------------------------------
def test_open_clip_builder_path_equals_hand_ensemble(encoder):
    labels = [Label("red circle"), Label("blue square")]
    got = prompts.class_vectors(encoder, labels, "ensemble:simple7")
    templates = prompts.template_set("simple7")
    for row, label in zip(got.matrix, labels):
        np.testing.assert_allclose(row, by_hand(encoder, [t.format(label.name) for t in templates]), atol=2e-6)
    assert got.texts_per_label == [7, 7] and got.labels == ["red circle", "blue square"]
    raw = prompts.class_vectors(encoder, labels, "raw").matrix
    np.testing.assert_allclose(raw[0], encoder.encode_texts(["red circle"])[0], atol=2e-6)


def test_synonyms_are_pooled_into_one_class_vector(encoder):
    labels = [Label("red circle", ("red disc",)), Label("blue square")]
    got = prompts.class_vectors(encoder, labels, "template+template:a drawing of a {}.")
    texts = ["a photo of a red circle.", "a photo of a red disc.",
             "a drawing of a red circle.", "a drawing of a red disc."]
    np.testing.assert_allclose(got.matrix[0], by_hand(encoder, texts), atol=2e-6)
    np.testing.assert_allclose(got.matrix[1], by_hand(encoder, ["a photo of a blue square.",
                                                                "a drawing of a blue square."]), atol=2e-6)
    assert got.texts_per_label == [4, 2]


def test_cupl_descriptions_alone_and_pooled_with_templates(encoder, tmp_path):
    desc = {"red circle": ["a small red circle.", "there is a red circle in the image."],
            "blue square": ["a large blue square."]}
    labels = [Label("red circle"), Label("blue square")]
    cupl_only = prompts.class_vectors(encoder, labels, "cupl", desc)
    np.testing.assert_allclose(cupl_only.matrix[0], by_hand(encoder, desc["red circle"]), atol=2e-6)
    np.testing.assert_allclose(cupl_only.matrix[1], by_hand(encoder, desc["blue square"]), atol=2e-6)
    # ensemble+cupl: one mean over the 7 template texts and the descriptions together.
    f = tmp_path / "desc.json"
    f.write_text(json.dumps(desc))
    pooled = prompts.class_vectors(encoder, labels, f"ensemble:simple7+cupl:{f}")
    texts = [t.format("red circle") for t in prompts.template_set("simple7")] + desc["red circle"]
    np.testing.assert_allclose(pooled.matrix[0], by_hand(encoder, texts), atol=2e-6)
    assert pooled.texts_per_label == [9, 8] and pooled.notes == []


def test_labels_missing_from_descriptions_fall_back_and_say_so(encoder):
    desc = {"red circle": ["a small red circle."]}
    labels = [Label("red circle"), Label("blue square"), Label("green triangle")]
    got = prompts.class_vectors(encoder, labels, "cupl", desc)
    np.testing.assert_allclose(got.matrix[1], by_hand(encoder, ["a photo of a blue square."]), atol=2e-6)
    assert got.notes == ["2 of 3 labels have no descriptions, so they use the template 'a photo of a {}.': "
                         "blue square, green triangle"]
    with_templates = prompts.class_vectors(encoder, labels, "template:a {}.+cupl", desc)
    np.testing.assert_allclose(with_templates.matrix[2], by_hand(encoder, ["a green triangle."]), atol=2e-6)
    assert "use its templates only" in with_templates.notes[0]


def test_cupl_needs_descriptions_and_warns_about_truncation(encoder):
    with pytest.raises(InputError, match="needs descriptions"):
        prompts.class_vectors(encoder, [Label("red circle")], "cupl")
    long = {"red circle": ["a red circle " + "with a very long and winding description " * 3]}
    got = prompts.class_vectors(encoder, [Label("red circle")], "cupl", long)
    assert "longer than the model's 16-token context" in got.notes[0]


def test_bundled_cifar10_template_set_is_the_clip_papers_18():
    templates = prompts.template_set("cifar10")
    assert len(templates) == 18 == len(set(templates))
    assert templates[0] == "a photo of a {}." and templates[-1] == "a photo of the big {}."
    assert all("{}" in t for t in templates)
    strategy = prompts.parse_strategy("ensemble:cifar10+cupl:cifar10")
    assert strategy.all_templates == templates and strategy.cupl and strategy.descriptions_file == "cifar10"


def test_bundled_sets_work_as_strategies(encoder):
    cifar = [Label("cat"), Label("dog")]
    both = prompts.class_vectors(encoder, cifar, "ensemble:cifar10+cupl:cifar10")
    from retrieval.prompting.cupl import load_descriptions

    described = load_descriptions("cifar10")
    assert both.texts_per_label == [18 + len(described["cat"]), 18 + len(described["dog"])]
    expected = by_hand(encoder, [t.format("cat") for t in prompts.template_set("cifar10")] + described["cat"])
    np.testing.assert_allclose(both.matrix[0], expected, atol=1e-5)
