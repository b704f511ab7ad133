"""Plain SQL on a library's database, whichever store holds it, for tests that check what a
command wrote without asking the code under test.

Which database: the URL given, else $CLIPFIND_DB (what the `store` and `copy_store` fixtures
set, and what the CLI itself reads), else the folder's SQLite file.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, text

from retrieval.store.library import DB_NAME


def sql(lib: str | Path, statement: str, url: str | None = None, **params) -> list:
    """The rows of one statement (committed, for a write), on a connection of its own."""
    url = url or os.environ.get("CLIPFIND_DB") or f"sqlite:///{Path(lib) / DB_NAME}"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return result.all() if result.returns_rows else []
    finally:
        engine.dispose()


def scalar(lib: str | Path, statement: str, url: str | None = None, **params):
    return sql(lib, statement, url, **params)[0][0]
