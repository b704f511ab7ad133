"""What the web app holds while it runs: the library, its warm searcher, the token, a lock.

One `ServeState` per server. The searcher (torch, the FAISS id selector, the
text cache) is not thread-safe, so every search goes through `search_lock`;
page reads that need no model use `reader`, a read-only connection pool (SQLite
mode=ro, or PostgreSQL read-only transactions), so they never wait for a search and never write (SQLite WAL lets them
read while an `index` run commits).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine

from retrieval.serve import catalog
from retrieval.serve.jobs import Jobs
from retrieval.serve.thumbs import ThumbnailCache
from retrieval.serve.uploads import Uploads

if TYPE_CHECKING:
    from retrieval.query.search import Searcher
    from retrieval.store.library import Library

MAX_JSON_BODY = 1 << 20  # JSON requests are small; anything bigger is a mistake or an attack
MAX_UPLOAD_BYTES = 25 << 20  # one photo from a phone or camera
MAX_UPLOAD_PIXELS = 60_000_000  # a 48-MP phone photo fits; decompression bombs do not


def read_only_engine(db_path: Path) -> Engine:
    """SQLite opened with mode=ro: the web pages can never write the library by mistake."""
    engine = create_engine(f"sqlite:///file:{db_path}?mode=ro&uri=true",
                           connect_args={"uri": True, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        dbapi_conn.execute("PRAGMA query_only=ON")

    return engine


@dataclass
class ServeState:
    library: Library
    searcher: Searcher
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    started: float = field(default_factory=time.time)
    queries: int = 0
    search_lock: threading.Lock = field(default_factory=threading.Lock)
    reader: Engine | None = None
    thumbs: ThumbnailCache = field(init=False)
    uploads: Uploads = field(init=False)
    jobs: Jobs = field(init=False)

    def __post_init__(self) -> None:
        # The searcher takes this lock around the model and the index only, never while it
        # reads or decodes a query image, so one slow or hostile file stalls no other query.
        self.searcher.lock = self.search_lock
        if self.reader is None:  # PostgreSQL: read-only transactions, enforced by the server
            self.reader = (self.library.store.engine(readonly=True) if self.library.store.is_postgres
                           else read_only_engine(self.library.db_path))
        self.thumbs = ThumbnailCache(self.library.root)
        self.uploads = Uploads(self.library.root, MAX_UPLOAD_PIXELS)
        self.jobs = Jobs(self.library.root, self.library.store.url_with_password)

    @property
    def root(self) -> Path:
        return self.library.root

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.reader.connect() as conn:
            yield conn

    def search(self, query, k: int, filters=None):
        """Searcher.search; it holds `search_lock` around the model and the index (torch and
        the FAISS selector are not thread-safe), not around reading query images."""
        self.queries += 1
        return self.searcher.search(query, k, filters)

    def similar(self, path: str, k: int, filters=None):
        self.queries += 1
        return self.searcher.similar(path, k, filters)

    def count_images(self) -> int:
        with self.read() as conn:
            return int(conn.execute(text("SELECT count(*) FROM images")).scalar_one())

    def freshness(self) -> dict:
        """How many rows the server's in-memory index covers, against the database right now."""
        vectors = self.library.vectors(sync=False)  # the searcher's own copy; not loaded here
        in_index = int(vectors.index.ntotal) if vectors.index is not None else 0
        rows = self.count_images()
        return {"images": rows, "in_server_index": in_index, "fresh": in_index == rows}

    def status(self) -> dict:
        """`clipfind status`, plus what only the server knows (freshness, random weights, skipped files)."""
        from retrieval.index.inspection import library_status

        data = library_status(self.library)
        data["random_weights"] = self.searcher.random_weights
        data["freshness"] = self.freshness()
        with self.read() as conn:
            data["skipped_files"] = catalog.skipped(conn, 100)
            data["runs"] = catalog.runs(conn, 10)
        data["queries"] = self.queries
        running = self.jobs.running()
        data["running_job"] = running.to_dict(data["images"]) if running else None
        return data

    def close(self) -> None:
        self.jobs.stop_all()
        self.reader.dispose()
