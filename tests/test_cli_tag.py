"""`clipfind tag | tags | eval | prompts generate` end to end through click.

The library is built with `clipfind index` on each store (SQLite; PostgreSQL with the `postgres`
mark: `index --db URL` once, then each test's copy of the database in $CLIPFIND_DB); exported tags
are checked against scores recomputed with numpy from the vectors plain SQL reads out of it.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval import cli
from retrieval.errors import EXIT_FAILURE, EXIT_INPUT, EXIT_LIBRARY
from retrieval.media import synthetic
from retrieval.model.encoder import Encoder, ModelSpec
from tests.pg_server import PASSWORD
from tests.store_sql import scalar, sql
from tests.test_cupl import ChatServer


def clipfind(*args, ok: bool = True):
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Photos and labels (the tests that need no library use only these, on one store)."""
    root = tmp_path_factory.mktemp("cli_tag")
    synthetic.write_collection(root / "photos", per_class=4, seed=41)
    (root / "animals.txt").write_text("\n".join(synthetic.LABELS) + "\n")
    return root


@pytest.fixture(scope="module")
def built(made, tmp_path_factory, tiny_model_dir, module_store) -> tuple[Path, str | None]:
    """(the indexed library's folder, its PostgreSQL URL or None)."""
    lib = tmp_path_factory.mktemp("cli_tag_lib") / "lib"
    db = ["--db", module_store] if module_store else []
    clipfind("index", made / "photos", "-L", lib, *db, "--model-dir", tiny_model_dir, "-q", "--workers", "0")
    with pytest.MonkeyPatch.context() as mp:  # a folder remembers its database, not the password
        mp.setenv("PGPASSWORD", PASSWORD)
        yield lib, module_store


@pytest.fixture
def lib(built, tmp_path, copy_store) -> Path:
    shutil.copytree(built[0], tmp_path / "lib")
    copy_store(built[1])
    return tmp_path / "lib"


def test_tag_then_export_equals_numpy(lib, made, tiny_model_dir):
    out = clipfind("tag", "-L", lib, "--labels", made / "animals.txt", "--top-k", "2", "--json")
    result = json.loads(out.stdout)
    assert (result["name"], result["images"], result["tags"]) == ("animals", 48, 96)
    exported = list(csv.DictReader(io.StringIO(clipfind("tags", "-L", lib, "--csv").stdout)))
    assert len(exported) == 96 and set(exported[0]) == {"run", "image_id", "path", "label", "score", "rank"}
    lines = [json.loads(line) for line in clipfind("tags", "-L", lib, "--json").stdout.splitlines()]
    assert [(r["image_id"], r["label"], r["score"]) for r in lines] == \
        [(int(r["image_id"]), r["label"], float(r["score"])) for r in exported]
    # Independent: vectors via plain SQL, prompts encoded one by one, softmax in numpy.
    vectors = {i: np.frombuffer(b, np.float32) for i, b in sql(lib, "SELECT id, embedding FROM images")}
    encoder = Encoder(ModelSpec(model_dir=str(tiny_model_dir)), precision="fp32")
    classes = np.stack([encoder.encode_texts([f"a photo of a {label}."])[0] for label in synthetic.LABELS])
    scale = float(encoder.model.logit_scale.detach().exp())
    for row in exported:
        logits = scale * classes.astype(np.float64) @ vectors[int(row["image_id"])]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        rank = int(row["rank"])
        assert synthetic.LABELS[np.argsort(-probs)[rank - 1]] == row["label"]
        assert float(row["score"]) == pytest.approx(probs[np.argsort(-probs)[rank - 1]], abs=2e-3)
    correct = [r for r in exported if r["rank"] == "1" and Path(r["path"]).parent.name == r["label"].replace(" ", "_")]
    assert len(correct) > 0.6 * 48
    runs = [json.loads(line) for line in clipfind("tags", "-L", lib, "--runs", "--json").stdout.splitlines()]
    assert [(r["name"], r["tags"], r["strategy"]) for r in runs] == [("animals", 96, "template")]


def test_text_output_filters_and_search_by_tag(lib, made):
    out = clipfind("tag", "-L", lib, "--labels", made / "animals.txt", "--name", "shapes",
                   "--strategy", "ensemble:simple7", "-q")
    assert "tag run 'shapes' (ensemble:simple7, single-label): 48 tags on 48 images" in out.stdout
    listed = clipfind("tags", "-L", lib, "--run", "shapes", "--label", "red circle").stdout.splitlines()
    assert listed and all(line.split("\t")[1] == "red circle" for line in listed)
    tagged = {line.split("\t")[0] for line in listed}
    found = clipfind("search", "a picture", "-L", lib, "--tag", "red circle", "--paths", "-k", "48",
                     "--no-server").stdout.split()
    assert set(found) == tagged
    missing = clipfind("tags", "-L", lib, "--run", "nope", ok=False)
    assert missing.exit_code == EXIT_INPUT and "no tag run named 'nope' (runs: shapes)" in missing.output


