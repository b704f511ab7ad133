"""`clipfind concept ...`, `search --concept/--more-like/--until-irrelevant`, `tag --concepts` through click,
on each store (PostgreSQL: `index --db URL` once, then the folder remembers the database)."""

from __future__ import annotations

import json

import pytest

from retrieval.errors import EXIT_INPUT, EXIT_LIBRARY, EXIT_USAGE
from retrieval.media import synthetic
from retrieval.query.relevance import CUT
from tests.cli_runner import clipfind
from tests.pg_server import PASSWORD
from tests.store_sql import sql

PER_CLASS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, module_store):
    base = tmp_path_factory.mktemp("cli-concepts")
    pairs = synthetic.write_collection(base / "photos", per_class=PER_CLASS, seed=23)
    labels = {str(p): label for p, label in pairs}
    lib = base / "lib"
    db = ["--db", module_store] if module_store else []
    result = clipfind("index", base / "photos", "-L", lib, *db, "--model-dir", tiny_model_dir, "--workers", "0",
                      "-q")
    assert result.exit_code == 0, result.output
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", PASSWORD)
        mp.delenv("CLIPFIND_DB", raising=False)
        yield {"lib": str(lib), "photos": base / "photos", "labels": labels, "db": module_store}


def test_learn_list_show_search_tag_remove(setup):
    lib, photos, labels = setup["lib"], setup["photos"], setup["labels"]
    learned = clipfind("concept", "learn", "rc", photos / "red_circle" / "0000.jpg", "-p",
                       photos / "red_circle" / "0001.jpg", "--prompt", "a photo of a red circle.",
                       "-L", lib, "--json")
    assert learned.exit_code == 0, learned.output
    info = json.loads(learned.stdout)
    assert info["name"] == "rc" and info["method"] == "probe" and info["params"]["positives"] == 2

    listed = clipfind("concept", "list", "-L", lib, "--json")
    assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["rc"]
    shown = clipfind("concept", "show", "rc", "-L", lib)
    assert "P = sigmoid(" in shown.stdout and "a photo of a red circle." in shown.stdout
    vector = json.loads(clipfind("concept", "show", "rc", "-L", lib, "--json", "--vector").stdout)["direction"]
    assert len(vector) > 8

    found = clipfind("search", "--concept", "rc", "-L", lib, "--no-server", "--json", "-k", "5")
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(rows) == 5 and all(0 <= r["relevance"] <= 1 for r in rows)
    assert sum(labels[r["path"]] == "red circle" for r in rows) >= 4

    tagged = clipfind("tag", "--concepts", "-L", lib, "--json", "-q")
    assert tagged.exit_code == 0, tagged.output
    assert json.loads(tagged.stdout)["name"] == "concepts"

    removed = clipfind("concept", "remove", "rc", "-L", lib)
    assert removed.exit_code == 0 and "removed" in removed.stdout
    assert clipfind("concept", "list", "-L", lib, "--json").stdout == ""


def test_until_irrelevant_and_feedback_flags(setup):
    lib, photos, labels = setup["lib"], setup["photos"], setup["labels"]
    cut = clipfind("search", "blue square", "--until-irrelevant", "-L", lib, "--no-server", "--json")
    assert cut.exit_code == 0, cut.output
    rows = [json.loads(line) for line in cut.stdout.splitlines()]
    assert 1 <= len(rows) < len(labels) and all(r["relevance"] >= CUT for r in rows)
    strict = clipfind("search", "blue square", "--min-relevance", "0.99", "-k", "50", "-L", lib, "--no-server",
                      "--json")
    assert all(json.loads(line)["relevance"] >= 0.99 for line in strict.stdout.splitlines())
    liked = [photos / "green_square" / "0000.jpg", photos / "green_square" / "0001.jpg"]
    disliked = photos / "green_circle" / "0000.jpg"
    more_like = ["--more-like", liked[0], "--more-like", liked[1], "-L", lib, "--no-server", "--paths", "-k", "16"]
    plain, feedback = clipfind("search", *more_like), clipfind("search", *more_like, "--less-like", disliked)
    assert plain.exit_code == 0 and feedback.exit_code == 0, plain.output + feedback.output
    ranked, before = feedback.stdout.splitlines(), plain.stdout.splitlines()
    # The tiny model's image vectors are mostly colour, its shapes weak (test_concepts checks feedback
    # on a text query): the liked photos lead, all green, and the disliked one falls.
    assert {str(p) for p in liked} <= set(ranked[:3]), ranked
    assert all(labels[p].startswith("green") for p in ranked[:5]), [labels[p] for p in ranked]
    assert ranked.index(str(disliked)) > before.index(str(disliked)), (before, ranked)


def test_mistakes_are_one_line_with_their_exit_codes(setup, tmp_path):
    lib, photos = setup["lib"], setup["photos"]
    text_file = tmp_path / "a.jpg"
    text_file.write_text("hello")
    ok = clipfind("concept", "learn", "dup", photos / "blue_circle", "-L", lib)
    assert ok.exit_code == 0, ok.output
    cases = [
        (("concept", "learn", "dup", photos / "blue_circle"), EXIT_INPUT, "exists"),
        (("concept", "learn", "x"), EXIT_INPUT, "no positive"),
        (("concept", "learn", "x", text_file), EXIT_INPUT, "a.jpg"),
        (("concept", "show", "nope"), EXIT_INPUT, "no concept named"),
        (("concept", "remove", "nope"), EXIT_INPUT, "no concept named"),
        (("search", "--concept", "nope", "--no-server"), EXIT_INPUT, "no concept named"),
        (("tag",), EXIT_USAGE, "--labels"),
        (("tag", "--labels", "cifar10", "--train"), EXIT_INPUT, "--shots"),
        (("search", "--min-relevance", "2", "x", "--no-server"), EXIT_USAGE, "min-relevance"),
    ]
    for args, code, message in cases:
        result = clipfind(*args, "-L", lib)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, (args, result.output)
    sql(lib, "UPDATE concepts SET fingerprint = 'another' WHERE name = 'dup'", setup["db"])
    other = clipfind("search", "--concept", "dup", "-L", lib, "--no-server")
    assert other.exit_code == EXIT_LIBRARY and "other weights" in other.output
    listed = clipfind("concept", "list", "-L", lib)
    assert "another model" in listed.stdout
    assert clipfind("concept", "remove", "dup", "-L", lib).exit_code == 0
