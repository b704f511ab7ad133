"""`clipfind index | status | verify | remove | reindex` end to end through click."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from retrieval.errors import EXIT_INPUT, EXIT_LIBRARY, EXIT_MODEL, EXIT_VERIFY
from retrieval.media import synthetic
from tests.cli_runner import clipfind


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    synthetic.write_collection(root, per_class=2, seed=21, labels=synthetic.LABELS[:4])
    return root


@pytest.fixture
def lib(tmp_path, store):
    """A library folder; every test here runs on both stores (PostgreSQL through $CLIPFIND_DB)."""
    return str(tmp_path / "lib")


def last_json(result) -> dict:
    return json.loads([ln for ln in result.output.splitlines() if ln.startswith("{")][-1])


def test_index_status_verify_remove_reindex(photos, lib, tiny_model_dir):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 half a photo")
    result = clipfind("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "1", "-v")
    assert result.exit_code == 0, result.output
    assert "indexed 8" in result.output and "skipped 1 files: 1 corrupt" in result.output
    assert f"corrupt     {photos / 'broken.jpg'}" in result.output

    status = last_json(clipfind("status", "-L", lib, "--json"))
    assert status["images"] == 8 and status["index"] == {**status["index"], "type": "Flat", "vectors": 8}
    assert status["model"].startswith("model dir") and status["embed_dim"] > 0
    assert list(status["vectors_by_precision"].values()) == [8] and status["skipped_last_index_run"] == 1
    assert status["size_bytes"]["database"] > 0 and status["size_bytes"]["index"] > 0
    text = clipfind("status", "-L", lib).output
    assert "images:    8" in text and "Flat, 8 vectors" in text and " on cpu]" in text

    result = clipfind("verify", "-L", lib)
    assert result.exit_code == 0 and result.output.rstrip().endswith("ok")

    folder = photos / synthetic.label_dirname(synthetic.LABELS[0])
    result = clipfind("remove", folder, "-L", lib, "--dry-run", "--json")
    assert last_json(result) == {**last_json(result), "matched": 2, "removed": 0}
    assert "removed 2 images" in clipfind("remove", folder, "-L", lib).output
    assert "nothing removed" in clipfind("remove", folder, "-L", lib).output

    result = clipfind("reindex", "-L", lib, "--index-type", "IVF2,Flat", "--json")
    assert result.exit_code == 0 and last_json(result) == {**last_json(result), "index_type": "IVF2,Flat",
                                                          "vectors": 6}
    verify = clipfind("verify", "-L", lib, "--json")
    assert verify.exit_code == 0 and last_json(verify)["checked"]["index_type"] == "IVF2,Flat"


def test_rerun_json_and_dry_run(photos, lib, tiny_model_dir):
    first = last_json(clipfind("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--json"))
    assert first["encoded"] == 8 and first["status"] == "done" and first["skipped_files"] == []
    shutil.copyfile(next(photos.rglob("*.jpg")), photos / "again.jpg")
    dry = clipfind("index", photos, "-L", lib, "--dry-run", "-v")
    assert "dry run, nothing changed" in dry.output and f"duplicate {photos / 'again.jpg'}" in dry.output
    second = last_json(clipfind("index", photos, "-L", lib, "--json"))  # no model flags: the recorded one
    assert (second["encoded"], second["duplicates"], second["unchanged"]) == (0, 1, 8)


def test_user_mistakes_are_one_line_with_their_exit_code(photos, lib, tmp_path, tiny_model_dir):
    result = clipfind("index", photos, "-L", lib)
    assert result.exit_code == EXIT_MODEL and "no model given" in result.output
    result = clipfind("index", tmp_path / "nope", "-L", lib, "--model-dir", tiny_model_dir)
    assert result.exit_code == EXIT_INPUT and "no such file or folder" in result.output
    assert not os.path.exists(lib)  # neither mistake left a library behind
    result = clipfind("status", "-L", tmp_path / "never-made")
    assert result.exit_code == EXIT_LIBRARY and "no library" in result.output
    assert not (tmp_path / "never-made").exists()

    dry = clipfind("index", photos, "-L", tmp_path / "new-lib", "--model-dir", tiny_model_dir, "--dry-run")
    assert dry.exit_code == 0 and "8 to encode" in dry.output and not (tmp_path / "new-lib").exists()

    assert clipfind("index", photos, "-L", lib, "--model-dir", tiny_model_dir).exit_code == 0
    result = clipfind("index", photos, "-L", lib, "--model", "ViT-B-32", "--random-weights")
    assert result.exit_code == EXIT_LIBRARY and "was made with" in result.output
    result = clipfind("reindex", "-L", lib, "--index-type", "Bogus12")
    assert result.exit_code == EXIT_INPUT and "not a FAISS index factory string" in result.output
    result = clipfind("index", photos, "-L", lib, "--index-type", "Bogus12")
    assert result.exit_code == EXIT_INPUT


def test_verify_reports_missing_files_with_exit_6(photos, lib, tiny_model_dir):
    clipfind("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "0")
    gone = sorted(photos.rglob("*.jpg"))[0]
    os.remove(gone)
    result = clipfind("verify", "-L", lib)
    assert result.exit_code == EXIT_VERIFY
    assert "1 indexed files are no longer on disk" in result.output and f"missing {gone}" in result.output
    report = last_json(clipfind("verify", "-L", lib, "--json"))
    assert not report["ok"] and report["missing_files"] == [str(gone)]
    assert clipfind("verify", "-L", lib, "--no-files").exit_code == 0
    assert clipfind("index", photos, "-L", lib).exit_code == 0  # the re-run removes its row
    assert clipfind("verify", "-L", lib).exit_code == 0


def test_non_utf8_names_print_and_serialise(tmp_path, lib, tiny_model_dir):
    photos = tmp_path / "photos"
    synthetic.write_collection(photos, per_class=1, seed=4, labels=synthetic.LABELS[:1])
    odd = os.path.join(os.fsencode(photos), b"bad-\xff.jpg")
    with open(odd, "wb") as fh:
        fh.write(b"not an image")
    result = clipfind("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--json")
    assert result.exit_code == 0
    assert last_json(result)["skipped_files"][0]["path"].endswith("bad-\\xff.jpg")
    assert "bad-\\xff.jpg" in clipfind("index", photos, "-L", lib, "-v").output
