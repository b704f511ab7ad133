"""Auto-tagging from stored vectors: scores against numpy, modes, atomic runs, bad input.

The library is indexed once per module from drawn shapes (true label = the
folder) and copied per test, on each store (SQLite, and PostgreSQL with the
`postgres` mark). Expected tags are recomputed independently: the vectors read
with plain SQL, class vectors encoded text by text, softmax and thresholds in numpy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from retrieval.errors import InputError, LibraryError
from retrieval.facade import Library
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.tagging import autotag as tagging
from retrieval.tagging.autotag import TagOptions

LABELS = synthetic.LABELS
DESCRIPTIONS = {label: [f"a small {label}.", f"there is a {label} in the image.", f"a drawing of a {label}."]
                for label in LABELS}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, module_store) -> tuple[Path, str | None]:
    root = tmp_path_factory.mktemp("tagging")
    synthetic.write_collection(root / "photos", per_class=8, seed=21)
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(root / "lib", model=spec, db=module_store) as lib:
        index_paths(lib, [root / "photos"], spec, options=IndexOptions(workers=0))
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (root / "desc.json").write_text(json.dumps(DESCRIPTIONS))
    return root, module_store


@pytest.fixture
def library(built, tmp_path, copy_store):
    shutil.copytree(built[0] / "lib", tmp_path / "lib")
    lib = Library.open(tmp_path / "lib", create=False, db=copy_store(built[1]))
    yield lib
    lib.close()


@pytest.fixture
def labels_file(built) -> Path:
    return built[0] / "labels.txt"


def sql(library, statement: str, **params) -> list:
    """Rows of one plain SQL statement on the library's database (either store), not through
    the code under test."""
    with library.engine.begin() as conn:
        result = conn.execute(text(statement), params)
        return result.all() if result.returns_rows else []


def stored(library) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids, vectors, true labels) read straight from the database."""
    rows = sql(library, "SELECT id, embedding, path FROM images ORDER BY id")
    ids = np.array([r[0] for r in rows])
    x = np.stack([np.frombuffer(r[1], np.float32) for r in rows]).astype(np.float64)
    truth = [Path(r[2]).parent.name.replace("_", " ") for r in rows]
    return ids, x, truth


def tag_rows(library, run: str) -> dict[int, list[tuple[str, float, int]]]:
    rows = sql(library, "SELECT t.image_id, t.label, t.score, t.rank FROM tags t JOIN tag_runs r "
                        "ON r.id = t.tag_run_id WHERE r.name = :run ORDER BY t.image_id, t.rank", run=run)
    out: dict[int, list] = {}
    for image_id, label, score, rank in rows:
        out.setdefault(image_id, []).append((label, score, rank))
    return out


def class_matrix(encoder, template: str = "a photo of a {}.") -> np.ndarray:
    c = np.stack([encoder.encode_texts([template.format(label)])[0] for label in LABELS]).astype(np.float64)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def count_runs(library) -> int:
    return sql(library, "SELECT (SELECT count(*) FROM tag_runs) + (SELECT count(*) FROM tags)")[0][0]


def test_single_label_tags_equal_numpy_softmax(library, labels_file):
    result = library.tag(labels_file, "template", options=TagOptions(top_k=3, chunk=40))
    assert (result.name, result.images, result.tags, result.mode) == ("labels", 96, 288, "single-label")
    ids, x, truth = stored(library)
    scale = tagging.logit_scale(library.encoder())
    logits = scale * x @ class_matrix(library.encoder()).T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    tags = tag_rows(library, "labels")
    for i, image_id in enumerate(ids):
        best = np.argsort(-probs[i])[:3]
        assert [t[0] for t in tags[image_id]] == [LABELS[j] for j in best]
        np.testing.assert_allclose([t[1] for t in tags[image_id]], probs[i, best], rtol=1e-4, atol=1e-6)
        assert [t[2] for t in tags[image_id]] == [1, 2, 3]
    top1 = np.mean([tags[image_id][0][0] == truth[i] for i, image_id in enumerate(ids)])
    assert top1 > 0.6  # chance is 1/12


