"""`clipfind backup DEST`: a consistent copy of a library to restore from.

The database is copied with SQLite's online backup API (page by page inside a
read transaction, so what lands is one consistent snapshot even in WAL mode,
never a file caught halfway through a write), checked page by page, and the
FAISS files are copied beside it. All of it goes into a hidden folder next to
DEST that is renamed to DEST only when complete: DEST either is a whole
backup or does not exist. The write lock is held throughout so the FAISS files
match the database; a damaged library is refused (a backup of damage is no
backup). To restore, stop anything using the library and put DEST's files in
its place: the copy keeps the library's identity, so its FAISS files are used
as they are.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

from retrieval.errors import LibraryError
from retrieval.store.integrity import DamagedDatabase, library_error_for, one_line
from retrieval.store.library import DB_NAME, Library

CACHE_FILES = ("index.faiss", "index.json")  # the derived FAISS cache, worth keeping with the copy


def backup_library(library: Library, destination: str | os.PathLike, wait: bool = False) -> dict:
    """Copy `library` to the new folder `destination`, atomically; returns what was copied."""
    dest = Path(destination).expanduser().absolute()
    if dest.exists():
        raise LibraryError(f"{dest} already exists; give the backup a new folder name")
    if not dest.parent.is_dir():
        raise LibraryError(f"cannot write a backup into {dest.parent}: no such folder")
    if library.store.is_postgres:
        raise LibraryError(f"`clipfind backup` copies a SQLite library; this one's metadata is in "
                           f"{library.store.label}: back that up with pg_dump (the folder holds only "
                           "caches, rebuilt from it)")
    started = time.perf_counter()
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    with library.write_lock(wait=wait):
        try:
            tmp.mkdir()
            _copy_database(library.db_path, tmp / DB_NAME)
            copied = [name for name in CACHE_FILES if (library.root / name).exists()]
            for name in copied:
                shutil.copyfile(library.root / name, tmp / name)
            for path in tmp.iterdir():
                _fsync(path)
            os.rename(tmp, dest)
            _fsync(dest.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LibraryError(f"cannot write the backup to {dest}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {"library": str(library.root), "backup": str(dest), "images": library.image_count(),
            "database_bytes": os.path.getsize(dest / DB_NAME), "index_files": copied,
            "seconds": round(time.perf_counter() - started, 3)}


def _copy_database(source: Path, target: Path) -> None:
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst, pages=1024)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        verdict = [r[0] for r in dst.execute("PRAGMA quick_check(5)")]
    except sqlite3.Error as exc:
        raise (library_error_for(exc) or LibraryError(f"cannot copy the database: {exc}")) from None
    finally:
        dst.close()
        src.close()
    if verdict != ["ok"]:
        raise DamagedDatabase(one_line(verdict))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
