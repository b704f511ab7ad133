"""PostgreSQL as the store: bad URLs and unreachable servers in one line, locking across
processes, the change log under concurrent writers, and a folder that remembers its database.

Every test here needs the session's PostgreSQL server (tests/pg_server.py) except the URL
checks that fail before connecting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from retrieval import cli
from retrieval.errors import EXIT_LIBRARY, LibraryError
from retrieval.store.library import DB_NAME, Library
from retrieval.store.schema import Image, vector_to_blob
from retrieval.store.vectors import VectorIndex, last_log_seq
from tests.pg_server import PASSWORD, free_port

pytestmark = pytest.mark.postgres


def cli_run(*args, env=None):
    return CliRunner().invoke(cli.cli, [str(a) for a in args], env=env)


def one_line_error(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# -- bad URLs: one line, exit 4, nothing written ------------------------------------------------
@pytest.mark.parametrize("url, words", [
    ("mysql://u@localhost/x", "cannot store a library in mysql"),
    ("sqlite:///x.db", "cannot store a library in sqlite"),
    ("not a url", "not a database URL"),
    ("postgresql+psycopg://u@localhost", "names no database"),
])
def test_a_url_clipfind_cannot_use_is_one_line(tmp_path, url, words):
    result = cli_run("status", "-L", tmp_path / "lib", "--db", url)
    assert result.exit_code == EXIT_LIBRARY
    assert words in one_line_error(result)
    assert not (tmp_path / "lib").exists()


def bad_urls(server) -> dict[str, tuple[str, str]]:
    good = server.url(server.database().rsplit("/", 1)[1])
    return {
        "unreachable port": (good.replace(f":{server.port}/", f":{free_port()}/"), "nothing answers there"),
        "wrong password": (good.replace(PASSWORD, "wrong"), "wrong user or password"),
        "no such database": (good.rsplit("/", 1)[0] + "/no_such_db", 'database "no_such_db" does not exist'),
        "no such host": (good.replace("127.0.0.1", "no-such-host.invalid"), "no such host"),
    }


@pytest.mark.parametrize("case", ["unreachable port", "wrong password", "no such database", "no such host"])
def test_a_database_that_cannot_be_reached_is_one_line_and_nothing_is_written(tmp_path, pg_server, case,
                                                                             tiny_model_dir):
    url, words = bad_urls(pg_server)[case]
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.txt").write_text("not an image")
    started = time.monotonic()
    result = cli_run("index", photos, "-L", tmp_path / "lib", "--db", url, "--model-dir", tiny_model_dir)
    assert result.exit_code == EXIT_LIBRARY, result.output
    line = one_line_error(result)
    assert words in line and "cannot connect to the library database" in line
    assert PASSWORD not in result.output and "wrong" not in line.replace("wrong user", "")
    assert not (tmp_path / "lib").exists()  # no folder, no pointer, no SQLite file
    assert time.monotonic() - started < 30


def test_without_psycopg_the_error_says_what_to_install(tmp_path, pg_server):
    """A fresh interpreter where `import psycopg` fails (a meta-path hook refuses it)."""
    code = ("import sys\n"
            "class Refuse:\n"
            "    def find_spec(self, name, *a):\n"
            "        if name.split('.')[0] == 'psycopg': raise ImportError('no psycopg')\n"
            "sys.meta_path.insert(0, Refuse())\n"
            "from retrieval.cli import main\n"
            "sys.argv = ['clipfind', 'status', '-L', sys.argv[1], '--db', sys.argv[2]]\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lib"), pg_server.database()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_LIBRARY, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: a PostgreSQL library needs the psycopg driver: pip install 'clipfind[postgres]'"]
    assert not (tmp_path / "lib").exists()


def test_a_sqlite_folder_refuses_a_database_url(tmp_path, pg_server):
    Library.open(tmp_path / "lib").close()
    with pytest.raises(LibraryError, match="keeps its metadata in .*clipfind.db"):
        Library.open(tmp_path / "lib", db=pg_server.database())


def test_the_folder_remembers_its_database_without_the_password(tmp_path, pg_server, monkeypatch):
    url = pg_server.database()
    with Library.open(tmp_path / "lib", db=url) as lib:
        lib.set_meta("probe", 1)
    assert not (tmp_path / "lib" / DB_NAME).exists()
    monkeypatch.delenv("CLIPFIND_DB", raising=False)
    result = cli_run("status", "-L", tmp_path / "lib", "--json")  # no password anywhere: refused
    assert result.exit_code == EXIT_LIBRARY and "password" in one_line_error(result)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    with Library.open(tmp_path / "lib", create=False) as lib:  # the remembered URL, libpq's password
        assert lib.get_meta("probe") == 1 and lib.store.is_postgres


# -- locking ------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from retrieval.store.library import Library
lib = Library.open(sys.argv[1], db=sys.argv[2])
with lib.write_lock():
    print("locked", flush=True)
    time.sleep(600)
"""


