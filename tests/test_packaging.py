"""What a user installs: one top-level package, a console script into it, a CLI that starts light.

The wheel is built from this checkout and installed (without dependencies) into a fresh
virtual environment, so what is checked is what pip would put on a user's machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "faiss", "numpy", "sqlalchemy", "fastapi", "uvicorn", "ray", "pyarrow")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, text=True)
    (built,) = out.glob("clipfind-*.whl")
    return built


def test_wheel_holds_one_top_level_package_with_its_migrations(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"retrieval"}
    for shipped in ("retrieval/migrations/env.py", "retrieval/migrations/alembic.ini",
                    "retrieval/migrations/script.py.mako", "retrieval/migrations/versions/0001_initial.py",
                    "retrieval/cli/__init__.py", "retrieval/serve/templates/search.html",
                    "retrieval/serve/static/app.js", "retrieval/serve/static/app.css",
                    "retrieval/prompting/data/cifar10_templates.txt", "retrieval/prompting/data/cifar10_cupl.json"):
        assert shipped in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "clipfind = retrieval.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_into_a_fresh_venv_adds_only_retrieval(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    before = {p.name for p in site.iterdir()}
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout on the path
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",  # looks installed
                    "--quiet", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, text=True,
                   env=clean_env)
    added = {p.name for p in site.iterdir()} - before
    assert {n for n in added if not n.endswith(".dist-info")} == {"retrieval"}
    assert (venv / "bin" / "clipfind").exists()


@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["index", "--help"], ["tag", "--help"],
                                  ["ingest", "--help"]])
def test_help_imports_nothing_heavy(argv):
    """`clipfind --help` must start in a blink: none of torch, faiss, numpy, sqlalchemy."""
    code = ("import json, sys\nfrom retrieval.cli import main\nsys.argv = ['clipfind', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    loaded = json.loads(done.stderr.strip().splitlines()[-1])
    assert "Usage: clipfind" in done.stdout
    assert [m for m in HEAVY if m in loaded] == []