def test_multi_label_calibrated_and_shots(lib, made, tmp_path):
    out = json.loads(clipfind("tag", "-L", lib, "--labels", made / "animals.txt", "--multi-label", "--json").stdout)
    assert out["mode"] == "multi-label" and len(out["thresholds"]) == 12 and out["tags"] >= 24
    synthetic.write_collection(tmp_path / "shots", per_class=2, seed=42, labels=synthetic.LABELS[:3])
    out = json.loads(clipfind("tag", "-L", lib, "--labels", made / "animals.txt", "--shots", tmp_path / "shots",
                              "--search-alpha-beta", "--name", "fewshot", "--json").stdout)
    assert out["tags"] == 48
    assert out["notes"] == [f"9 labels have no examples in {tmp_path / 'shots'} and rely on zero-shot alone: "
                            "green circle, green square, green triangle, blue circle, blue square ..."]


@pytest.mark.parametrize("args, code, message", [
    (["--labels", "EMPTY"], EXIT_INPUT, "has no labels"),
    (["--labels", "ANIMALS", "--strategy", "cupl", "--descriptions", "BROKEN"], EXIT_INPUT, "is not valid JSON"),
    (["--labels", "ANIMALS", "--shots", "SHOTS"], EXIT_INPUT, "has no images"),
    (["--labels", "ANIMALS", "--threshold", "0.3", "--calibrate"], EXIT_INPUT, "not both"),
])
def test_bad_input_is_one_line_and_writes_nothing(lib, made, tmp_path, args, code, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "broken.json").write_text("{nope")
    (tmp_path / "shots" / "red_circle").mkdir(parents=True)
    swap = {"EMPTY": tmp_path / "empty.txt", "ANIMALS": made / "animals.txt", "BROKEN": tmp_path / "broken.json",
            "SHOTS": tmp_path / "shots"}
    result = clipfind("tag", "-L", lib, *[swap.get(a, a) for a in args], ok=False)
    assert result.exit_code == code and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert scalar(lib, "SELECT count(*) FROM tag_runs") == 0


def test_tag_needs_an_indexed_library(tmp_path, made):
    result = clipfind("tag", "-L", tmp_path / "none", "--labels", made / "animals.txt", ok=False)
    assert result.exit_code == EXIT_LIBRARY and "no library at" in result.stderr


def test_eval_zeroshot_takes_the_model_from_a_library(made, built):
    data = json.loads(clipfind("eval", "zeroshot", made / "photos", "-L", built[0], "--json", "--workers", "0").stdout)
    assert data["results"][0]["strategy"] == "template" and data["results"][0]["top1"] > 0.5


def test_eval_zeroshot_and_retrieval(made, tiny_model_dir, tmp_path):
    photos = made / "photos"
    table = clipfind("eval", "zeroshot", photos, "--model-dir", tiny_model_dir, "--strategy", "template",
                     "--strategy", "ensemble:simple7", "--workers", "0").stdout
    lines = table.splitlines()
    assert lines[0].startswith("48 images, 12 classes (chance top-1 0.083)")
    assert lines[1].split() == ["strategy", "top-1", "top-5", "images/s", "texts"]
    assert [ln.split()[0] for ln in lines[2:]] == ["template", "ensemble:simple7"]
    (tmp_path / "captions.csv").write_text("".join(f"{photos}/{synthetic.label_dirname(lab)}/0000.jpg,a {lab}.\n"
                                                   for lab in synthetic.LABELS))
    data = json.loads(clipfind("eval", "retrieval", tmp_path / "captions.csv", "--model-dir", tiny_model_dir,
                               "--json").stdout)
    assert data["images"] == 12 and data["recall@10"] >= data["recall@5"] >= data["recall@1"] > 0.3
    nothing = clipfind("eval", "zeroshot", photos, "-L", tmp_path / "nolib", ok=False)
    assert "name a model" in nothing.stderr


def test_prompts_generate_cli(tmp_path, made):
    out = tmp_path / "desc.json"
    with ChatServer() as server:
        result = clipfind("prompts", "generate", "--labels", made / "animals.txt", "--out", out, "--model", "m",
                          "--api-base", server.base, "--per-question", "2", "-q")
    assert "wrote descriptions for 12 labels" in result.stdout and "60 questions asked" in result.stdout
    assert len(json.loads(out.read_text())["red circle"]) == 10
    with ChatServer("garbage") as server:
        bad = clipfind("prompts", "generate", "--labels", made / "animals.txt", "--out", tmp_path / "x.json",
                       "--model", "m", "--api-base", server.base, "--retries", "0", "-q", ok=False)
    assert bad.exit_code == EXIT_FAILURE and "did not return a chat/completions answer" in bad.stderr
    wrong = clipfind("prompts", "generate", "--labels", made / "animals.txt", "--out", tmp_path / "x.json",
                     "--model", "m", "--api-base", "localhost:8000", ok=False)
    assert wrong.exit_code == EXIT_INPUT and "must be an http(s) URL" in wrong.stderr
