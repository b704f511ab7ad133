"""An unchanged `clipfind index FOLDER` answered on the standard library (`retrieval.index.rerun`)
against the full path it stands in for: the same output (table and --json) and the same `runs`
row, nothing heavy imported, and every case it does not cover left to the full path, which
then does what it always did."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import sqlite3
from importlib import resources
from pathlib import Path

import pytest

from retrieval.index import rerun
from retrieval.media import synthetic
from retrieval.store.binding import SCHEMA_HEAD
from retrieval.store.location import DB_NAME
from retrieval.store.vectors import INDEX_FILE, STATE_FILE
from retrieval.store.write_lock import LOCK_NAME
from tests.cli_runner import clipfind, fresh_clipfind

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "onnxruntime", "faiss", "numpy", "sqlalchemy", "alembic", "PIL")


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir) -> Path:
    """Photos (one of them a broken JPEG, which the first run records as a failure) indexed by the CLI."""
    base = tmp_path_factory.mktemp("rerun")
    synthetic.write_collection(base / "photos", per_class=2, seed=12)
    (base / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    out = clipfind("index", base / "photos", "-L", base / "lib", "--model-dir", tiny_model_dir, "--workers", "0", "-q")
    assert out.exit_code == 0, out.output
    return base


@pytest.fixture
def copy(made, tmp_path) -> Path:
    """A copy of the library and its photos (same paths inside the copy) for a test to change."""
    shutil.copytree(made / "photos", tmp_path / "photos", copy_function=shutil.copy2)  # mtimes kept
    shutil.copytree(made / "lib", tmp_path / "lib")
    out = clipfind("index", tmp_path / "photos", "-L", tmp_path / "lib", "-q")  # the copy's own rows
    assert out.exit_code == 0, out.output
    return tmp_path


def index(base: Path, *args, fast: bool | None = None, monkeypatch=None):
    """`clipfind index PHOTOS -L LIB ARGS` in-process: (result, whether the fast path answered).
    `fast` False turns the fast path off (the full path's own answer, to compare with)."""
    answered = []
    real = rerun.unchanged_rerun

    def spy(*a, **kw):
        out = real(*a, **kw) if fast is not False else None
        answered.append(out is not None)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rerun, "unchanged_rerun", spy)
        result = clipfind("index", base / "photos", "-L", base / "lib", *args)
    return result, any(answered)


def run_rows(lib: Path, n: int) -> list[tuple]:
    with sqlite3.connect(lib / DB_NAME) as db:
        return db.execute("SELECT id, kind, status, started_at, finished_at, precision, device, stats "
                          "FROM runs ORDER BY id DESC LIMIT ?", (n,)).fetchall()[::-1]


def without_times(text: str) -> str:
    text = re.sub(r'"seconds": [0-9.]+', '"seconds": T', text)
    text = re.sub(r'"run_id": \d+', '"run_id": N', text)
    return re.sub(r"indexed (\d+) in [0-9.]+ s", r"indexed \1 in T s", text)


@pytest.mark.parametrize("args", [[], ["--json"], ["-v"], ["-q"], ["--json", "-v"], ["--follow-symlinks"],
                                  ["--threads", "1", "--workers", "0", "--batch-size", "4", "--wait"]])
def test_an_unchanged_rerun_says_and_records_what_the_full_path_does(copy, args):
    fast, took_fast = index(copy, *args)
    full, took_full = index(copy, *args, fast=False)
    assert took_fast and not took_full
    assert fast.exit_code == full.exit_code == 0, fast.output + full.output
    assert without_times(fast.stdout) == without_times(full.stdout)
    assert without_times(fast.stderr) == without_times(full.stderr)
    if "--json" in args:
        one, two = json.loads(fast.stdout), json.loads(full.stdout)
        assert one["unchanged"] == one["scanned"] - 1 > 0 and one["known_bad"] == 1 and one["faiss"] == "ok"
        assert [s["kind"] for s in one["skipped_files"]] == ["corrupt"]  # the broken JPEG: known, not retried
        assert two["run_id"] == one["run_id"] + 1
    else:
        assert "skipped 1 files: 1 corrupt" in fast.output
    (fid, *frow, fstats), (uid, *urow, ustats) = run_rows(copy / "lib", 2)
    assert frow[:2] == urow[:2] == ["index", "done"] and frow[4:] == urow[4:] == [None, None]
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
    assert all(stamp.match(t) for t in frow[2:4] + urow[2:4]) and frow[2] <= frow[3] <= urow[2]
    fstats, ustats = json.loads(fstats), json.loads(ustats)
    assert fstats.pop("seconds") >= 0 and ustats.pop("seconds") >= 0
    assert list(fstats.items()) == list(ustats.items())  # same keys, same order, same values
    assert not (copy / "lib" / LOCK_NAME).read_text()  # the lock released and emptied, as writers leave it