def test_single_label_probability_threshold(library, labels_file):
    library.tag(labels_file, "template", name="sure", options=TagOptions(top_k=12, threshold=0.3))
    tags = tag_rows(library, "sure")
    scores = [s for rows in tags.values() for _, s, _ in rows]
    assert scores and min(scores) >= 0.3
    assert all(len(rows) <= 3 for rows in tags.values())  # at most 3 labels can each hold >= 0.3


@pytest.mark.parametrize("strategy", ["raw", "template", "ensemble:simple7", "ensemble", "cupl",
                                      "ensemble+cupl"])
def test_every_strategy_tags_far_above_chance(library, labels_file, built, strategy):
    result = library.tag(labels_file, strategy, name=strategy, descriptions=str(built[0] / "desc.json"))
    assert result.notes == []
    ids, _, truth = stored(library)
    tags = tag_rows(library, strategy)
    top1 = np.mean([tags[image_id][0][0] == truth[i] for i, image_id in enumerate(ids)])
    assert top1 > 0.5, (strategy, top1)


def test_multi_label_global_threshold_equals_numpy(library, labels_file):
    library.tag(labels_file, "template", name="multi", options=TagOptions(multi_label=True, threshold=0.5, chunk=25))
    ids, x, _ = stored(library)
    cos = x @ class_matrix(library.encoder()).T
    tags = tag_rows(library, "multi")
    for i, image_id in enumerate(ids):
        want = sorted(((LABELS[j], cos[i, j]) for j in np.flatnonzero(cos[i] >= 0.5)), key=lambda t: -t[1])
        got = tags.get(image_id, [])
        assert [t[0] for t in got] == [w[0] for w in want]
        np.testing.assert_allclose([t[1] for t in got], [w[1] for w in want], atol=1e-5)
        assert [t[2] for t in got] == list(range(1, len(want) + 1))


def test_calibrated_per_label_thresholds(library, labels_file):
    result = library.tag(labels_file, "template", name="cal", options=TagOptions(calibrate=True, chunk=30))
    assert result.mode == "multi-label"
    ids, x, truth = stored(library)
    cos = x @ class_matrix(library.encoder()).T
    # By hand: argmax pseudo-labels, then per label the bin edge with the best F1 against them.
    pseudo = cos.argmax(axis=1)
    bins = np.floor((np.clip(cos, -1, 1 - 1e-6) + 1) * tagging.HIST_BINS / 2)
    want = []
    for j in range(len(LABELS)):
        positives = (pseudo == j).sum()
        tagged = bins[:, j][:, None] >= np.arange(tagging.HIST_BINS)[None, :]  # image x candidate threshold
        f1 = 2 * (tagged & (pseudo == j)[:, None]).sum(axis=0) / np.maximum(tagged.sum(axis=0) + positives, 1)
        want.append(np.argmax(f1) / (tagging.HIST_BINS / 2) - 1 if positives else np.inf)
    got = np.array([result.thresholds[label] if result.thresholds[label] is not None else np.inf
                    for label in LABELS])
    np.testing.assert_allclose(got, want, atol=2 / tagging.HIST_BINS)
    tags = tag_rows(library, "cal")
    recall = np.mean([truth[i] in {t[0] for t in tags.get(image_id, [])} for i, image_id in enumerate(ids)])
    per_image = np.mean([len(tags.get(image_id, [])) for image_id in ids])
    assert recall > 0.6 and per_image < 2, (recall, per_image)


def test_iter_vectors_streams_every_row_in_chunks(library):
    ids, x, _ = stored(library)
    with library.engine.connect() as conn:
        chunks = list(tagging.iter_vectors(conn.connection.dbapi_connection, library.dim, chunk=7))
    assert [len(c[0]) for c in chunks] == [7] * 13 + [5]
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), ids)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), x.astype(np.float32))