def test_the_write_lock_spans_processes_and_dies_with_a_killed_holder(tmp_path, pg_server):
    url = pg_server.database()
    Library.open(tmp_path / "a", db=url).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "b"), url],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # another folder (another machine's cache) on the same database: the same library, busy
        with Library.open(tmp_path / "a", db=url) as lib:
            assert lib.writer_active()
            with pytest.raises(LibraryError, match=r"is busy \(clipfind pid \d+"), lib.write_lock():
                pass
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(30)
            deadline = time.monotonic() + 10
            while lib.writer_active() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not lib.writer_active()  # the server dropped the dead session's lock
            with lib.write_lock():
                assert lib.writer_active()
    finally:
        holder.kill()
        holder.wait()


def test_readers_never_wait_for_the_writer(tmp_path, pg_server, tiny_model_dir):
    url = pg_server.database()
    with Library.open(tmp_path / "w", db=url) as writer, writer.write_lock():
        with writer.engine.begin() as conn:  # an open write transaction, uncommitted
            conn.execute(text("INSERT INTO meta (key, value) VALUES ('k', '1')"))
            with Library.open(tmp_path / "r", db=url) as reader:
                started = time.monotonic()
                assert reader.image_count() == 0 and reader.get_meta("k") is None
                assert time.monotonic() - started < 5


# -- the change log under concurrent writers ----------------------------------------------------
def test_concurrent_writers_keep_the_change_log_in_commit_order(tmp_path, pg_server):
    """Writers that bypass the write lock (two threads here) while a reader polls the log as
    FAISS's catch-up does: every entry at or below the newest seq the reader saw must already
    have been visible then. Without the triggers' lock a seq taken early but committed late
    would appear below a watermark already passed, and the catch-up would skip it for ever."""
    url, dim = pg_server.database(), 8
    with Library.open(tmp_path / "lib", db=url) as lib:
        rng = np.random.default_rng(0)

        def write(prefix: str) -> None:
            for i in range(40):
                with lib.session() as s, s.begin():
                    s.add_all([Image(path=f"/{prefix}/{i}/{j}.jpg", size=1, mtime_ns=1,
                                     content_hash=f"{prefix}{i}{j}",
                                     embedding=vector_to_blob(rng.normal(size=dim)))
                               for j in range(3)])
                    s.flush()
                    time.sleep(0.005 * (i % 3))  # hold the transaction open: commits interleave
                    if i % 7 == 6:
                        s.execute(text("DELETE FROM images WHERE path = :p"), {"p": f"/{prefix}/{i - 1}/0.jpg"})

        polls = []
        writers = [threading.Thread(target=write, args=(p,)) for p in ("x", "y")]
        for w in writers:
            w.start()
        with lib.engine.connect() as conn:
            while any(w.is_alive() for w in writers):
                last = last_log_seq(conn)
                seen = set(conn.execute(text("SELECT seq FROM vector_log WHERE seq <= :l"), {"l": last}).scalars())
                conn.commit()
                polls.append((last, seen))
        for w in writers:
            w.join()
        with lib.engine.connect() as conn:
            final = set(conn.execute(text("SELECT seq FROM vector_log")).scalars())
            rows = conn.execute(text("SELECT count(*) FROM images")).scalar_one()
        assert rows == 2 * (40 * 3 - 5) and len(polls) > 10
        late = [(last, sorted({q for q in final if q <= last} - seen)) for last, seen in polls
                if {q for q in final if q <= last} != seen]
        assert not late, f"entries committed below a watermark already read: {late[:3]}"
        index = VectorIndex(tmp_path / "lib", dim, lib.identity)  # and FAISS agrees with the rows
        index.sync(lib.engine, save=False)
        with lib.engine.connect() as conn:
            ids = sorted(conn.execute(text("SELECT id FROM images")).scalars())
        assert sorted(index.ids().tolist()) == ids


