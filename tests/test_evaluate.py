"""Evaluation: dataset loading, top-k arithmetic, zero-shot per strategy, text→image recall."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retrieval.errors import InputError
from retrieval.media import synthetic
from retrieval.model.encoder import Encoder, ModelSpec
from retrieval.tagging import evaluate
from retrieval.tagging.labels import load_labels

STRATEGIES = ["raw", "template", "ensemble:simple7", "ensemble", "cupl", "ensemble+cupl"]
DESCRIPTIONS = {label: [f"a small {label}.", f"there is a {label} in the image."] for label in synthetic.LABELS}


@pytest.fixture(scope="module")
def encoder(tiny_model_dir) -> Encoder:
    return Encoder(ModelSpec(model_dir=str(tiny_model_dir)), precision="fp32")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    synthetic.write_collection(root, per_class=6, seed=31)
    return root


def decoded(encoder, path):
    """Decoded as the indexer and evaluation decode (JPEG draft mode at the model's size)."""
    return evaluate.open_image(path, draft_size=(encoder.image_size, encoder.image_size))


def test_image_folder_and_csv_datasets(tmp_path, heldout):
    folder = evaluate.load_classification(heldout)
    assert len(folder.paths) == 72 and folder.classes == sorted(synthetic.LABELS)
    assert folder.classes[folder.targets[0]] == "blue circle" and folder.paths[0].endswith("blue_circle/0000.jpg")
    (tmp_path / "img").mkdir()
    csv_file = tmp_path / "data.csv"
    csv_file.write_text(f"path,label\nimg/a.jpg,cat\n{heldout}/red_circle/0000.jpg,dog\nimg/b.jpg,cat\n")
    data = evaluate.load_classification(csv_file)
    assert data.classes == ["cat", "dog"] and list(data.targets) == [0, 1, 0]
    assert data.paths[0] == str(tmp_path / "img" / "a.jpg")
    for text, message in [("a.jpg\n", "row 1 is not path,label"), ("", "has no images")]:
        csv_file.write_text(text)
        with pytest.raises(InputError, match=message):
            evaluate.load_classification(csv_file)
    with pytest.raises(InputError, match="no dataset at"):
        evaluate.load_classification(tmp_path / "missing")


def test_image_folder_needs_class_folders_with_images(tmp_path, heldout):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(heldout / "red_circle" / "0000.jpg", flat / "a.jpg")
    with pytest.raises(InputError, match="has 1 images but no class sub-folders"):
        evaluate.load_classification(flat)
    (flat / "cat").mkdir()
    shutil.copy(heldout / "red_circle" / "0000.jpg", flat / "cat" / "0.jpg")
    (flat / "bird").mkdir()
    (flat / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="class folder .*bird has no images"):
        evaluate.load_classification(flat)


def test_topk_accuracy_by_hand():
    logits = np.array([[0.9, 0.1, 0.0], [0.1, 0.5, 0.4], [0.3, 0.2, 0.1]])
    assert evaluate.topk_accuracy(logits, np.array([0, 2, 2]), ks=(1, 2)) == {1: 1 / 3, 2: 2 / 3}


def test_every_strategy_far_above_chance(encoder, heldout):
    data = evaluate.load_classification(heldout)
    result = evaluate.zeroshot(encoder, data, STRATEGIES, descriptions=DESCRIPTIONS)
    assert [r["strategy"] for r in result["results"]] == STRATEGIES
    assert result["chance_top1"] == round(1 / 12, 4) and result["notes"] == []
    for row in result["results"]:
        assert row["top1"] > 0.5 and row["top5"] >= row["top1"] and row["images_per_s"] > 0, row
    texts = {r["strategy"]: r["texts"] for r in result["results"]}
    assert texts == {"raw": 12, "template": 12, "ensemble:simple7": 84, "ensemble": 960, "cupl": 24,
                     "ensemble+cupl": 984}
    # The template row equals an independent argmax over the same model's vectors.
    feats = encoder.encode_images([decoded(encoder, p) for p in data.paths])
    text = encoder.encode_texts([f"a photo of a {c}." for c in data.classes])
    want = np.mean((feats @ text.T).argmax(axis=1) == data.targets)
    assert result["results"][1]["top1"] == round(want, 4)


def test_label_file_supplies_synonyms_and_must_cover_the_classes(encoder, heldout, tmp_path):
    data = evaluate.load_classification(heldout)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"{c}: small {c}" for c in reversed(synthetic.LABELS)) + "\n")
    result = evaluate.zeroshot(encoder, data, ["template"], labels=load_labels(labels))
    assert result["results"][0]["texts"] == 24 and result["results"][0]["top1"] > 0.5
    labels.write_text("red circle\n")
    with pytest.raises(InputError, match="no label for dataset classes: blue circle"):
        evaluate.zeroshot(encoder, data, ["template"], labels=load_labels(labels))


def test_shots_add_tip_adapter_rows(encoder, heldout, tmp_path):
    synthetic.write_collection(tmp_path / "shots", per_class=3, seed=32)
    data = evaluate.load_classification(heldout)
    result = evaluate.zeroshot(encoder, data, ["template"], shots=str(tmp_path / "shots"), search=True)
    zs, tip = result["results"]
    assert tip["strategy"] == "template + tip-adapter" and tip["shots"] == 36 and tip["alpha_beta"] == "searched"
    assert tip["top1"] > 0.5


def test_an_unreadable_image_is_named(encoder, heldout, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "d.csv").write_text(f"{heldout}/red_circle/0000.jpg,red circle\n{bad},blue square\n")
    with pytest.raises(InputError, match="broken.jpg"):
        evaluate.zeroshot(encoder, evaluate.load_classification(tmp_path / "d.csv"), ["template"])


def test_retrieval_recall_matches_numpy(encoder, heldout, tmp_path):
    rows = ["path,caption"]
    for label in synthetic.LABELS:
        folder = heldout / synthetic.label_dirname(label)
        rows.append(f"{folder}/0000.jpg,a photo of a {label}.")
        rows.append(f"{folder}/0000.jpg,a drawing of a {label}.")
        rows.append(f"{folder}/0001.jpg,a small {label}.")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    result = evaluate.retrieval(encoder, tmp_path / "captions.csv")
    assert (result["images"], result["captions"]) == (24, 36)
    images, captions = evaluate.load_captions(tmp_path / "captions.csv")
    feats = encoder.encode_images([decoded(encoder, p) for p in images.paths])
    sims = encoder.encode_texts(captions) @ feats.T
    ranks = np.array([(sims[i] > sims[i, images.targets[i]]).sum() for i in range(len(captions))])
    for k in (1, 5, 10):
        assert result[f"recall@{k}"] == round(float(np.mean(ranks < k)), 4)
    assert result["recall@10"] > 0.5  # 24 images, two per class: the right class ranks near the top
    json.dumps(result)
