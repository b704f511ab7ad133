"""Schema migrations keep a user's library: a database made at any earlier revision upgrades to head
with every row intact, and still answers queries.

How a library "made by the previous schema" is made: a real library is indexed (and tagged)
with today's code; a fresh database is migrated only up to the older revision; the rows are
copied into it, column by column where the old schema has the column. Opening that database
with today's clipfind must upgrade it and lose nothing.
"""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import MetaData, Table, create_engine, inspect

from retrieval import cli
from retrieval.media import synthetic
from retrieval.store.library import DB_NAME, Library
from tests.pg_server import PASSWORD

TABLES_IN_ORDER = ("meta", "runs", "images", "errors", "tag_runs", "tags")  # parents before children


def alembic_config(connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("retrieval.migrations")))
    config.attributes["connection"] = connection
    return config


def revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config(None))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def run(*args) -> str:
    """The command's stdout (notices such as a first ONNX export go to stderr)."""
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def current_library(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("migrate")
    photos = root / "photos"
    synthetic.write_collection(photos, per_class=1, seed=9, labels=synthetic.LABELS[:4])
    lib = root / "lib"
    run("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "0")
    labels = root / "labels.txt"
    labels.write_text("red circle\nblue square\n")
    run("tag", "-L", lib, "--labels", labels)
    return lib


def rows(db: Path, table: str, columns: list[str]) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid").fetchall()


def columns_of(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def library_at(revision: str, source: Path, target_dir: Path) -> Path:
    """A library directory whose database stands at `revision`, filled with `source`'s rows."""
    target_dir.mkdir()
    db = target_dir / DB_NAME
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)
    engine.dispose()
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM vector_log")
        for table in TABLES_IN_ORDER:
            shared = [c for c in columns_of(db, table) if c in columns_of(source / DB_NAME, table)]
            values = rows(source / DB_NAME, table, shared)
            marks = ", ".join("?" * len(shared))
            conn.executemany(f"INSERT INTO {table} ({', '.join(shared)}) VALUES ({marks})", values)
    return target_dir


@pytest.mark.parametrize("revision", revisions())
def test_a_library_at_an_older_revision_upgrades_with_its_rows(revision, current_library, tmp_path):
    old = library_at(revision, current_library, tmp_path / "old")
    old_columns = {t: columns_of(old / DB_NAME, t) for t in TABLES_IN_ORDER}
    before = {t: rows(old / DB_NAME, t, old_columns[t]) for t in TABLES_IN_ORDER}
    assert before["images"] and before["tags"]  # the copy holds real rows to lose

    with Library.open(old) as lib:  # upgrades to head
        assert lib.image_count() == len(before["images"])
    head = revisions()[-1]
    with sqlite3.connect(old / DB_NAME) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (head,)
    for table, old_rows in before.items():
        assert rows(old / DB_NAME, table, old_columns[table]) == old_rows, table

    # the upgraded library answers as the original does
    assert (run("search", "a red circle", "-L", old, "-k", "3", "--paths")
            == run("search", "a red circle", "-L", current_library, "-k", "3", "--paths"))


def test_the_light_schema_check_knows_the_newest_migration(tmp_path):
    """`Library.open` skips alembic when the database is at SCHEMA_HEAD: it must be alembic's head,
    or a library one migration behind would never be upgraded."""
    from retrieval.store.library import SCHEMA_HEAD, schema_revision

    assert SCHEMA_HEAD == ScriptDirectory.from_config(alembic_config(None)).get_current_head()
    with Library.open(tmp_path / "lib") as library:
        assert schema_revision(library.engine) == SCHEMA_HEAD


def test_opening_a_current_library_imports_no_alembic(tmp_path):
    import subprocess
    import sys

    Library.open(tmp_path / "lib").close()
    code = ("import sys; from retrieval.store.library import Library; "
            f"Library.open({str(tmp_path / 'lib')!r}, create=False).close(); "
            "print('alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- PostgreSQL: the same promise for a library kept in PostgreSQL --------------------------------
@pytest.fixture(scope="module")
def current_pg_library(tmp_path_factory, tiny_model_dir, pg_server) -> tuple[Path, str]:
    """A library indexed and tagged into PostgreSQL through the CLI's --db."""
    root = tmp_path_factory.mktemp("migrate-pg")
    photos = root / "photos"
    synthetic.write_collection(photos, per_class=1, seed=9, labels=synthetic.LABELS[:4])
    lib, url = root / "lib", pg_server.database()
    run("index", photos, "-L", lib, "--db", url, "--model-dir", tiny_model_dir, "--workers", "0")
    labels = root / "labels.txt"
    labels.write_text("red circle\nblue square\n")
    with pytest.MonkeyPatch.context() as mp:  # no --db: the folder remembers the database,
        mp.setenv("PGPASSWORD", PASSWORD)     # but not its password
        run("tag", "-L", lib, "--labels", labels)
    return lib, url


def pg_rows(engine, table: str, columns: list[str]) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}")]


def pg_columns(engine, table: str) -> list[str]:
    return [c["name"] for c in inspect(engine).get_columns(table)]


@pytest.mark.postgres
@pytest.mark.parametrize("revision", revisions())
def test_a_postgres_library_at_an_older_revision_upgrades_with_its_rows(
        revision, current_pg_library, pg_server, tmp_path, monkeypatch):
    source_dir, source_url = current_pg_library
    old_url = pg_server.database()
    source, old = create_engine(source_url), create_engine(old_url)
    with old.begin() as conn:
        command.upgrade(alembic_config(conn), revision)
    with old.begin() as conn:
        for table in TABLES_IN_ORDER:
            shared = [c for c in pg_columns(old, table) if c in pg_columns(source, table)]
            values = [dict(zip(shared, r)) for r in pg_rows(source, table, shared)]
            if values:
                conn.execute(Table(table, MetaData(), autoload_with=conn).insert(), values)
    old_columns = {t: pg_columns(old, t) for t in TABLES_IN_ORDER}
    before = {t: pg_rows(old, t, old_columns[t]) for t in TABLES_IN_ORDER}
    assert before["images"] and before["tags"]

    with Library.open(tmp_path / "old", db=old_url) as lib:  # upgrades to head
        assert lib.image_count() == len(before["images"])
    with old.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == revisions()[-1]
    for table, old_rows in before.items():
        assert pg_rows(old, table, old_columns[table]) == old_rows, table
    source.dispose()
    old.dispose()
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    assert (run("search", "a red circle", "-L", tmp_path / "old", "-k", "3", "--paths")
            == run("search", "a red circle", "-L", source_dir, "-k", "3", "--paths"))
