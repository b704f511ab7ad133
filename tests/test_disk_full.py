"""A disk that fills up during an index run: one line, nothing lost, and the next run resumes.

The fault is real: `clipfind index` runs in a child process whose file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG as on a full
disk) lets the database grow only a little past what the first run left.
"""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from retrieval.errors import EXIT_LIBRARY
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.index.inspection import verify_library
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.store.library import DB_NAME, Library
from retrieval.store.schema import Run

HEADROOM = 24 * 1024  # bytes any one file may grow past the first run's database


def limited(max_bytes: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core dump, as ENOSPC would
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def test_a_full_disk_mid_run_is_one_line_and_the_library_resumes(tmp_path, tiny_model_dir):
    photos, lib = tmp_path / "photos", tmp_path / "lib"
    synthetic.write_collection(photos / "first", per_class=2, seed=5)
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(lib, model=spec) as library:
        index_paths(library, [str(photos)], spec, precision="fp32", options=IndexOptions(workers=0))
        first = library.image_count()
    synthetic.write_collection(photos / "more", per_class=8, seed=6)  # 96 more: needs ~200 KB more
    total = first + 96
    limit = os.path.getsize(lib / DB_NAME) + HEADROOM
    child = subprocess.run(
        [sys.executable, "-m", "retrieval.cli", "index", str(photos), "-L", str(lib), "--workers", "0",
         "--batch-size", "8", "--precision", "fp32", "-q"],
        capture_output=True, text=True, timeout=600, preexec_fn=limited(limit),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()),
                                                                       os.environ.get("PYTHONPATH")]))})
    lines = child.stderr.strip().splitlines()
    assert child.returncode == EXIT_LIBRARY, (child.returncode, child.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), child.stderr[-3000:]
    assert "Traceback" not in child.stderr

    with sqlite3.connect(lib / DB_NAME) as conn:  # intact: every page sound, a prefix committed
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    assert first <= kept < total
    with Library.open(lib, create=False) as library:
        assert verify_library(library, check_files=True).ok
        result = index_paths(library, [str(photos)], precision="fp32", options=IndexOptions(workers=0))
        assert result.status == "done"
        assert result.stats["encoded"] == total - kept  # resumed: nothing committed is encoded again
        assert library.image_count() == total
        report = verify_library(library)
        assert report.ok, report.problems
        with library.session() as s:
            statuses = [r.status for r in s.query(Run).order_by(Run.id)]
    assert statuses[0] == "done" and statuses[-1] == "done" and "running" not in statuses


def test_rlimit_is_what_we_think(tmp_path):
    """The fault the test above relies on: a write past the limit fails with EFBIG, no signal."""
    code = ("import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT); os.write(fd, b'x' * 4096)\n"
            "try:\n    os.write(fd, b'x')\nexcept OSError as e:\n    print(e.errno, e.strerror)")
    probe = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True,
                           text=True, preexec_fn=limited(4096))
    assert probe.returncode == 0 and probe.stdout.strip() == "27 File too large", probe
    assert os.path.getsize(tmp_path / "f") == 4096