def test_rerun_replaces_the_run_and_a_failure_keeps_the_old_one(library, labels_file, monkeypatch):
    library.tag(labels_file, "template", name="run")
    first = tag_rows(library, "run")
    library.tag(labels_file, "raw", name="run", options=TagOptions(top_k=2))
    second = tag_rows(library, "run")
    assert all(len(rows) == 2 for rows in second.values()) and second != first
    assert [r["strategy"] for r in tagging.list_runs(library)] == ["raw"]

    real = tagging.select_tags
    calls = []

    def fail_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tagging, "select_tags", fail_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        library.tag(labels_file, "ensemble:simple7", name="run", options=TagOptions(top_k=5, chunk=10))
    assert tag_rows(library, "run") == second  # two chunks were inserted, then all rolled back
    assert [r["strategy"] for r in tagging.list_runs(library)] == ["raw"]


def test_bad_input_writes_nothing(library, labels_file, built, tmp_path):
    library.tag(labels_file, "template", name="keep")
    before = count_runs(library)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    dupes = tmp_path / "dupes.txt"
    dupes.write_text("red circle\nblue square\nred circle\n")
    broken = tmp_path / "broken.json"
    broken.write_text('{"red circle": ["a red disc"')
    shots = tmp_path / "shots"
    (shots / "red_circle").mkdir(parents=True)
    cases = [
        (dict(labels=empty), "has no labels"),
        (dict(labels=dupes), "'red circle' appears twice"),
        (dict(labels=labels_file, strategy="cupl", descriptions=str(broken)), "not valid JSON"),
        (dict(labels=labels_file, strategy="cupl"), "needs descriptions"),
        (dict(labels=labels_file, strategy="sparkle"), "unknown strategy part"),
        (dict(labels=labels_file, shots=str(shots)), "has no images"),
        (dict(labels=labels_file, options=TagOptions(threshold=0.2, calibrate=True)), "not both"),
        (dict(labels=labels_file, options=TagOptions(threshold=1.5)), "probability between 0 and 1"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("strategy", "template")
        with pytest.raises(InputError, match=message):
            library.tag(kwargs.pop("labels"), kwargs.pop("strategy"), name="keep", **kwargs)
        assert count_runs(library) == before


def test_missing_descriptions_fall_back_with_a_note(library, labels_file, tmp_path):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({k: v for k, v in DESCRIPTIONS.items() if k != "red circle"}))
    result = library.tag(labels_file, "cupl", descriptions=str(partial))
    assert result.notes == ["1 of 12 labels have no descriptions, so they use the template "
                            "'a photo of a {}.': red circle"]
    assert tagging.list_runs(library)[0]["tags"] == 96


def test_busy_library_and_empty_library(library, labels_file, tmp_path, tiny_model_dir, new_database):
    with library.write_lock():
        with pytest.raises(LibraryError, match="busy"):
            library.tag(labels_file, "template")
    assert count_runs(library) == 0
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(tmp_path / "empty", model=spec, db=new_database(library.store.url_with_password)) as empty:
        empty.encoder(spec)
        with pytest.raises(LibraryError, match="is empty"):
            empty.tag(labels_file, "template")


def test_a_corrupt_stored_vector_is_a_clear_error(library, labels_file):
    sql(library, "UPDATE images SET embedding = :blob WHERE id = 5", blob=bytes(4))
    with pytest.raises(LibraryError, match="image 5 has a stored vector that is not 64-dimensional"):
        library.tag(labels_file, "template")
    assert count_runs(library) == 0


def test_query_tags_filters_and_unknown_run(library, labels_file):
    library.tag(labels_file, "template", name="a")
    rows = list(tagging.query_tags(library, run="a", label="red circle"))
    assert rows and all(r["label"] == "red circle" and r["run"] == "a" for r in rows)
    assert all(Path(r["path"]).is_file() for r in rows)
    assert len(list(tagging.query_tags(library, limit=5))) == 5
    with pytest.raises(InputError, match=r"no tag run named 'b' \(runs: a\)"):
        list(tagging.query_tags(library, run="b"))
