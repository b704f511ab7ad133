"""Where a library's metadata lives: the folder's SQLite file, or a PostgreSQL database.

The folder always holds the caches (FAISS, ONNX exports, thumbnails); the metadata is
`clipfind.db` beside them unless a PostgreSQL URL is given (`--db`, `$CLIPFIND_DB`).
A folder made with a URL remembers it in `database.json` (without the password), so later
commands find the database from `--library` alone, as they find the model: a forgotten
`--db` must not quietly start a second, empty SQLite library in the same folder.

Rules: a URL given now wins (and is remembered); else the remembered one; else SQLite.
A folder that already holds a SQLite library refuses a URL: one folder, one store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import LibraryError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine

# `postgres` (and with it SQLAlchemy) is imported only where a URL is in play: a query on a
# SQLite library asks `locate` and `exists` without paying for either.

DB_NAME = "clipfind.db"
POINTER_NAME = "database.json"


@dataclass(frozen=True)
class StoreLocation:
    """A library's database: `url` for PostgreSQL, else the SQLite file at `sqlite_path`."""

    sqlite_path: Path
    url: URL | None = None

    @property
    def is_postgres(self) -> bool:
        return self.url is not None

    @property
    def label(self) -> str:
        """What messages and `status` call it: the file, or the URL without its password."""
        from retrieval.store import postgres

        return postgres.safe(self.url) if self.url is not None else str(self.sqlite_path)

    @property
    def url_with_password(self) -> str | None:
        """For child processes (the web app's jobs), which must connect as this one did."""
        return self.url.render_as_string(hide_password=False) if self.url is not None else None

    def exists(self) -> bool:
        """Whether there is a library here to open (create=False commands ask this)."""
        return self.url is not None or self.sqlite_path.exists()

    def engine(self, readonly: bool = False) -> Engine:
        if self.url is not None:
            from retrieval.store import postgres

            return postgres.make_engine(self.url, readonly=readonly)
        from retrieval.store.schema import make_engine

        return make_engine(str(self.sqlite_path), readonly=readonly)

    def remember(self, root: Path) -> None:
        """Write the URL (no password) into the folder, atomically; quietly skip a read-only one."""
        if self.url is None:
            return
        from retrieval.store import postgres

        pointer = root / POINTER_NAME
        body = json.dumps({"url": postgres.safe(self.url)}) + "\n"
        try:
            if pointer.exists() and pointer.read_text() == body:
                return
            tmp = root / f".{POINTER_NAME}.tmp-{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            os.replace(tmp, pointer)
        except OSError:
            pass


def locate(root: Path, given: str | None) -> StoreLocation:
    """The store for the library folder `root`, given the URL from --db/$CLIPFIND_DB (or None)."""
    sqlite_path = root / DB_NAME
    remembered = _remembered(root)
    if given:
        from retrieval.store import postgres

        url = postgres.parse_url(given)
        if sqlite_path.exists() and remembered is None:
            raise LibraryError(
                f"the library at {root} keeps its metadata in {sqlite_path} (SQLite), not in "
                f"{postgres.safe(url)}; drop --db/$CLIPFIND_DB for it, or give another --library")
        return StoreLocation(sqlite_path, url)
    if remembered is not None:
        return StoreLocation(sqlite_path, remembered)
    return StoreLocation(sqlite_path)


def _remembered(root: Path) -> URL | None:
    pointer = root / POINTER_NAME
    try:
        data = json.loads(pointer.read_text())
    except (FileNotFoundError, NotADirectoryError):  # no pointer (or no folder yet)
        return None
    except (OSError, ValueError) as exc:
        raise LibraryError(f"cannot read {pointer}: {exc}; it should hold "
                           '{"url": "postgresql+psycopg://USER@HOST:PORT/DATABASE"}') from None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise LibraryError(f"{pointer} holds no database URL; it should hold "
                           '{"url": "postgresql+psycopg://USER@HOST:PORT/DATABASE"}')
    from retrieval.store import postgres

    return postgres.parse_url(data["url"])
