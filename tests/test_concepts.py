"""Concepts through the library API, on the tiny trained model and drawn shapes.

Learned concepts must find their class, a prompt must hold one example on
course, a concept from other weights must be refused, and every bad input must
fail before anything is written. Every test runs on both stores (SQLite;
PostgreSQL with the `postgres` mark).
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from sqlalchemy import text

from retrieval.errors import InputError, LibraryError
from retrieval.facade import Library
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.learn.concepts import learn_concept
from retrieval.learn.coop import PromptLearner, learn_prompts
from retrieval.media import synthetic
from retrieval.model.encoder import Encoder, ModelSpec
from retrieval.store.concepts import list_concepts, load_concept, remove_concept
from retrieval.tagging.autotag import query_tags
from retrieval.tagging.concept_tags import tag_concepts

PER_CLASS = 12
CLASSES = ["red circle", "blue square", "green triangle", "yellow circle"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts") / "photos"
    pairs = synthetic.write_collection(root, per_class=PER_CLASS, seed=11)
    return root, {str(p): label for p, label in pairs}


@pytest.fixture(scope="module")
def built(tmp_path_factory, collection, tiny_model_dir, module_store):
    lib_dir = tmp_path_factory.mktemp("concepts") / "lib"
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(lib_dir, model=spec, db=module_store) as library:
        index_paths(library, [str(collection[0])], spec, options=IndexOptions(workers=0))
    return lib_dir, module_store


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return Encoder(ModelSpec(model_dir=str(tiny_model_dir)))


@pytest.fixture
def library(built, tmp_path, encoder, copy_store):
    """A copy of the library (and of its PostgreSQL database) per test."""
    target = tmp_path / "lib"
    shutil.copytree(built[0], target)
    lib = Library.open(target, create=False, db=copy_store(built[1]))
    lib.bind_encoder(encoder)
    yield lib
    lib.close()


def examples(labels: dict[str, str], label: str, n: int) -> list[str]:
    return sorted(p for p, lab in labels.items() if lab == label)[:n]


def precision(library, labels, label: str, k: int = 10, **query) -> float:
    return float(np.mean([labels[r.path] == label for r in library.search(k=k, **query)]))


def test_a_concept_from_four_examples_finds_its_class(library, collection):
    _, labels = collection
    found = {}
    for label in CLASSES:
        name = label.replace(" ", "-")
        learn_concept(library, name, examples(labels, label, 4))
        found[label] = precision(library, labels, label, concept=name)
    print(f"\nconcept p@10 from 4 examples: {found}")
    assert np.mean(list(found.values())) >= 0.9 and min(found.values()) >= 0.7, found


def test_one_example_with_a_prompt_does_no_worse_than_the_prompt(library, collection):
    """The text prior is what keeps a single example from overfitting."""
    _, labels = collection
    for label in CLASSES:
        name = label.replace(" ", "-")
        learn_concept(library, name, examples(labels, label, 1), prompt=f"a photo of a {label}.")
        prompt_only = precision(library, labels, label, text=f"a photo of a {label}.", raw=True)
        assert precision(library, labels, label, concept=name) >= prompt_only - 0.1, label


def test_concept_combines_with_text_and_weights(library, collection):
    _, labels = collection
    library.learn_concept("red", examples(labels, "red circle", 4))  # the facade's door
    got = library.search("square", concept="red^0.5", k=5)
    assert "concept red" in got.query and len(got) == 5


def test_a_concept_from_other_weights_is_refused(library, collection):
    _, labels = collection
    learn_concept(library, "rc", examples(labels, "red circle", 3))
    with library.engine.begin() as conn:
        conn.execute(text("UPDATE concepts SET fingerprint = 'someothermodel' WHERE name = 'rc'"))
    with pytest.raises(LibraryError, match="other weights"):
        library.search(concept="rc")
    with pytest.raises(LibraryError):
        load_concept(library, "rc")
    assert [c.name for c in list_concepts(library)] == ["rc"]  # still listed, so it can be removed
    remove_concept(library, "rc")
    assert list_concepts(library) == []


def test_bad_input_fails_before_anything_is_written(library, collection, tmp_path):
    _, labels = collection
    positives = examples(labels, "red circle", 3)
    learn_concept(library, "taken", positives)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (dict(name="taken", positive=positives), "exists"),
        (dict(name="new", positive=[]), "no positive"),
        (dict(name="new", positive=[str(empty)]), "holds no images"),
        (dict(name="new", positive=positives + [str(not_an_image)]), "notes.jpg"),
        (dict(name="new", positive=[str(tmp_path / "missing.jpg")]), "does not exist"),
        (dict(name="  ", positive=positives), "needs a name"),
        (dict(name="new", positive=positives, method="tip-f"), "label set|set of labels"),
        (dict(name="new", positive=positives, prompt="  "), "prompt"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            learn_concept(library, **kwargs)
    assert [c.name for c in list_concepts(library)] == ["taken"]
    learn_concept(library, "taken", positives[:1], replace=True)
    assert load_concept(library, "taken").params["positives"] == 1


def test_examples_outside_the_library_are_encoded_with_a_notice(library, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(3):
        synthetic.draw("blue square", 128, random.Random(f"outside/{i}")).save(outside / f"{i}.png")
    result = learn_concept(library, "bs", [str(outside)])
    assert any("3 of 3 positive examples are not in the library" in n for n in result.notes), result.notes


def test_identical_positives_are_reported(library, collection, tmp_path):
    _, labels = collection
    original = examples(labels, "red circle", 1)[0]
    copies = []
    for i in range(3):
        copies.append(tmp_path / f"copy{i}.jpg")
        shutil.copyfile(original, copies[-1])
    result = learn_concept(library, "same", [original, *map(str, copies)])
    assert any("same picture" in n for n in result.notes), result.notes


def test_tag_concepts_tags_mostly_the_concepts_class(library, collection):
    _, labels = collection
    learn_concept(library, "gt", examples(labels, "green triangle", 4), prompt="a photo of a green triangle.")
    result = tag_concepts(library)
    tagged = [labels[t["path"]] for t in query_tags(library, run="concepts", label="gt")]
    assert result.tags == len(tagged) and len(tagged) >= PER_CLASS // 2
    assert np.mean([lab == "green triangle" for lab in tagged]) >= 0.8, tagged


def test_more_like_moves_a_vague_query_toward_the_examples(library, collection):
    _, labels = collection
    for target, vague_text, other in (("red circle", "circle", "yellow circle"),
                                      ("blue square", "square", "green square")):
        vague = precision(library, labels, target, k=PER_CLASS, text=vague_text)
        moved = precision(library, labels, target, k=PER_CLASS, text=vague_text,
                          more_like=examples(labels, target, 2), less_like=examples(labels, other, 1))
        assert moved > vague, (target, vague, moved)


def test_until_irrelevant_stops_near_where_the_class_ends(library, collection):
    _, labels = collection
    f1s = []
    for label in CLASSES:
        got = [labels[r.path] == label for r in library.search(label, k=200, until_irrelevant=True)]
        relevant = sum(lab == label for lab in labels.values())
        f1s.append(2 * sum(got) / (len(got) + relevant))
    assert np.mean(f1s) >= 0.6, f1s
    response = library.search("red circle", k=30)
    relevances = [r.relevance for r in response]
    assert all(0 <= r <= 1 for r in relevances) and relevances == sorted(relevances, reverse=True)


def test_coop_starts_as_the_zero_shot_prompt_and_learns(encoder, library, collection):
    """Step 0 of the prompt learner reproduces open_clip's own text encoding; training lowers the loss."""
    _, labels = collection
    learner = PromptLearner(encoder.model, encoder.tokenizer, ["red circle", "blue square"])
    with np.errstate(all="ignore"):
        ours = learner().detach().numpy()
    theirs = encoder.encode_texts(["a photo of a red circle.", "a photo of a blue square."])
    assert np.allclose(ours, theirs, atol=1e-5)
    from retrieval.query.search import Searcher

    searcher = Searcher(library)
    paths = examples(labels, "red circle", 4) + examples(labels, "blue square", 4)
    features = np.stack([searcher.image_vector(p, [])[0] for p in paths])
    targets = np.array([0] * 4 + [1] * 4)
    # A logit scale of 1 keeps the loss far from zero, so there is something left to learn.
    short = learn_prompts(encoder.model, encoder.tokenizer, ["red circle", "blue square"], features, targets,
                          1.0, steps=1)
    longer = learn_prompts(encoder.model, encoder.tokenizer, ["red circle", "blue square"], features, targets,
                           1.0, steps=6, lr=1e-2, snapshots=(0, 3, 6))
    assert longer.loss < short.loss
    # Snapshots (for a search over step counts): step 0 is the zero-shot prompt, the last is the result.
    assert np.allclose(longer.snapshots[0], theirs, atol=1e-5)
    assert np.allclose(longer.snapshots[6], longer.text_vectors)
    assert not np.allclose(longer.snapshots[3], longer.snapshots[0])


def test_a_coop_concept_is_a_learned_prompt_that_finds_its_class(library, collection):
    _, labels = collection
    result = learn_concept(library, "coop-bs", examples(labels, "blue square", 4), prompt="blue square",
                           method="coop")
    assert result.concept.method == "coop" and result.concept.params["steps"] > 0
    assert precision(library, labels, "blue square", concept="coop-bs") >= 0.7
