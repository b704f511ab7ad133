"""Library directories: create, reopen, model binding, migrations, bad paths, the FAISS cache."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from retrieval.config import library_home
from retrieval.errors import LibraryError
from retrieval.model.encoder import ModelSpec
from retrieval.store.library import DB_NAME, Library, migrate
from retrieval.store.schema import Image, Run, vector_to_blob
from retrieval.store.vectors import VectorIndex
from tests.pg_server import PASSWORD


@pytest.fixture(scope="module")
def tiny_spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec(model_dir=str(tiny_model_dir))


def _add_rows(library: Library, vectors: np.ndarray, prefix: str = "/photos") -> None:
    with library.session() as s, s.begin():
        for i, vec in enumerate(vectors):
            s.add(Image(path=f"{prefix}/{i}.jpg", size=1, mtime_ns=1, content_hash=f"{prefix}{i}",
                        embedding=vector_to_blob(vec)))


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_default_path_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPFIND_HOME", str(tmp_path / "home"))
    assert library_home() == tmp_path / "home"
    monkeypatch.delenv("CLIPFIND_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert library_home() == tmp_path / "xdg" / "clipfind"


def test_create_records_model_and_reopen_checks_it(tmp_path, tiny_spec, store):
    root = tmp_path / "lib"
    with Library.open(root, model=tiny_spec) as lib:
        encoder = lib.encoder(tiny_spec)
        record = lib.model_record
        assert record["fingerprint"] == encoder.fingerprint
        assert record["embed_dim"] == encoder.embed_dim
        assert record["spec"]["model_dir"] == tiny_spec.model_dir
        assert "Resize" in record["preprocess"]
    if store is None:
        assert (root / DB_NAME).is_file()
        with sqlite3.connect(root / DB_NAME) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    else:  # the folder keeps the caches and remembers the database, not its password
        assert not (root / DB_NAME).exists()
        assert PASSWORD not in (root / "database.json").read_text()
    with Library.open(root) as lib:  # no spec: the recorded model is used
        assert lib.encoder().fingerprint == record["fingerprint"]
    other = ModelSpec(model="ViT-B-32", random_weights=True)
    with pytest.raises(LibraryError, match="made with model dir"):
        Library.open(root, model=other)


def test_same_spec_other_weights_is_refused(tmp_path, tiny_spec, store):
    with Library.open(tmp_path / "lib", model=tiny_spec) as lib:
        lib.encoder(tiny_spec)
        lib.set_meta("model", {**lib.model_record, "fingerprint": "something-else"})
    with Library.open(tmp_path / "lib") as lib, pytest.raises(LibraryError, match="not the weights"):
        lib.encoder()


def test_library_without_model_says_index_first(tmp_path, store, request):
    with Library.open(tmp_path / "lib") as lib, pytest.raises(LibraryError, match="is empty: run `clipfind index"):
        lib.encoder()
    empty = request.getfixturevalue("pg_server").database() if store else None
    with pytest.raises(LibraryError, match="no library"):
        Library.open(tmp_path / "absent", create=False, db=empty)
    assert not (tmp_path / "absent").exists()
    if empty:  # a read-only command made nothing in the empty database either
        with create_engine(empty).connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar_one() == 0


def test_migrations_run_on_an_empty_file(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    (root / DB_NAME).write_bytes(b"")
    with Library.open(root) as lib, lib.engine.connect() as conn:
        tables = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert {"images", "runs", "errors", "vector_log", "tags", "tag_runs", "meta", "concepts"} <= tables
    assert version == _head_revision()


def _head_revision() -> str:
    from importlib import resources

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(resources.files("retrieval.migrations")))
    return ScriptDirectory.from_config(config).get_current_head()


def test_newer_schema_is_refused_and_left_alone(tmp_path, store):
    root = tmp_path / "lib"
    with Library.open(root) as lib, lib.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(LibraryError, match="newer than this clipfind"):
        Library.open(root)
    engine = create_engine(store or f"sqlite:///{root / DB_NAME}")
    with engine.connect() as conn:  # nothing deleted or downgraded
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "9999_future"
    engine.dispose()


def test_not_a_database_is_one_clear_error(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    (root / DB_NAME).write_bytes(b"garbage, not sqlite" * 100)
    with pytest.raises(LibraryError, match="cannot use"):
        Library.open(root)


def test_unwritable_path_leaves_nothing_behind(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(LibraryError, match="cannot create a library"):
        Library.open(blocker / "lib")
    assert blocker.read_text() == "x"


def test_migrate_is_idempotent(tmp_path):
    """A second upgrade of an up-to-date database changes nothing: same version, schema and rows."""
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    migrate(engine)

    def state() -> tuple:
        with engine.connect() as conn:
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
            schema = conn.exec_driver_sql("SELECT type, name, sql FROM sqlite_master ORDER BY name").all()
            meta = conn.exec_driver_sql("SELECT key, value FROM meta").all()
        return version, schema, meta

    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO meta (key, value) VALUES ('probe', '1')")
    first = state()
    assert len(first[0]) == 1 and {"images", "runs", "meta", "tags"} <= {row[1] for row in first[1]}
    migrate(engine)
    assert state() == first
    engine.dispose()


def test_vectors_catch_up_after_adds_and_deletes_without_a_save(tmp_path, tiny_spec, store):
    with Library.open(tmp_path / "lib", model=tiny_spec) as lib:
        dim = lib.encoder(tiny_spec).embed_dim
        vecs = _unit(20, dim)
        _add_rows(lib, vecs)
        index = lib.vectors()
        assert index.index.ntotal == 20
        scores, ids = index.search(vecs[3], 1)
        assert ids[0][0] == 4 and scores[0][0] == pytest.approx(1.0, abs=1e-5)
        # a second process adds and deletes rows; the saved index is now stale
        with lib.session() as s, s.begin():
            s.delete(s.get(Image, 4))
        _add_rows(lib, _unit(5, dim, seed=1), prefix="/more")
    with Library.open(tmp_path / "lib") as lib:
        index = lib.vectors()
        assert index.index.ntotal == 24
        assert 4 not in index.search(vecs[3], 24)[1][0]
        assert index.state.watermark == 26  # 20 adds + 1 delete + 5 adds, all covered


def test_a_catch_up_reads_one_state_while_a_writer_commits(tmp_path, tiny_spec, store, monkeypatch):
    """An index run commits batches while a searcher catches up. Before the catch-up read one
    snapshot, the row count ran ahead of the log it had read, and every query rebuilt the index."""
    with Library.open(tmp_path / "lib", model=tiny_spec) as lib:
        dim = lib.encoder(tiny_spec).embed_dim
        _add_rows(lib, _unit(20, dim))
        index = lib.vectors()
        _add_rows(lib, _unit(3, dim, seed=1), prefix="/batch1")
        apply_log = VectorIndex._apply_log

        def a_writer_commits_meanwhile(self, reads, last):
            action = apply_log(self, reads, last)
            _add_rows(lib, _unit(2, dim, seed=2), prefix="/batch2")  # another connection
            return action

        monkeypatch.setattr(VectorIndex, "_apply_log", a_writer_commits_meanwhile)
        assert index.sync(lib, reader=True) == "caught-up"
        assert index.index.ntotal == 23
        monkeypatch.undo()
        assert index.sync(lib, reader=True) == "caught-up"
        assert index.index.ntotal == 25


def test_the_query_paths_sqlite_reads_hold_one_snapshot(tmp_path, tiny_spec):
    """The same snapshot on the stdlib connection a fresh `clipfind search` reads through."""
    from retrieval.store.reads import SqliteReads, connect_sqlite

    with Library.open(tmp_path / "lib", model=tiny_spec) as lib:
        dim = lib.encoder(tiny_spec).embed_dim
        _add_rows(lib, _unit(4, dim))
        reads = SqliteReads(connect_sqlite(tmp_path / "lib" / DB_NAME, readonly=False))
        with reads.snapshot():
            assert reads.scalar("SELECT count(*) FROM images") == 4
            _add_rows(lib, _unit(2, dim, seed=1), prefix="/meanwhile")
            assert reads.scalar("SELECT count(*) FROM images") == 4
        assert reads.scalar("SELECT count(*) FROM images") == 6
        reads.conn.close()


def test_a_searcher_keeps_a_small_catch_up_in_memory_and_a_writer_saves(tmp_path, tiny_spec, store):
    """Rewriting the whole index file on every query cost more than the query while an index
    run was writing; the writer (which then prunes the log) must still save what it covers."""
    with Library.open(tmp_path / "lib", model=tiny_spec) as lib:
        dim = lib.encoder(tiny_spec).embed_dim
        _add_rows(lib, _unit(20, dim))
        index = lib.vectors()

        def saved_watermark() -> int:
            return json.loads(index.state_path.read_text())["watermark"]

        assert saved_watermark() == 20
        _add_rows(lib, _unit(3, dim, seed=1), prefix="/read")
        assert index.sync(lib, reader=True) == "caught-up"
        assert index.index.ntotal == 23 and saved_watermark() == 20
        _add_rows(lib, _unit(2, dim, seed=2), prefix="/write")
        assert index.sync(lib) == "caught-up"
        assert index.index.ntotal == 25 and saved_watermark() == 25


def test_lost_log_entries_force_a_rebuild(tmp_path, tiny_spec, store):
    with Library.open(tmp_path / "lib", model=tiny_spec) as lib:
        dim = lib.encoder(tiny_spec).embed_dim
        _add_rows(lib, _unit(10, dim))
        lib.vectors()
        _add_rows(lib, _unit(3, dim, seed=2), prefix="/late")
        with lib.engine.begin() as conn:  # somebody pruned entries the index never saw
            conn.execute(text("DELETE FROM vector_log"))
    with Library.open(tmp_path / "lib") as lib:
        assert lib.vectors().index.ntotal == 13


def test_write_lock_is_exclusive(tmp_path, store):
    with Library.open(tmp_path / "lib") as lib, lib.write_lock():
        with Library.open(tmp_path / "lib") as other, pytest.raises(LibraryError, match="busy"):
            with other.write_lock():
                pass


def test_run_lifecycle_records_done_failed_interrupted_and_marks_stale_runs(tmp_path, store):
    with Library.open(tmp_path / "lib") as lib:
        killed = lib.start_run("index")  # what a kill -9 leaves: 'running' for ever
        (lib.root / ".index.faiss.tmp-4242").write_bytes(b"half a save")
        with lib.run("reindex") as done:
            done.stats = {"vectors": 3}
        with pytest.raises(ValueError), lib.run("remove") as failed:
            failed.stats = {"removed": 1}
            raise ValueError("boom")
        with pytest.raises(KeyboardInterrupt), lib.run("reembed") as cut:
            raise KeyboardInterrupt
        with lib.session() as s:
            rows = {r.id: (r.kind, r.status, r.stats, r.finished_at is not None) for r in s.query(Run)}
    assert rows == {killed: ("index", "interrupted", {}, True), done.id: ("reindex", "done", {"vectors": 3}, True),
                    failed.id: ("remove", "failed", {"removed": 1}, True),
                    cut.id: ("reembed", "interrupted", {}, True)}
    assert not list((tmp_path / "lib").glob(".index.*.tmp-*"))
