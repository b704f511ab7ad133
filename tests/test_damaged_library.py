"""A library whose database has damaged pages, and the backup to restore it from.

The damage is real: a library made by `clipfind index` and `clipfind tag`,
closed, then a few hundred bytes overwritten at the start of several middle
pages of its clipfind.db. Every command must then say so in one line with
exit 4 (verify: a finding, exit 6), and a backup taken before must restore it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from retrieval.errors import EXIT_LIBRARY, EXIT_VERIFY
from retrieval.media import synthetic
from retrieval.store.integrity import DamagedDatabase, library_error_for
from retrieval.store.library import DB_NAME
from tests.cli_runner import clipfind

DAMAGED = "the library database is damaged:"


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir) -> dict:
    """A tagged library and a backup of it, both made by the CLI."""
    base = tmp_path_factory.mktemp("damage")
    photos = base / "photos"
    synthetic.write_collection(photos, per_class=6, seed=77)
    (base / "labels.txt").write_text("red circle\nblue square\ngreen triangle\n")
    lib = base / "lib"
    out = clipfind("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "0", "-q")
    assert out.exit_code == 0, out.output
    out = clipfind("tag", "-L", lib, "--labels", base / "labels.txt", "-q")
    assert out.exit_code == 0, out.output
    out = clipfind("backup", base / "backup", "-L", lib, "--json")
    assert out.exit_code == 0, out.output
    return {"base": base, "photos": photos, "lib": lib, "backup": base / "backup",
            "backup_info": json.loads(out.stdout), "labels": base / "labels.txt"}


def damage(db: Path, pages: int = 6, nbytes: int = 300) -> None:
    """Overwrite the first `nbytes` of `pages` pages around the middle of a closed database."""
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    count = os.path.getsize(db) // page_size
    assert count >= pages + 4, f"database too small to damage in the middle ({count} pages)"
    first = count // 2 - pages // 2
    with open(db, "r+b") as fh:
        for page in range(first, first + pages):
            fh.seek(page * page_size)
            fh.write(bytes([0xA5]) * nbytes)


@pytest.fixture
def damaged_lib(made, tmp_path) -> Path:
    lib = tmp_path / "lib"
    shutil.copytree(made["lib"], lib)
    assert not Path(f"{lib / DB_NAME}-wal").exists() or os.path.getsize(f"{lib / DB_NAME}-wal") == 0
    damage(lib / DB_NAME)
    return lib


def test_backup_holds_a_checked_copy_and_the_faiss_files(made):
    info, backup = made["backup_info"], made["backup"]
    assert sorted(os.listdir(backup)) == sorted([DB_NAME, "index.faiss", "index.json"])
    assert info["images"] == 72 and info["index_files"] == ["index.faiss", "index.json"]
    with sqlite3.connect(backup / DB_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 72
    assert not [n for n in os.listdir(made["base"]) if n.startswith(".backup.tmp")]


def test_backup_refuses_an_existing_destination(made):
    out = clipfind("backup", made["backup"], "-L", made["lib"])
    assert out.exit_code == EXIT_LIBRARY and "already exists" in out.stderr


@pytest.mark.parametrize("args", [
    ["status"],
    ["index", "{photos}", "-q"],
    ["tag", "--labels", "{labels}", "-q"],
    ["reindex", "-q"],
    ["remove", "{photos}/red_circle"],
    ["search", "red circle", "--no-server"],
    ["similar", "{photos}/red_circle/0000.jpg", "--no-server"],
    ["tags"],
    ["backup", "{base}/second-backup"],
], ids=lambda a: a[0])
def test_every_command_refuses_a_damaged_database_in_one_line(made, damaged_lib, args):
    filled = [a.format(photos=made["photos"], labels=made["labels"], base=damaged_lib.parent)
              for a in args]
    out = clipfind(*filled, "-L", damaged_lib)
    assert out.exit_code == EXIT_LIBRARY, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {DAMAGED}"), out.stderr
    assert "clipfind verify" in lines[0] and "backup" in lines[0]
    assert not (damaged_lib.parent / "second-backup").exists()


def test_verify_reports_damage_as_a_finding(damaged_lib):
    out = clipfind("verify", "-L", damaged_lib, "--json")
    assert out.exit_code == EXIT_VERIFY, out.output
    report = json.loads(out.stdout)
    assert not report["ok"] and report["problems"][0].startswith(DAMAGED)


def test_verify_reports_a_destroyed_schema_as_a_finding(made, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(made["lib"], lib)
    with open(lib / DB_NAME, "r+b") as fh:  # page 1 holds the schema: nothing can be read
        fh.seek(100)
        fh.write(b"\xff" * 400)
    out = clipfind("verify", "-L", lib)
    assert out.exit_code == EXIT_VERIFY, out.output
    assert DAMAGED in out.stdout


def test_restoring_the_backup_makes_a_sound_library_again(made, damaged_lib):
    shutil.rmtree(damaged_lib)  # the library folder is replaced by the backup's files
    damaged_lib.mkdir()  # (derived files such as the ONNX export are rebuilt on demand)
    for name in os.listdir(made["backup"]):
        shutil.copyfile(made["backup"] / name, damaged_lib / name)
    out = clipfind("verify", "-L", damaged_lib)
    assert out.exit_code == 0, out.output
    out = clipfind("search", "red circle", "-L", damaged_lib, "--no-server", "--json", "-k", "3")
    assert out.exit_code == 0 and len(out.stdout.splitlines()) == 3


def test_damage_met_while_reading_is_the_same_one_line():
    """Above READ_CHECK_LIMIT readers do not check first; what they meet maps the same way."""
    known = library_error_for(sqlite3.DatabaseError("database disk image is malformed"))
    assert isinstance(known, DamagedDatabase) and known.exit_code == EXIT_LIBRARY
    assert library_error_for(sqlite3.OperationalError("no such table: x")) is None
    assert library_error_for(ValueError("x")) is None
