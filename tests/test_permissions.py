"""Libraries a user may read but not write, run as a user that file modes apply to.

A read-only library (a shared copy, a snapshot) must answer status, search,
similar and tags; every command that would write must refuse in one line with
exit 4, whether the folder, the database or only `write.lock` is read-only.
As root the CLI runs as the system user `clipfind-test` (see tests/nonroot.py).
On PostgreSQL the same promise holds for a database role granted SELECT only.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from retrieval.errors import EXIT_LIBRARY
from retrieval.facade import Library
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.store.library import DB_NAME, LOCK_NAME
from retrieval.store.postgres import PRIVILEGES_HINT
from tests.cli_runner import clipfind
from tests.nonroot import other_user, shared_tmpdir
from tests.pg_server import PASSWORD, database_name
from tests.pg_server import USER as PG_USER
from tests.store_sql import scalar

READERS = [
    ["status", "--json"],
    ["search", "red circle", "--no-server", "--json", "-k", "3"],
    ["similar", "{photos}/red_circle/0000.jpg", "--no-server", "--json", "-k", "3"],
    ["tags", "--json"],
]
WRITERS = [  # each pays a fresh interpreter and torch import: the kinds of writer, not all of them
    ["index", "{photos}", "-q"],
    ["tag", "--labels", "{labels}", "-q"],
    ["remove", "{photos}/red_circle"],
    ["verify"],
]


@pytest.fixture(scope="module")
def user():
    found, why = other_user()
    if found is None:
        pytest.skip(f"cannot run as a non-root user here: {why}")
    return found


@pytest.fixture(scope="module")
def made(user, tiny_model_dir):
    """Model, photos, labels and a tagged library, in a folder the other user can read."""
    base = shared_tmpdir()
    shutil.copytree(tiny_model_dir, base / "model")
    synthetic.write_collection(base / "photos", per_class=2, seed=61)
    (base / "labels.txt").write_text("red circle\nblue square\n")
    spec = ModelSpec(model_dir=str(base / "model"))
    with Library.open(base / "lib", model=spec) as library:
        index_paths(library, [str(base / "photos")], spec, precision="fp32",
                    options=IndexOptions(workers=0))
        library.tag(str(base / "labels.txt"), encoder=library.encoder())
    for folder, _dirs, files in os.walk(base):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            os.chmod(name, os.stat(name).st_mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
                     | (stat.S_IXOTH | stat.S_IXGRP if os.path.isdir(name) else 0))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def library_copy(made: Path, user, name: str) -> Path:
    lib = made / name
    shutil.copytree(made / "lib", lib)
    user.chown(lib)
    return lib


def filled(args: list[str], made: Path) -> list[str]:
    return [a.format(photos=made / "photos", labels=made / "labels.txt") for a in args]


def assert_one_line_refusal(out, args) -> None:
    assert out.returncode == EXIT_LIBRARY, (args, out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr)
    assert "Traceback" not in out.stderr


def test_a_read_only_library_answers_readers_and_refuses_writers(made, user):
    lib = library_copy(made, user, "readonly")
    for path in [*lib.iterdir(), lib]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = sorted(os.listdir(lib))
    answers = {}
    for args in READERS:
        out = user.run(*filled(args, made), "-L", lib)
        assert out.returncode == 0, (args, out.stderr)
        assert "Traceback" not in out.stderr
        answers[args[0]] = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(answers["search"]) == len(answers["similar"]) == 3
    assert answers["status"][0]["images"] == 24
    assert len(answers["tags"]) == 24 and {t["label"] for t in answers["tags"]} <= {"red circle", "blue square"}
    for args in WRITERS:
        out = user.run(*filled(args, made), "-L", lib)
        assert_one_line_refusal(out, args)
        assert "permission" in out.stderr or "read-only" in out.stderr
    assert sorted(os.listdir(lib)) == before


def test_a_read_only_write_lock_is_one_line(made, user):
    lib = library_copy(made, user, "readonly-lock")
    (lib / LOCK_NAME).touch()
    user.chown(lib)
    (lib / LOCK_NAME).chmod(0o444)
    for args in (WRITERS[0], WRITERS[-1]):
        out = user.run(*filled(args, made), "-L", lib)
        assert_one_line_refusal(out, args)
        assert "write lock" in out.stderr


def test_a_read_only_database_is_one_line_and_still_searchable(made, user):
    lib = library_copy(made, user, "readonly-db")
    (lib / DB_NAME).chmod(0o444)
    for args in (WRITERS[0], WRITERS[2]):
        out = user.run(*filled(args, made), "-L", lib)
        assert_one_line_refusal(out, args)
        assert "permission" in out.stderr or "read-only" in out.stderr
    out = user.run("search", "blue square", "--no-server", "--json", "-k", "2", "-L", lib)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2, out.stderr


# -- PostgreSQL: the counterpart of file modes is the role's privileges -------------------------
PG_WRITERS = [
    ["index", "{photos}", "-q"],
    ["tag", "--labels", "{labels}", "-q"],
    ["remove", "{photos}/red_circle"],
    ["reindex", "-q"],
    ["concept", "learn", "rc", "{photos}/red_circle"],
]
PG_TABLES = ("images", "runs", "errors", "tag_runs", "tags", "concepts", "vector_log", "meta")


def role_url(pg_server, url: str, role: str, grants: list[str]) -> str:
    """`url` as a new login role that holds only `grants` (run by the database's owner)."""
    from sqlalchemy import create_engine, text

    pg_server.admin(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    engine = create_engine(url)
    with engine.begin() as conn:
        for grant in grants:
            conn.execute(text(grant.format(role=role)))
    engine.dispose()
    return as_role(url, role)


def as_role(url: str, role: str) -> str:
    return url.replace(f"{PG_USER}:{PASSWORD}@", f"{role}:pw@")


def counts(url: str) -> dict[str, int]:
    return {table: scalar(None, f"SELECT count(*) FROM {table}", url) for table in PG_TABLES}


@pytest.fixture(scope="module")
def pg_made(tmp_path_factory, tiny_model_dir, pg_server):
    """Photos, labels and a tagged library in PostgreSQL, made by its owner."""
    base = tmp_path_factory.mktemp("pg-perm")
    synthetic.write_collection(base / "photos", per_class=2, seed=61)
    (base / "labels.txt").write_text("red circle\nblue square\n")
    url = pg_server.database()
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(base / "owner", model=spec, db=url) as library:
        index_paths(library, [str(base / "photos")], spec, precision="fp32", options=IndexOptions(workers=0))
        library.tag(str(base / "labels.txt"), encoder=library.encoder())
    return base, url


@pytest.mark.postgres
def test_a_role_that_may_only_read_answers_readers_and_refuses_writers(pg_made, pg_server, monkeypatch):
    """A team member's role with SELECT only, from a folder of its own (another machine's
    caches): the readers answer; every writer refuses in one line (exit 4) and writes nothing."""
    base, url = pg_made
    reader = role_url(pg_server, url, "reader_" + database_name(url), [
        "GRANT USAGE ON SCHEMA public TO {role}", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"])
    monkeypatch.setenv("CLIPFIND_DB", reader)
    before = counts(url)
    lib = base / "reader-folder"
    answers = {}
    for args in READERS:
        out = clipfind(*filled(args, base), "-L", lib)
        assert out.exit_code == 0, (args, out.output)
        answers[args[0]] = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(answers["search"]) == len(answers["similar"]) == 3
    assert answers["status"][0]["images"] == 24 and len(answers["tags"]) == 24
    for args in PG_WRITERS:
        out = clipfind(*filled(args, base), "-L", lib)
        assert out.exit_code == EXIT_LIBRARY, (args, out.output)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the database refused: permission denied"), \
            (args, out.stderr)
        assert "INSERT, UPDATE and DELETE" in lines[0]
        assert counts(url) == before, args  # nothing half-written


@pytest.mark.postgres
def test_a_role_without_privileges_is_one_line_and_makes_nothing(pg_made, pg_server, tmp_path, monkeypatch,
                                                                 tiny_model_dir):
    base, url = pg_made
    nobody = role_url(pg_server, url, "nobody_" + database_name(url), [])
    monkeypatch.setenv("CLIPFIND_DB", nobody)
    for args in (["status"], ["search", "red circle", "--no-server"]):
        out = clipfind(*args, "-L", tmp_path / "folder")
        assert out.exit_code == EXIT_LIBRARY, (args, out.output)
        assert out.stderr.startswith("error: the database refused: permission denied for table") and \
            len(out.stderr.strip().splitlines()) == 1, out.stderr
    # a new library in a database where this role may not create tables: no folder, no tables
    empty = pg_server.database()
    monkeypatch.setenv("CLIPFIND_DB", as_role(empty, f"nobody_{database_name(url)}"))
    out = clipfind("index", base / "photos", "-L", tmp_path / "new", "--model-dir", tiny_model_dir, "-q")
    assert out.exit_code == EXIT_LIBRARY, out.output
    assert out.stderr.strip() == (f"error: the database refused: permission denied for schema public "
                                  f"({PRIVILEGES_HINT})")
    assert not (tmp_path / "new").exists()
    assert scalar(None, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", empty) == 0
