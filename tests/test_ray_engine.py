"""`clipfind index --engine ray` on a real local Ray cluster (2 CPUs) that the tests start.

The cluster is `ray start --head --block` in a temp dir, so a test can kill the indexing
driver while the cluster lives on (as on a real cluster), and so stopping it stops only
the processes it started. The results are compared with the single-process indexer on the
same folder: same paths, same vectors to 1e-5, same skip report.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from retrieval import cli
from retrieval.errors import EXIT_FAILURE, EXIT_USAGE
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.index.inspection import verify_library
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.store.library import Library
from retrieval.store.schema import ErrorRow, Run
from tests.test_index_faults import db_count, stored_vectors, wait_for

ROOT = Path(__file__).resolve().parents[1]
HEAD: dict[str, int] = {}  # the test cluster's `ray start` process: its session holds every Ray process
ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'clipfind[ray]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """host:port of a 2-CPU Ray head started for these tests, stopped (only it) afterwards."""
    temp = tempfile.mkdtemp(prefix="cfray")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    # no token: the drivers here are local test processes (a real cluster keeps token auth on)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
                             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                raise AssertionError(f"ray start failed: {head.stderr.read()}") from None
            time.sleep(0.5)
    time.sleep(2)  # the raylet registers just after the GCS port opens
    HEAD["pid"] = head.pid
    yield address
    head.send_signal(signal.SIGTERM)  # --block: stops the processes this head started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """48 drawn photos, a duplicate (a copy encoded once) and a broken file (a skip)."""
    root = tmp_path_factory.mktemp("ray-photos")
    synthetic.write_collection(root, per_class=4, seed=9)
    first = sorted(root.rglob("*.jpg"))[0]
    shutil.copy(first, root / "copy-of-first.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a photo")
    return root


@pytest.fixture(scope="module")
def local(tmp_path_factory, photos, tiny_model_dir):
    """The single-process indexer's library of the same folder: what Ray must reproduce."""
    lib_dir = tmp_path_factory.mktemp("ray-local") / "lib"
    with Library.open(lib_dir) as lib:
        result = index_paths(lib, [str(photos)], ModelSpec(model_dir=str(tiny_model_dir)), precision="fp32",
                             options=IndexOptions(workers=1, batch_size=8))
        return stored_vectors(lib), sorted((s.path, s.kind) for s in result.skipped)


def assert_same(lib_dir: Path, local) -> None:
    vectors, skipped = local
    with Library.open(lib_dir) as lib:
        got = stored_vectors(lib)
        assert sorted(got) == sorted(vectors)
        assert max(float(np.abs(got[p] - vectors[p]).max()) for p in vectors) < 1e-5
        assert verify_library(lib).ok and lib.vectors().index.ntotal == len(vectors)
        with lib.session() as s:
            runs = s.execute(select(Run.status, Run.precision, Run.device, Run.stats).order_by(Run.id)).all()
    assert runs[-1].status == "done" and runs[-1].precision == "fp32" and runs[-1].device == "cpu"
    return runs


@pytest.mark.slow
def test_ray_index_equals_the_single_process_index(cluster, photos, local, tiny_model_dir, tmp_path):
    args = ["index", str(photos), "-L", str(tmp_path / "lib"), "--model-dir", str(tiny_model_dir),
            "--precision", "fp32", "--batch-size", "8", "--engine", "ray", "--ray-address", cluster, "--json"]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    runs = assert_same(tmp_path / "lib", local)
    stats = runs[-1].stats
    assert stats["engine"] == "ray" and stats["encoded"] == 48 and stats["duplicates"] == 1
    # 49 files to decode in input blocks of 8; Ray Data may hand over two at once, never a part
    assert 4 <= stats["blocks"] <= 7 and stats["skipped_by_kind"] == {"corrupt": 1}
    again = CliRunner().invoke(cli.cli, args)  # up to date: nothing to encode, Ray not even joined
    assert again.exit_code == 0 and '"encoded": 0' in again.output, again.output