# -- what differs for a PostgreSQL library --------------------------------------------------------
def test_status_backup_and_the_web_apps_reader(tmp_path, pg_server, tiny_model_dir, monkeypatch):
    from retrieval.query.search import Searcher
    from retrieval.serve.state import ServeState

    url = pg_server.database()
    photos = tmp_path / "photos"
    from retrieval.media import synthetic

    synthetic.write_collection(photos, per_class=1, seed=3, labels=synthetic.LABELS[:3])
    monkeypatch.setenv("CLIPFIND_DB", url)
    lib = tmp_path / "lib"
    assert cli_run("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "0").exit_code == 0
    status = cli_run("status", "-L", lib)
    assert f"database:  {url.replace(':' + PASSWORD, '')}" in status.output and PASSWORD not in status.output
    result = cli_run("backup", tmp_path / "copy", "-L", lib)
    assert result.exit_code == EXIT_LIBRARY and "pg_dump" in one_line_error(result)
    assert not (tmp_path / "copy").exists()

    with Library.open(lib, create=False) as library:
        state = ServeState(library, Searcher(library))
        try:
            assert state.count_images() == 3
            with state.read() as conn, pytest.raises(Exception, match="read-only transaction"):
                conn.execute(text("DELETE FROM images"))
            assert state.jobs.database_url == url  # a web-started index run connects as we did
        finally:
            state.close()
        assert library.image_count() == 3


def test_two_index_runs_at_once_are_serialised_and_lose_nothing(tmp_path, pg_server, tiny_model_dir, monkeypatch):
    """Two `clipfind index --wait` processes on one PostgreSQL library, from two folders (two
    machines' caches), each adding its own photos: the second queues on the advisory lock (seen
    waiting in pg_locks), both finish with exit 0, their runs do not overlap, every photo is there
    once, and each folder's FAISS copy catches up with the other's rows."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from retrieval.media import synthetic
    from tests.test_index_faults import spawn

    url = pg_server.database()
    monkeypatch.setenv("CLIPFIND_DB", url)
    for name, seed in (("a", 1), ("b", 2)):
        synthetic.write_collection(tmp_path / name, per_class=1, seed=seed)  # 12 photos each
    procs = [spawn(["index", str(tmp_path / name), "-L", str(tmp_path / f"lib-{name}"), "--wait", "--json",
                    "--model-dir", str(tiny_model_dir), "--workers", "0", "--batch-size", "4",
                    "--precision", "fp32"]) for name in ("a", "b")]
    engine = create_engine(url, poolclass=NullPool)
    waited = False
    try:
        while any(p.poll() is None for p in procs) and not waited:
            try:
                with engine.connect() as conn:
                    waited = bool(conn.execute(text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")).scalar_one())
            except Exception:  # noqa: BLE001 - not migrated yet
                pass
            time.sleep(0.05)
        outs = [p.communicate(timeout=300) for p in procs]
        with engine.connect() as conn:
            runs = conn.execute(text("SELECT status, started_at, finished_at FROM runs ORDER BY started_at")).all()
            paths = conn.execute(text("SELECT count(*), count(DISTINCT path) FROM images")).one()
    finally:
        engine.dispose()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert waited, "the second writer never queued behind the first"
    assert [r.status for r in runs] == ["done", "done"] and runs[1].started_at >= runs[0].finished_at
    assert tuple(paths) == (24, 24)
    for name in ("a", "b"):
        with Library.open(tmp_path / f"lib-{name}", create=False) as lib:
            index = lib.vectors()
            assert index.index.ntotal == 24  # caught up with the other writer's rows
