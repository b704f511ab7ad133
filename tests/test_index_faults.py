"""Indexing under bad input and faults, done for real: broken files on disk, a real
`clipfind index` subprocess killed with SIGKILL at several points, Ctrl-C, a held lock."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage
from sqlalchemy import select

from retrieval import cli
from retrieval.errors import EXIT_FAILURE, EXIT_LIBRARY
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.index.inspection import verify_library
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.store.library import Library
from retrieval.store.schema import ErrorRow, Image, Run, blobs_to_matrix, path_from_db

# Runs the real CLI in a child process, slowed down per encoder batch so the test
# can kill it at a chosen point; PAUSE_SAVE holds it inside the FAISS save, after
# the temp file is written and before the rename.
CHILD = """
import os, sys, time
import retrieval.model.encoder as enc
import retrieval.store.vectors as vec
delay = float(os.environ.get("SLOW_BATCH", "0"))
encode = enc.Encoder.encode_pixels
def slow(self, pixels):
    time.sleep(delay)
    return encode(self, pixels)
enc.Encoder.encode_pixels = slow
marker = os.environ.get("PAUSE_SAVE")
if marker:
    write_atomically = vec.fsync_write
    def paused(path, write):
        def write_then_wait(tmp):
            write(tmp)
            open(marker, "w").close()
            time.sleep(120)
        write_atomically(path, write_then_wait)
    vec.fsync_write = paused
from retrieval import cli
cli.main()
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault-photos")
    synthetic.write_collection(root, per_class=4, seed=3)  # 48 images
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory, photos, tiny_model_dir) -> dict[str, np.ndarray]:
    """path -> vector of an uninterrupted run: what every resumed run must end up equal to."""
    lib_dir = tmp_path_factory.mktemp("clean-lib")
    with Library.open(lib_dir) as lib:
        index_paths(lib, [str(photos)], ModelSpec(model_dir=str(tiny_model_dir)), precision="fp32",
                    options=IndexOptions(workers=0))
        return stored_vectors(lib)


def stored_vectors(library: Library) -> dict[str, np.ndarray]:
    with library.session() as s:
        found = s.execute(select(Image.path, Image.path_bytes, Image.embedding)).all()
    return {path_from_db(r.path, r.path_bytes): blobs_to_matrix([r.embedding], library.dim)[0]
            for r in found}