def start_ray_driver(photos, lib_dir, model_dir, cluster, output: str):
    """`clipfind index` on the Ray engine as its own process (so a test can kill it or its workers)."""
    args = ["index", str(photos), "-L", str(lib_dir), "--model-dir", str(model_dir), "--precision", "fp32",
            "--batch-size", "4", "--engine", "ray", "--ray-address", cluster, output]
    driver = subprocess.Popen([sys.executable, "-m", "retrieval.cli", *args], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return args, driver


@pytest.mark.slow
def test_killed_driver_loses_only_blocks_in_flight_and_resumes(cluster, photos, local, tiny_model_dir, tmp_path):
    lib_dir = tmp_path / "lib"
    args, driver = start_ray_driver(photos, lib_dir, tiny_model_dir, cluster, "--quiet")
    wait_for(lambda: db_count(lib_dir) >= 4, driver, timeout=300)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    committed = db_count(lib_dir)
    assert 4 <= committed < 48 and committed % 4 == 0  # whole blocks only
    rerun = CliRunner().invoke(cli.cli, [*args, "--json"])
    assert rerun.exit_code == 0, rerun.output
    runs = assert_same(lib_dir, local)
    assert [r.status for r in runs] == ["interrupted", "done"]
    assert runs[-1].stats["encoded"] == 48 - committed  # nothing committed was encoded twice


@pytest.mark.slow
def test_shards_from_ray_ingest_to_the_same_library_once(cluster, photos, local, tiny_model_dir, tmp_path):
    shards = tmp_path / "shards"
    made = CliRunner().invoke(cli.cli, [
        "index", str(photos), "--model-dir", str(tiny_model_dir), "--precision", "fp32", "--batch-size", "16",
        "--engine", "ray", "--ray-address", cluster, "--output-shards", str(shards),
        "-L", str(tmp_path / "no-lib"), "--json"])
    assert made.exit_code == 0, made.output
    assert not (tmp_path / "no-lib").exists()  # shards instead of the store
    assert '"rows": 49' in made.output  # 48 encoded + the duplicate
    for _ in range(2):
        loaded = CliRunner().invoke(cli.cli, ["ingest", str(shards), str(tmp_path / "lib"), "--json"])
        assert loaded.exit_code == 0, loaded.output
    assert '"added": 0' in loaded.output and '"unchanged": 49' in loaded.output
    assert_same(tmp_path / "lib", local)
    with Library.open(tmp_path / "lib") as lib, lib.session() as s:  # the skip report, as `index` keeps it
        errors = s.execute(select(ErrorRow.path, ErrorRow.kind)).all()
    assert sorted(map(tuple, errors)) == local[1]  # once, though ingested twice


def test_a_ray_address_that_does_not_answer(tmp_path, tiny_model_dir):
    synthetic.write_collection(tmp_path / "photos", per_class=1, seed=2, labels=synthetic.LABELS[:2])
    base = ["index", str(tmp_path / "photos"), "-L", str(tmp_path / "lib"), "--model-dir", str(tiny_model_dir),
            "--engine", "ray"]
    started = time.monotonic()
    result = CliRunner().invoke(cli.cli, [*base, "--ray-address", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == EXIT_FAILURE and result.output.count("\n") == 1, result.output
    assert "does not answer" in result.output and time.monotonic() - started < 30
    assert not (tmp_path / "lib").exists()  # refused before anything was made
    result = CliRunner().invoke(cli.cli, [*base, "--ray-address", "no-port-here"])
    assert result.exit_code == EXIT_USAGE and result.output.count("\n") == 1, result.output
    result = CliRunner().invoke(cli.cli, [*base[:-2], "--output-shards", str(tmp_path / "s")])
    assert result.exit_code == EXIT_USAGE and "--engine ray" in result.output


def cluster_processes(name: str = "") -> dict[int, str]:
    """pid -> command line of the test cluster's processes that name `name` (only the processes
    of the session the test's `ray start` opened: nothing else on the machine is touched)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
            if name in cmdline and os.getsid(int(entry)) == HEAD["pid"]:
                found[int(entry)] = cmdline.replace("\0", " ").strip()
        except (OSError, ProcessLookupError):
            continue
    return found


@pytest.mark.slow
def test_urls_from_a_file_list_and_a_killed_encoder_actor(cluster, photos, local, tiny_model_dir, tmp_path):
    """file:// URLs are listed, hashed and read through fsspec (decode tasks read their bytes in
    the workers). The encoder actor is SIGKILLed after the first block is committed: Ray restarts
    it and retries its blocks (or the run fails in one line and a re-run resumes); the library
    ends identical to the single-process one."""
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    listing = tmp_path / "files.txt"
    listing.write_text("".join(f"file://{p}\n" for p in files))
    lib_dir = tmp_path / "lib"
    args = ["index", "--file-list", str(listing), "-L", str(lib_dir), "--model-dir", str(tiny_model_dir),
            "--precision", "fp32", "--batch-size", "4", "--engine", "ray", "--ray-address", cluster, "--json"]
    driver = subprocess.Popen([sys.executable, "-m", "retrieval.cli", *args], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: db_count(lib_dir) >= 4, driver, timeout=300)
    deadline = time.monotonic() + 60
    while len(actors := cluster_processes("ImageEncoder")) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(actors) == 1, cluster_processes()
    os.kill(next(iter(actors)), signal.SIGKILL)
    out, err = driver.communicate(timeout=600)
    print(f"killed encoder actor: the driver exited {driver.returncode}")  # 0: Ray retried it (-s shows)
    if driver.returncode != 0:  # the other allowed outcome: one line, then a re-run finishes
        assert err.count("\n") == 1 and "Traceback" not in err, err
        rerun = CliRunner().invoke(cli.cli, args)
        assert rerun.exit_code == 0, rerun.output
    vectors, skipped = local
    with Library.open(lib_dir) as lib:
        got = {p.removeprefix("file://"): v for p, v in stored_vectors(lib).items()}
        with lib.session() as s:
            errors = sorted((p.removeprefix("file://"), k) for p, k in s.execute(select(ErrorRow.path, ErrorRow.kind)))
            last = s.execute(select(Run.status, Run.stats).order_by(Run.id.desc())).first()
    assert sorted(got) == sorted(vectors) and errors == skipped
    assert max(float(np.abs(got[p] - vectors[p]).max()) for p in vectors) < 1e-5
    assert last.status == "done" and last.stats["duplicates"] == 1


@pytest.mark.slow
def test_a_killed_decode_task_is_retried_or_resumed(cluster, photos, local, tiny_model_dir, tmp_path):
    """A decode task's worker process is SIGKILLed while it runs `decode_files` (seen by its
    process title, `ray::MapBatches(decode_files)`): Ray retries the task, or the run fails in
    one line and a re-run resumes; either way the library ends equal to the single-process one."""
    lib_dir = tmp_path / "lib"
    args, driver = start_ray_driver(photos, lib_dir, tiny_model_dir, cluster, "--json")
    killed, deadline = None, time.monotonic() + 300
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        for pid, cmdline in cluster_processes("decode_files").items():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished its task just now
                continue
            killed = cmdline
            break
        time.sleep(0.01)
    assert killed is not None, f"no decode task seen running (driver exit {driver.poll()})"
    committed_at_kill = db_count(lib_dir)
    out, err = driver.communicate(timeout=600)
    print(f"killed {killed!r} with {committed_at_kill} rows committed; the driver exited {driver.returncode}")
    if driver.returncode != 0:  # the other allowed outcome: one line, then a re-run finishes
        assert err.count("\n") == 1 and "Traceback" not in err, err
        rerun = CliRunner().invoke(cli.cli, args)
        assert rerun.exit_code == 0, rerun.output
    runs = assert_same(lib_dir, local)
    with Library.open(lib_dir) as lib, lib.session() as s:
        errors = s.execute(select(ErrorRow.path, ErrorRow.kind)).all()
    assert sorted(map(tuple, errors)) == local[1]  # the broken file reported once, not per attempt
    assert runs[-1].stats["duplicates"] == 1 and sum(r.stats.get("encoded", 0) for r in runs) == 48
