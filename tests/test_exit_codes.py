"""The README's exit-code table is the reference: the code agrees with it, and each row happens.

Each row is made to happen through the real CLI (click's runner, or a real child process for
the signal), on a library indexed with the tiny trained model.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrieval import cli
from retrieval.errors import EXIT_CODES
from retrieval.media import synthetic
from tests.test_index_faults import db_count, index_args, spawn, wait_for

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> dict[int, str]:
    """code -> meaning, read from the README's "Exit codes" table."""
    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.M)
    return {int(code): meaning.strip() for code, meaning in rows}


def test_readme_table_and_code_agree():
    assert readme_table() == EXIT_CODES


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exit-codes")
    photos = root / "photos"
    synthetic.write_collection(photos, per_class=1, seed=5, labels=synthetic.LABELS[:3])
    lib = root / "lib"
    code, output = run("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "0")
    assert code == 0, output
    return {"root": root, "photos": photos, "lib": lib}


def ok(indexed, tiny_model_dir) -> tuple[int, str]:
    return run("search", "a red circle", "-L", indexed["lib"], "-k", "2")


def failed(indexed, tiny_model_dir) -> tuple[int, str]:
    junk = indexed["root"] / "junk"
    junk.mkdir(exist_ok=True)
    (junk / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a photo")
    return run("index", junk, "-L", indexed["root"] / "junk-lib", "--model-dir", tiny_model_dir,
               "--workers", "0")


def usage(indexed, tiny_model_dir) -> tuple[int, str]:
    return run("search", "-L", indexed["lib"], "--no-such-flag")


def model(indexed, tiny_model_dir) -> tuple[int, str]:
    return run("index", indexed["photos"], "-L", indexed["root"] / "model-lib",
               "--model", "NoSuchNet", "--random-weights")


def library(indexed, tiny_model_dir) -> tuple[int, str]:
    return run("search", "a red circle", "-L", indexed["root"] / "no-library-here")


def bad_input(indexed, tiny_model_dir) -> tuple[int, str]:
    notes = indexed["root"] / "notes.txt"
    notes.write_text("not an image")
    return run("search", "--image", notes, "-L", indexed["lib"])


def verify_found(indexed, tiny_model_dir) -> tuple[int, str]:
    copy = indexed["root"] / "verify-photos"
    synthetic.write_collection(copy, per_class=1, seed=6, labels=synthetic.LABELS[:2])
    lib = indexed["root"] / "verify-lib"
    assert run("index", copy, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "0")[0] == 0
    next(p for p in copy.rglob("*") if p.is_file()).unlink()
    return run("verify", "-L", lib)


def interrupted(indexed, tiny_model_dir) -> tuple[int, str]:
    photos = indexed["root"] / "many"
    synthetic.write_collection(photos, per_class=3, seed=7)  # 36 images, slowed per batch
    lib = indexed["root"] / "interrupted-lib"
    proc = spawn(index_args(photos, lib, tiny_model_dir), SLOW_BATCH="0.2")
    wait_for(lambda: db_count(lib) >= 4, proc, timeout=240)  # a loaded machine starts torch slowly
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


SCENARIOS = {0: ok, 1: failed, 2: usage, 3: model, 4: library, 5: bad_input, 6: verify_found,
             130: interrupted}


def test_every_row_has_a_scenario():
    assert sorted(SCENARIOS) == sorted(readme_table())


@pytest.mark.parametrize("code", sorted(SCENARIOS))
def test_each_exit_code_happens(code, indexed, tiny_model_dir):
    got, output = SCENARIOS[code](indexed, tiny_model_dir)
    assert got == code, output
    if code not in (0, 2):  # a ClipfindError: exactly one line on stderr, no traceback
        assert "Traceback" not in output
        assert any(line.startswith(("error:", "interrupted:")) for line in output.splitlines())