def spawn(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def db_count(lib_dir: Path, sql: str = "SELECT count(*) FROM images") -> int:
    try:
        with sqlite3.connect(f"file:{lib_dir / 'clipfind.db'}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql).fetchone()[0]
    except sqlite3.Error:  # not created or migrated yet
        return -1


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"child ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.02)


def index_args(photos: Path, lib_dir: Path, model_dir: Path) -> list[str]:
    # fp32 everywhere here: int8's per-batch activation scales would make vectors depend on
    # where the batch boundaries fell, and resumed runs cut batches elsewhere.
    return ["index", str(photos), "-L", str(lib_dir), "--model-dir", str(model_dir),
            "--batch-size", "4", "--workers", "1", "--quiet", "--precision", "fp32"]


def assert_resumes_to_clean(lib_dir: Path, photos: Path, clean: dict) -> None:
    with Library.open(lib_dir) as lib:
        stats = index_paths(lib, [str(photos)], precision="fp32", options=IndexOptions(workers=0)).stats
        assert stats["encoded"] + stats["unchanged"] == len(clean)  # no image encoded twice
        assert verify_library(lib).ok
        got = stored_vectors(lib)
        with lib.session() as s:
            statuses = [r.status for r in s.scalars(select(Run).order_by(Run.id))]
    assert sorted(got) == sorted(clean)
    assert max(float(np.abs(got[p] - clean[p]).max()) for p in clean) < 1e-5
    assert statuses[-1] == "done" and "running" not in statuses


@pytest.mark.parametrize("point", ["locked", "first-batch", "middle"])
def test_sigkill_then_resume(tmp_path, photos, clean, tiny_model_dir, point):
    lib_dir = tmp_path / "lib"
    proc = spawn(index_args(photos, lib_dir, tiny_model_dir), SLOW_BATCH="0.15")
    if point == "locked":  # the run row exists, nothing encoded yet
        wait_for(lambda: db_count(lib_dir, "SELECT count(*) FROM runs") >= 1, proc)
    elif point == "first-batch":
        wait_for(lambda: db_count(lib_dir) >= 1, proc)
    else:
        wait_for(lambda: db_count(lib_dir) >= len(clean) // 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = db_count(lib_dir)
    assert committed < len(clean) and committed % 4 == 0 or point == "locked"  # whole batches only
    assert db_count(lib_dir, "SELECT count(*) FROM runs WHERE status = 'running'") == 1
    assert_resumes_to_clean(lib_dir, photos, clean)


def test_sigkill_inside_faiss_save_keeps_the_old_index(tmp_path, photos, clean, tiny_model_dir):
    lib_dir = tmp_path / "lib"
    first_half = sorted(photos.iterdir())[:6]
    with Library.open(lib_dir, model=ModelSpec(model_dir=str(tiny_model_dir))) as lib:
        index_paths(lib, [str(p) for p in first_half], ModelSpec(model_dir=str(tiny_model_dir)),
                    precision="fp32", options=IndexOptions(workers=0))
        before = lib.image_count()
    saved = (lib_dir / "index.faiss").read_bytes()
    marker = tmp_path / "in-save"
    proc = spawn(index_args(photos, lib_dir, tiny_model_dir), PAUSE_SAVE=str(marker))
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (lib_dir / "index.faiss").read_bytes() == saved  # never half-written
    assert list(lib_dir.glob(".index.faiss.tmp-*"))  # the killed writer's temp file
    assert db_count(lib_dir) == len(clean) > before  # all rows were committed before the save
    assert_resumes_to_clean(lib_dir, photos, clean)
    assert not list(lib_dir.glob(".index.*.tmp-*"))  # cleaned up by the next writer


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_and_exits_130(tmp_path, photos, clean, tiny_model_dir, sig):
    lib_dir = tmp_path / "lib"
    proc = spawn(index_args(photos, lib_dir, tiny_model_dir), SLOW_BATCH="0.15")
    wait_for(lambda: db_count(lib_dir) >= 8, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    with Library.open(lib_dir) as lib:
        with lib.session() as s:
            assert s.scalars(select(Run.status)).all() == ["interrupted"]
        count = lib.image_count()
        assert 8 <= count < len(clean)
        assert lib.vectors(sync=False).load() and lib.vectors(sync=False).index.ntotal == count
        assert verify_library(lib).ok  # consistent as it stands, before any resume
    assert_resumes_to_clean(lib_dir, photos, clean)


def test_second_writer_refuses_then_waits(tmp_path, photos, tiny_model_dir):
    lib_dir = tmp_path / "lib"
    args = index_args(photos, lib_dir, tiny_model_dir)
    proc = spawn(args, SLOW_BATCH="0.3")
    wait_for(lambda: db_count(lib_dir) >= 4, proc)
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == EXIT_LIBRARY and "busy" in result.output and "--wait" in result.output
    proc.kill()
    proc.wait()

    with Library.open(lib_dir) as lib:  # a writer holds the lock; `--wait` waits it out
        holding = threading.Event()

        def hold() -> None:
            with lib.write_lock():
                holding.set()
                time.sleep(1.0)

        holder = threading.Thread(target=hold)
        holder.start()
        holding.wait()
        started = time.monotonic()
        result = CliRunner().invoke(cli.cli, [*args, "--wait", "--workers", "0"])
        holder.join()
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 0.5


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def make_messy_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """Good images of many kinds among broken ones; returns (good paths, bad path -> kind)."""
    synthetic.write_collection(root / "good", per_class=1, seed=8, labels=synthetic.LABELS[:4])
    good = {str(p) for p in (root / "good").rglob("*.jpg")}
    src = PILImage.open(sorted(good)[0]).convert("RGB")

    def keep(name: str, save) -> None:
        path = root / name
        save(path)
        good.add(str(path))

    keep("frames.gif", lambda p: src.save(p, save_all=True, append_images=[src.rotate(90)]))
    keep("plain.bmp", lambda p: src.save(p, "BMP"))
    keep("scan.tiff", lambda p: src.save(p, "TIFF"))
    keep("web.webp", lambda p: src.save(p, "WEBP"))
    keep("alpha.png", lambda p: src.convert("RGBA").save(p))
    keep("deep.png", lambda p: PILImage.new("I;16", (40, 30), 40000).save(p))
    keep("print.jpg", lambda p: src.convert("CMYK").save(p, "JPEG"))
    keep("png-named.jpg", lambda p: src.save(p, "PNG"))
    keep("no-extension", lambda p: src.save(p, "JPEG"))
    keep(os.fsdecode(b"caf\xe9-latin1.jpg"), lambda p: src.save(p, "JPEG"))
    long_dir = root.joinpath(*(["d" * 200] * 12))
    long_dir.mkdir(parents=True)
    keep(str(long_dir.relative_to(root) / ("x" * 200 + ".jpg")), lambda p: src.save(p, "JPEG"))

    bad = {}
    jpeg = Path(sorted(good)[0]).read_bytes()
    for name, data, kind in [("corrupt.jpg", b"\xff\xd8\xff\xe0" + os.urandom(3000), "corrupt"),
                             ("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated"),
                             ("empty.jpg", b"", "empty"),
                             ("notes.jpg", b"these are my holiday notes\n" * 20, "corrupt")]:
        (root / name).write_bytes(data)
        bad[str(root / name)] = kind
    _png_header_only(root / "bomb.png", 40_000, 40_000)
    bad[str(root / "bomb.png")] = "too_large"
    os.symlink(root / "gone-target.jpg", root / "dangling.jpg")
    bad[str(root / "dangling.jpg")] = "vanished"
    os.mkfifo(root / "pipe.jpg")  # never opened: it could block forever; skipped with its reason
    bad[str(root / "pipe.jpg")] = "not_image"
    return good, bad


def test_broken_files_are_skipped_reported_and_remembered(tmp_path, tiny_model_dir, monkeypatch):
    import retrieval.media.pipeline as pipeline

    root = tmp_path / "messy"
    good, bad = make_messy_folder(root)
    vanishing = sorted(p for p in good if p.endswith(".jpg"))[-1]
    make_loader = pipeline.make_loader

    def loader_after_a_deletion(paths, *args, **kwargs):  # the file goes between scan and decode
        os.remove(vanishing)
        return make_loader(paths, *args, **kwargs)

    monkeypatch.setattr(pipeline, "make_loader", loader_after_a_deletion)
    good.discard(vanishing)
    bad[vanishing] = "vanished"
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(tmp_path / "lib") as lib:
        result = index_paths(lib, [str(root)], spec, options=IndexOptions(workers=2, batch_size=4))
        assert {s.path: s.kind for s in result.skipped} == bad
        assert set(stored_vectors(lib)) == good and not result.nothing_indexed
        with lib.session() as s:
            assert s.scalar(select(ErrorRow.kind).where(ErrorRow.path.like("%bomb.png"))) == "too_large"
        assert verify_library(lib).ok
    monkeypatch.setattr(pipeline, "make_loader", make_loader)
    with Library.open(tmp_path / "lib") as lib:
        again = index_paths(lib, [str(root)], options=IndexOptions(workers=0))
        assert again.stats["encoded"] == 0 and again.plan.known_bad == 5  # 2 corrupt, truncated, empty, bomb
        assert lib.loaded_encoder is None  # broken files alone never load the model again


def test_pixel_limit_and_nothing_indexable_exit_codes(tmp_path, tiny_model_dir):
    root = tmp_path / "photos"
    synthetic.write_collection(root, per_class=1, seed=2, labels=synthetic.LABELS[:2])
    base = ["index", str(root), "-L", str(tmp_path / "lib"), "--model-dir", str(tiny_model_dir),
            "--workers", "0"]
    result = CliRunner().invoke(cli.cli, [*base, "--max-pixels", "1000"])
    assert result.exit_code == EXIT_FAILURE and "nothing could be indexed" in result.output
    assert "2 too_large" in result.output
    result = CliRunner().invoke(cli.cli, base)  # a raised limit retries them at once
    assert result.exit_code == 0 and "indexed 2" in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_skipped(tmp_path, tiny_model_dir):
    root = tmp_path / "photos"
    synthetic.write_collection(root, per_class=1, seed=2, labels=synthetic.LABELS[:2])
    locked = sorted(root.rglob("*.jpg"))[0]
    locked.chmod(0)
    try:
        with Library.open(tmp_path / "lib") as lib:
            result = index_paths(lib, [str(root)], ModelSpec(model_dir=str(tiny_model_dir)),
                                 options=IndexOptions(workers=0))
        assert [(s.path, s.kind) for s in result.skipped] == [(str(locked), "unreadable")]
    finally:
        locked.chmod(0o644)


def test_unreadable_folder_keeps_its_rows(tmp_path, tiny_model_dir, monkeypatch):
    """A folder that cannot be listed this time is not a folder whose files were deleted."""
    import retrieval.media.scan as scan

    root = tmp_path / "photos"
    synthetic.write_collection(root, per_class=1, seed=2, labels=synthetic.LABELS[:2])
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(tmp_path / "lib") as lib:
        index_paths(lib, [str(root)], spec, options=IndexOptions(workers=0))
        hidden = str(sorted(root.iterdir())[0])
        listing = scan._listing

        def refuse(path, report):
            if path == hidden:
                report(path, "permission denied")
                return []
            return listing(path, report)

        monkeypatch.setattr(scan, "_listing", refuse)
        result = index_paths(lib, [str(root)], options=IndexOptions(workers=0))
        assert result.stats["removed"] == 0 and lib.image_count() == 2
        assert [(s.path, s.kind) for s in result.skipped] == [(hidden, "unreadable")]
    shutil.rmtree(root)


@pytest.mark.postgres
def test_sigkill_on_postgres_frees_the_lock_at_once_and_resumes(tmp_path, photos, clean, tiny_model_dir,
                                                                pg_server, monkeypatch):
    """The same kill on a PostgreSQL library: whole batches only, and the advisory lock dies with
    the killed writer at once (its decode worker closed its copy of the lock's socket), so the
    re-run starts without --wait and ends with the vectors of a clean SQLite run."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    url = pg_server.database()
    monkeypatch.setenv("CLIPFIND_DB", url)
    engine = create_engine(url, poolclass=NullPool)

    def count(sql: str = "SELECT count(*) FROM images") -> int:
        try:
            with engine.connect() as conn:
                return conn.execute(text(sql)).scalar_one()
        except Exception:  # noqa: BLE001 - not migrated yet
            return -1

    lib_dir = tmp_path / "lib"
    proc = spawn(index_args(photos, lib_dir, tiny_model_dir), SLOW_BATCH="0.15")
    wait_for(lambda: count() >= len(clean) // 2, proc, timeout=240)  # model load under load
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = count()
    assert committed < len(clean) and committed % 4 == 0
    assert count("SELECT count(*) FROM runs WHERE status = 'running'") == 1
    engine.dispose()
    assert_resumes_to_clean(lib_dir, photos, clean)
