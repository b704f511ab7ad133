"""How a file's path is stored in a row and read back, without numpy or SQLAlchemy.

Apart from `rows` (numpy, for embeddings) so that walking and diffing a folder
(`retrieval.index.planner`, which an unchanged `clipfind index` re-run runs on
stdlib alone) stores and compares paths by the same rules as every writer.
"""

from __future__ import annotations

import os


def path_to_db(path: str) -> tuple[str, bytes | None]:
    """Store a filesystem path: valid UTF-8 as text, anything else also as raw bytes.

    SQLite text must be valid UTF-8, but Linux file names are bytes. The text
    column keeps a readable, unique form; `path_bytes` keeps the real name.
    """
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def path_from_db(path: str, path_bytes: bytes | None) -> str:
    """The string to hand to `open()` for a stored path."""
    return os.fsdecode(bytes(path_bytes)) if path_bytes is not None else path