def test_a_fresh_process_imports_nothing_heavy_and_prints_the_same_json(copy):
    out, heavy = fresh_clipfind("index", str(copy / "photos"), "-L", str(copy / "lib"), "--json", watch=HEAVY)
    assert heavy == []
    full, took = index(copy, "--json", fast=False)
    assert not took and without_times(out.stdout.strip()) == without_times(full.stdout.strip())


# -- what the fast path leaves to the full path -------------------------------------------------------
def stats_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_changed_file_is_encoded_again(copy):
    target = copy / "photos" / "red_circle" / "0000.jpg"
    synthetic.draw(synthetic.LABELS[0], 64, random.Random(99)).save(target, quality=85)  # bytes never seen
    result, took_fast = index(copy, "--json")
    stats = stats_of(result)
    assert not took_fast and stats["encoded"] == 1 and stats["to_encode"] == 1
    again, took_fast = index(copy, "--json")  # and then it is unchanged again
    assert took_fast and stats_of(again)["unchanged"] == stats["scanned"] - 1


def test_an_added_file_is_added(copy):
    shutil.copyfile(copy / "photos" / "red_circle" / "0000.jpg", copy / "photos" / "red_circle" / "extra.jpg")
    result, took_fast = index(copy, "--json")
    stats = stats_of(result)
    assert not took_fast and stats["duplicates"] == 1 and stats["indexed"] == 1


def test_a_removed_file_is_removed(copy):
    (copy / "photos" / "red_circle" / "0000.jpg").unlink()
    result, took_fast = index(copy, "--json")
    assert not took_fast and stats_of(result)["removed"] == 1


def test_a_touched_file_is_touched(copy):
    path = copy / "photos" / "red_circle" / "0000.jpg"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    result, took_fast = index(copy, "--json")
    assert not took_fast and stats_of(result)["touched"] == 1


def test_a_file_the_walk_cannot_use_is_reported(copy):
    os.mkfifo(copy / "photos" / "red_circle" / "pipe.jpg")  # never opened; skipped, and recorded
    result, took_fast = index(copy, "--json")
    assert not took_fast and stats_of(result)["skipped_by_kind"] == {"not_image": 1, "corrupt": 1}


def test_a_pending_migration_is_run(copy):
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{copy / 'lib' / DB_NAME}")
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(resources.files("retrieval.migrations")))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    engine.dispose()
    result, took_fast = index(copy, "--json")
    assert not took_fast and stats_of(result)["faiss"] == "ok"
    with sqlite3.connect(copy / "lib" / DB_NAME) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == SCHEMA_HEAD


def test_an_interrupted_run_is_marked(copy):
    with sqlite3.connect(copy / "lib" / DB_NAME) as db:
        db.execute("INSERT INTO runs (kind, status, started_at, stats) VALUES ('index', 'running', "
                   "'2026-01-01 00:00:00.000000', '{}')")
    result, took_fast = index(copy, "--json")
    assert not took_fast and stats_of(result)["faiss"] == "ok"
    with sqlite3.connect(copy / "lib" / DB_NAME) as db:
        statuses = [r[0] for r in db.execute("SELECT status FROM runs ORDER BY id DESC LIMIT 2")]
    assert statuses == ["done", "interrupted"]


@pytest.mark.parametrize("harm", ["missing", "truncated", "other library", "behind"])
def test_a_faiss_cache_that_does_not_match_is_rebuilt(copy, harm):
    lib = copy / "lib"
    if harm == "missing":
        (lib / INDEX_FILE).unlink()
    elif harm == "truncated":
        data = (lib / INDEX_FILE).read_bytes()
        (lib / INDEX_FILE).write_bytes(data[:len(data) - 40])
    else:
        state = json.loads((lib / STATE_FILE).read_text())
        if harm == "other library":
            state["library_id"] = "0" * 32
        else:
            state["watermark"] -= 1
        (lib / STATE_FILE).write_text(json.dumps(state))
    result, took_fast = index(copy, "--json")
    assert not took_fast and stats_of(result)["faiss"] in ("rebuilt", "caught-up")
    again, took_fast = index(copy, "--json")
    assert took_fast and stats_of(again)["faiss"] == "ok"
    search = clipfind("search", "red circle", "-L", lib, "--json", "--no-server", "-k", "3")
    assert search.exit_code == 0 and len(search.stdout.strip().splitlines()) == 3, search.output


