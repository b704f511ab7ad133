"""A library whose database has damaged pages, and the backup to restore it from.

The damage is real: a library made by `clipfind index` and `clipfind tag`,
closed, then a few hundred bytes overwritten at the start of several middle
pages of its clipfind.db. Every command must then say so in one line with
exit 4 (verify: a finding, exit 6), and a backup taken before must restore it.

PostgreSQL checks its own pages, so its counterparts (with the `postgres` mark) are a schema
missing a table, column or trigger, the database or the lock's session gone mid-run, and a
folder pointing at a database that holds no library or one from a newer clipfind.
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
from retrieval.store.location import POINTER_NAME
from tests.cli_runner import clipfind
from tests.pg_server import PASSWORD, database_name
from tests.store_sql import scalar, sql

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


# -- PostgreSQL: the server guards its pages; what can still go wrong is the schema clipfind
# made losing a part, the database vanishing mid-run, or a folder pointing at the wrong one --
PG_TABLES = ("images", "runs", "errors", "tag_runs", "tags", "concepts", "vector_log")
WRITERS = [["index", "{photos}", "-q"], ["tag", "--labels", "{labels}", "-q"], ["remove", "{photos}/red_circle"],
           ["reindex", "-q"]]
READERS = [["status"], ["search", "red circle", "--no-server"], ["tags"]]


@pytest.fixture(scope="module")
def pg_made(tmp_path_factory, tiny_model_dir, pg_server) -> dict:
    """A tagged library in PostgreSQL (copied per test as a template)."""
    base = tmp_path_factory.mktemp("pg-damage")
    photos = base / "photos"
    synthetic.write_collection(photos, per_class=2, seed=77)
    (base / "labels.txt").write_text("red circle\nblue square\n")
    url = pg_server.database()
    for args in (["index", photos, "--model-dir", tiny_model_dir, "--workers", "0", "-q", "--db", url],
                 ["tag", "--labels", base / "labels.txt", "-q", "--db", url]):
        out = clipfind(*args, "-L", base / "lib")
        assert out.exit_code == 0, out.output
    return {"base": base, "photos": photos, "labels": base / "labels.txt", "url": url}


def pg_counts(url: str) -> dict[str, int]:
    return {table: scalar(None, f"SELECT count(*) FROM {table}", url) for table in PG_TABLES
            if scalar(None, f"SELECT to_regclass('{table}') IS NOT NULL", url)}


def filled(args: list[str], made: dict) -> list[str]:
    return [a.format(photos=made["photos"], labels=made["labels"]) for a in args]


@pytest.mark.postgres
@pytest.mark.parametrize("damage", [
    "DROP TABLE tags",
    "ALTER TABLE images DROP COLUMN embedding CASCADE",
    "DROP TRIGGER images_vector_add ON images",
    "DROP TABLE meta",
], ids=["table", "column", "trigger", "meta"])
def test_a_postgres_schema_missing_a_part_is_damage(pg_made, pg_server, tmp_path, monkeypatch, damage):
    """Writers refuse before writing (their check under the lock), verify reports a finding
    (exit 6), readers answer or refuse in one line: never a traceback."""
    url = pg_server.database(template=database_name(pg_made["url"]))
    monkeypatch.setenv("CLIPFIND_DB", url)
    sql(None, damage, url)
    before = pg_counts(url)
    lib = tmp_path / "lib"
    for args in WRITERS:
        out = clipfind(*filled(args, pg_made), "-L", lib)
        assert out.exit_code == EXIT_LIBRARY, (args, out.output)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {DAMAGED}") and "pg_dump" in lines[0], out.stderr
        assert pg_counts(url) == before, args
    out = clipfind("verify", "-L", lib, "--json")
    assert out.exit_code == EXIT_VERIFY, out.output
    assert json.loads(out.stdout)["problems"][0].startswith(DAMAGED)
    for args in READERS:
        out = clipfind(*args, "-L", lib)
        assert out.exit_code in (0, EXIT_LIBRARY), (args, out.output)
        if out.exit_code:
            assert out.stderr.startswith(f"error: {DAMAGED}") and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.postgres
def test_a_folder_pointing_at_a_database_without_a_library_or_a_newer_one(pg_made, pg_server, tmp_path,
                                                                        monkeypatch):
    """database.json names an empty database (a wrong name, a database re-made): every command
    says there is no library and makes no tables; one from a newer clipfind is refused untouched."""
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    monkeypatch.delenv("CLIPFIND_DB", raising=False)
    empty = pg_server.database()
    newer = pg_server.database(template=database_name(pg_made["url"]))
    sql(None, "UPDATE alembic_version SET version_num = '9999_future'", newer)
    for url, words in ((empty, "no library in"), (newer, "newer than this clipfind knows")):
        lib = tmp_path / database_name(url)
        lib.mkdir()
        (lib / POINTER_NAME).write_text(json.dumps({"url": url.replace(f":{PASSWORD}@", "@")}))
        for args in [*READERS, ["verify"], ["tag", "--labels", str(pg_made["labels"])]]:
            out = clipfind(*args, "-L", lib)
            assert out.exit_code == EXIT_LIBRARY, (args, out.output)
            assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert scalar(None, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", empty) == 0
    assert scalar(None, "SELECT version_num FROM alembic_version", newer) == "9999_future"


@pytest.mark.postgres
@pytest.mark.parametrize("fault", ["lock session ended", "database dropped"])
def test_postgres_going_away_mid_run_is_one_line_and_keeps_whole_batches(pg_made, pg_server, tmp_path,
                                                                         tiny_model_dir, monkeypatch, fault):
    """A real `clipfind index` child, slowed per batch. `lock session ended`: an administrator (or a
    restart, or the network) ends the session holding the write lock; the writer must stop at its
    next commit instead of writing on unlocked. `database dropped`: DROP DATABASE ... WITH (FORCE).
    Either way: one line, exit 4, whole batches only, no FAISS temp file left, and (lock) a re-run
    resumes to every photo exactly once."""
    from tests.test_index_faults import index_args, spawn, wait_for

    url = pg_server.database()
    monkeypatch.setenv("CLIPFIND_DB", url)
    lib = tmp_path / "lib"

    def images() -> int:
        try:
            return scalar(None, "SELECT count(*) FROM images", url)
        except Exception:  # noqa: BLE001 - not migrated yet
            return -1

    proc = spawn(index_args(pg_made["photos"], lib, tiny_model_dir), SLOW_BATCH="0.3")
    wait_for(lambda: images() >= 4, proc, timeout=240)
    if fault == "lock session ended":
        ended = sql(None, "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                          "AND granted AND database = (SELECT oid FROM pg_database WHERE datname = "
                          "current_database())", url)
        assert ended == [(True,)]
    else:
        pg_server.admin(f"DROP DATABASE {database_name(url)} WITH (FORCE)")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_LIBRARY, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not list(lib.glob(".index.*.tmp-*"))
    if fault == "database dropped":
        assert lines[0] == f'error: cannot connect to the library database: database "{database_name(url)}" ' \
                           'does not exist'
        out = clipfind("status", "-L", lib)
        assert out.exit_code == EXIT_LIBRARY and "does not exist" in out.stderr
        return
    assert lines[0].startswith("error: lost the library's write lock")
    committed = images()
    total = len(list(pg_made["photos"].rglob("*.jpg")))
    assert 4 <= committed < total and committed % 4 == 0  # whole batches, and it stopped
    out = clipfind("index", pg_made["photos"], "-L", lib, "--workers", "0", "-q", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.splitlines()[-1])["encoded"] == total - committed
    assert scalar(None, "SELECT count(DISTINCT path) FROM images", url) == images() == total
    assert [r[0] for r in sql(None, "SELECT status FROM runs ORDER BY id", url)] == ["interrupted", "done"]
