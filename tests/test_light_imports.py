"""Everyday commands that must stay light: what a fresh process imports, read from sys.modules."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.media import synthetic
from tests.cli_runner import fresh_clipfind

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "onnxruntime", "faiss", "numpy", "sqlalchemy", "alembic", "PIL",
         "ray", "pyarrow")


def run_clipfind(*args: str, watch: tuple[str, ...] = HEAVY) -> tuple[dict, list[str]]:
    """`clipfind ARGS --json` in a fresh process: (its JSON output, the `watch` modules it imported)."""
    out, heavy = fresh_clipfind(*args, watch=watch)
    return json.loads(out.stdout.strip().splitlines()[-1]), heavy


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("light")
    synthetic.write_collection(base / "photos", per_class=2, seed=4)
    _, heavy = run_clipfind("index", str(base / "photos"), "-L", str(base / "lib"), "--model-dir",
                            str(tiny_model_dir), "--workers", "0", "--json")
    assert "torch" in heavy  # the first run encodes: it must load the model
    return base


def test_unchanged_rerun_imports_nothing_heavy(indexed):
    stats, heavy = run_clipfind("index", str(indexed / "photos"), "-L", str(indexed / "lib"), "--json")
    assert stats["unchanged"] == stats["scanned"] > 0 and stats["encoded"] == 0
    assert heavy == [], heavy  # answered on the standard library (index/rerun.py): no SQLAlchemy, numpy, FAISS


def test_a_fresh_text_query_imports_no_sqlalchemy_torch_or_pillow(indexed):
    """A SQLite library is read through stdlib sqlite3 (filters too), encoded by ONNX Runtime."""
    photos, lib = indexed / "photos", str(indexed / "lib")
    result, heavy = run_clipfind("search", f"a red circle no. {os.getpid()}", "-L", lib, "--json", "--no-server",
                                 "--path", str(photos), "--after", "2000-01-01", "-k", "3")
    assert result["rank"] == 3 and result["path"].startswith(str(photos))
    assert "onnxruntime" in heavy and "faiss" in heavy, heavy  # it encoded and searched here ...
    assert not {"sqlalchemy", "alembic", "torch", "open_clip", "PIL"} & set(heavy), heavy  # ... and no more


def test_an_image_query_loads_pillow_but_no_sqlalchemy_or_torch(indexed, tmp_path):
    outside = tmp_path / "query.jpg"
    synthetic.draw(synthetic.LABELS[0], 64, random.Random(3)).save(outside, quality=90)
    result, heavy = run_clipfind("search", "--image", str(outside), "-L", str(indexed / "lib"), "--json",
                                 "--no-server", "-k", "2")
    assert result["rank"] == 2 and "PIL" in heavy and "onnxruntime" in heavy, heavy
    assert not {"sqlalchemy", "alembic", "torch", "open_clip"} & set(heavy), heavy


def test_search_through_a_running_server_is_a_light_client(indexed):
    server = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "-L", str(indexed / "lib"),
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        ready = server.stdout.readline()
        assert ready.startswith("clipfind serve:"), ready + server.stderr.read()
        # click and the email package (urllib's, http.client's) were most of the client's start-up
        result, heavy = run_clipfind("search", "a red circle", "-L", str(indexed / "lib"), "--json",
                                     watch=(*HEAVY, "click", "email", "retrieval.cli.search_cmds"))
        assert result["rank"] == 10 and heavy == [], heavy  # asked the server, imported nothing heavy
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_each_command_loads_only_its_own_module():
    """`clipfind X` imports X's module alone; the name -> module map holds every module's COMMANDS."""
    code = ("import importlib, json, sys\n"
            "from retrieval import cli\n"
            "before = {m for m in sys.modules if m.startswith('retrieval.cli.')}\n"
            "cli.cli.get_command(None, 'search')\n"
            "loaded = sorted({m for m in sys.modules if m.startswith('retrieval.cli.')} - before)\n"
            "import pkgutil\n"
            "modules = [m.name for m in pkgutil.iter_modules(cli.__path__) if m.name != '__main__']\n"
            "found = {c.name: m for m in modules\n"
            "         for c in getattr(importlib.import_module('retrieval.cli.' + m), 'COMMANDS', [])}\n"
            "print(json.dumps([loaded, found == cli.COMMAND_MODULES, sorted(set(found) ^ set(cli.COMMAND_MODULES))]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    loaded, agrees, differ = json.loads(out.stdout)
    assert "retrieval.cli.search_cmds" in loaded and not {"retrieval.cli.library_cmds", "retrieval.cli.tag_cmds",
                                                          "retrieval.cli.demo"} & set(loaded), loaded
    assert agrees, differ