def test_a_killed_saves_temp_files_are_removed(copy):
    stale = copy / "lib" / f".{INDEX_FILE}.tmp-12345"
    stale.write_bytes(b"half")
    result, took_fast = index(copy, "--json")
    assert not took_fast and stats_of(result)["faiss"] == "ok" and not stale.exists()


def test_a_missing_onnx_export_is_the_querys_business_either_way(copy):
    """`index` on an existing library does not look at the ONNX export (a query rebuilds it), on
    either path: the fast path answers as the full path does and leaves it to the query."""
    shutil.rmtree(copy / "lib" / "onnx")
    fast, took_fast = index(copy, "--json")
    full, took_full = index(copy, "--json", fast=False)
    assert took_fast and not took_full
    assert without_times(fast.stdout) == without_times(full.stdout)
    assert not (copy / "lib" / "onnx").exists()


def test_a_held_lock_is_the_full_paths_refusal(copy):
    with open(copy / "lib" / LOCK_NAME, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write("pid 999")
        fh.flush()
        result, took_fast = index(copy, "--json")
    assert not took_fast and result.exit_code == 4 and "busy (pid 999)" in result.output


def test_a_damaged_database_is_the_full_paths_refusal(copy):
    from tests.test_damaged_library import damage

    damage(copy / "lib" / DB_NAME)
    result, took_fast = index(copy)
    assert not took_fast and result.exit_code == 4 and "the library database is damaged" in result.output


@pytest.mark.parametrize("args", [["--dry-run"], ["--index-type", "Flat"], ["--file-list", "LIST"]])
def test_options_the_fast_path_does_not_take_go_the_full_way(copy, args):
    (copy / "LIST").write_text(f"{copy / 'photos' / 'red_circle' / '0000.jpg'}\n")
    result, took_fast = index(copy, *[copy / a if a == "LIST" else a for a in args], "--json")
    assert result.exit_code == 0, result.output
    assert not took_fast


def test_the_recorded_model_named_again_is_fine_and_another_one_is_refused(copy, tiny_model_dir):
    same, took_fast = index(copy, "--model-dir", tiny_model_dir, "--json")
    assert took_fast and stats_of(same)["encoded"] == 0
    other, took_fast = index(copy, "--model", "ViT-B-32", "--random-weights")
    assert not took_fast and other.exit_code == 4 and "this library was made with" in other.output


def test_a_flat_index_past_the_exact_limit_is_left_to_the_full_path(copy, monkeypatch):
    monkeypatch.setattr(rerun, "EXACT_LIMIT", 5)  # the full path would rebuild it as an IVF index
    assert rerun.unchanged_rerun(copy / "lib", [str(copy / "photos")]) is None
    monkeypatch.undo()
    assert rerun.unchanged_rerun(copy / "lib", [str(copy / "photos")]) is not None


def test_postgres_is_left_to_the_full_path(copy, monkeypatch):
    monkeypatch.setenv("CLIPFIND_DB", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert rerun.unchanged_rerun(copy / "lib", [str(copy / "photos")]) is None
    (copy / "lib" / "database.json").write_text('{"url": "postgresql+psycopg://nobody@127.0.0.1:1/none"}')
    monkeypatch.delenv("CLIPFIND_DB")
    assert rerun.unchanged_rerun(copy / "lib", [str(copy / "photos")]) is None


def test_a_folder_of_only_known_failures_is_still_exit_1(copy):
    only = copy / "only"
    only.mkdir()
    shutil.copy2(copy / "photos" / "broken.jpg", only / "broken.jpg")
    first = clipfind("index", only, "-L", copy / "lib", "--json")
    assert first.exit_code == 1, first.output  # recorded as a failure
    answered = []
    real = rerun.unchanged_rerun
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rerun, "unchanged_rerun", lambda *a, **kw: answered.append(real(*a, **kw)) or answered[-1])
        again = clipfind("index", only, "-L", copy / "lib", "--json")
    assert answered[-1] is not None and again.exit_code == 1
    assert "nothing could be indexed: 1 files skipped (1 corrupt)" in again.output
