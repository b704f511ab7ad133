"""Shared fixtures: the tiny open_clip model the suite trains for itself.

Why: no pretrained weights can be downloaded here (docs/offline.md), so tests
that need a real, aligned CLIP model use one trained on drawn shapes.  It is
cached under $CLIPFIND_CACHE (else ~/.cache/clipfind) and keyed by the source
of its generator and trainer, so only the first run (or one after editing
them) pays the ~30-60 s of training; concurrent pytest processes share it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from retrieval.devmodels.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the tiny shapes model, in open_clip's local-dir layout."""
    return ensure_tiny_model()


# -- the store: SQLite (the default) or PostgreSQL ---------------------------------------------
@pytest.fixture(scope="session")
def pg_server():
    """One throw-away PostgreSQL server for the session (tests/pg_server.py); skipped when this
    machine cannot start one, unless $CLIPFIND_REQUIRE_POSTGRES=1 (CI), where that fails."""
    from tests.pg_server import REQUIRE_ENV, PostgresServer, ServerUnavailable

    try:
        import psycopg  # noqa: F401
    except ImportError:
        problem = "psycopg is not installed (pip install 'clipfind[postgres]')"
    else:
        try:
            server = PostgresServer().start()
        except (ServerUnavailable, OSError, subprocess.SubprocessError) as exc:
            problem = f"cannot start a PostgreSQL server: {exc}"
        else:
            yield server
            server.stop()
            return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(problem)
    pytest.skip(problem)


STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=STORES)
def store(request, monkeypatch) -> str | None:
    """Run the test on each store: None for SQLite, else the URL of a fresh PostgreSQL database,
    also put in $CLIPFIND_DB so every library the test opens (CLI and subprocesses too) uses it."""
    if request.param == "sqlite":
        monkeypatch.delenv("CLIPFIND_DB", raising=False)
        return None
    url = request.getfixturevalue("pg_server").database()
    monkeypatch.setenv("CLIPFIND_DB", url)
    return url


@pytest.fixture(scope="module", params=STORES)
def module_store(request) -> str | None:
    """`store` for a module whose fixtures build one library and copy it per test: None for
    SQLite, else a database to build in (tests copy it with `copy_database`)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_server").database()


@pytest.fixture
def copy_store(request, monkeypatch):
    """copy_store(module_store) -> the store a test's copy of the module's library uses:
    None (SQLite: copying the folder copies the database), or a PostgreSQL copy of the
    database (CREATE DATABASE ... TEMPLATE), put in $CLIPFIND_DB like `store` does."""
    def copy(source: str | None) -> str | None:
        if source is None:
            monkeypatch.delenv("CLIPFIND_DB", raising=False)
            return None
        from tests.pg_server import database_name

        url = request.getfixturevalue("pg_server").database(template=database_name(source))
        monkeypatch.setenv("CLIPFIND_DB", url)
        return url
    return copy


@pytest.fixture
def new_database(request):
    """new_database(store) -> a fresh, empty database on the test's store (None for SQLite,
    whose fresh database is a new folder), for tests that open a second library."""
    def make(store: str | None) -> str | None:
        return request.getfixturevalue("pg_server").database() if store else None
    return make
