"""Text-embedding cache: a repeated query never runs the text tower twice.

Two levels. An in-process LRU holds the hot set (what a warm `clipfind serve`
answers from); under it a small SQLite file beside the library
(`textcache.db`) keeps vectors across processes, so a repeated query from a
fresh CLI process skips loading the model altogether. A key hashes the
library's model fingerprint, the exact templates and the text, so a changed
model or template file can never return a stale vector.

The file is only a cache: if it cannot be created (read-only library),
is corrupt or busy, lookups miss and the vector is computed as if it were
not there.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_NAME = "textcache.db"
MEMORY_ENTRIES = 4096
DISK_ENTRIES = 50_000  # ~15 MB at 64-d, ~100 MB at 512-d; pruned oldest-first beyond this


@dataclass(frozen=True)
class CachedText:
    vector: np.ndarray  # unit float32
    tokens: int  # tokens of the longest prompted text, so truncation warnings survive a hit
    context: int  # tokens the model reads


def cache_key(fingerprint: str, templates: Sequence[str] | None, text: str) -> str:
    """Stable key for one phrase under one template set (None: encoded raw)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(fingerprint.encode())
    digest.update(b"\x00raw" if templates is None else b"\x00" + "\x1f".join(templates).encode())
    digest.update(b"\x00" + text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class TextCache:
    """LRU in memory over an optional SQLite file; thread-safe (the server shares one)."""

    def __init__(self, path: Path | None, memory_entries: int = MEMORY_ENTRIES,
                 disk_entries: int = DISK_ENTRIES) -> None:
        self.path = Path(path) if path is not None else None
        self.memory_entries = memory_entries
        self.disk_entries = disk_entries
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, CachedText] = OrderedDict()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._disk_failed = self.path is None
        self._puts = 0

    # -- disk ------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection | None:
        if self._conn is not None or self._disk_failed:
            return self._conn
        try:
            _create_private(self.path)
            conn = sqlite3.connect(str(self.path), timeout=0.5, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")  # with NORMAL sync: no fsync per insert
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS text_vectors (key TEXT PRIMARY KEY, "
                         "vector BLOB NOT NULL, tokens INTEGER NOT NULL, context INTEGER NOT NULL, "
                         "added REAL NOT NULL)")
        except (sqlite3.Error, OSError):
            self._disk_failed = True
            return None
        self._conn = conn
        return conn

    def _disk_get(self, key: str) -> CachedText | None:
        conn = self._db()
        if conn is None:
            return None
        try:
            row = conn.execute("SELECT vector, tokens, context FROM text_vectors WHERE key = ?",
                               (key,)).fetchone()
        except sqlite3.Error:
            return None
        if row is None:
            return None
        return CachedText(np.frombuffer(row[0], dtype=np.float32).copy(), int(row[1]), int(row[2]))

    def _disk_put(self, key: str, entry: CachedText) -> None:
        conn = self._db()
        if conn is None:
            return
        try:
            conn.execute("INSERT OR REPLACE INTO text_vectors VALUES (?, ?, ?, ?, ?)",
                         (key, entry.vector.astype(np.float32).tobytes(), entry.tokens, entry.context,
                          time.time()))
            self._puts += 1
            if self._puts % 500 == 0:
                conn.execute("DELETE FROM text_vectors WHERE key NOT IN "
                             "(SELECT key FROM text_vectors ORDER BY added DESC LIMIT ?)",
                             (self.disk_entries,))
        except sqlite3.Error:
            pass  # busy or read-only: the memory level still works

    # -- API -------------------------------------------------------------------------
    def get(self, key: str) -> CachedText | None:
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
            else:
                entry = self._disk_get(key)
                if entry is not None:
                    self._remember(key, entry)
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
            return entry

    def put(self, key: str, entry: CachedText) -> None:
        with self._lock:
            self._remember(key, entry)
            self._disk_put(key, entry)

    def _remember(self, key: str, entry: CachedText) -> None:
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _create_private(path: Path) -> None:
    """Make the cache file 0600 before SQLite does (its -wal and -shm copy that mode):
    it holds every text this library was asked, which is nobody else's business."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
