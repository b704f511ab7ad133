"""SQL fragments every floor needs the same way: rows under a folder, ids in bounded chunks.

Why here: each was written out in several modules (planner, search, indexer,
verify), and the folder test in particular is easy to get subtly wrong (LIKE
treats `_` and `%` in file names as wildcards; a bare prefix matches
`/photos2` for `/photos`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

T = TypeVar("T")

IN_CHUNK = 500  # values per `IN (...)`: far below SQLite's bound-parameter limit, on any build


def in_chunks(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[list[T]]:
    """Consecutive slices of `values`, each small enough for one `IN (...)` list."""
    values = list(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def under_folder(folder: str, column: str = "path", name: str = "folder") -> tuple[str, dict]:
    """(WHERE clause, parameters): `column` is `folder` itself or a path inside it.

    A prefix compare with substr(), not LIKE: file names may hold `_` and `%`.
    `name` keeps the parameters of two such clauses in one statement apart.
    A chained fsspec URL names its inner path first (`zip://photos::file:///x.zip` holds
    `zip://photos/a.jpg::file:///x.zip`), so its rows share a prefix *and* a suffix.
    """
    chained = chained_url_parts(folder)
    if chained:
        return _under_chained(chained[0], chained[1], column, name)
    exact = folder.rstrip("/") or "/"
    prefix = exact.rstrip("/") + "/"
    clause = f"({column} = :{name} OR substr({column}, 1, :{name}_n) = :{name}_prefix)"
    return clause, {name: exact, f"{name}_n": len(prefix), f"{name}_prefix": prefix}


def chained_url_parts(path: str) -> tuple[str, str] | None:
    """(inner URL, "::rest") of a chained fsspec URL (`zip://photos/a.jpg::file:///x.zip`), else
    None: a local path may hold "::" too."""
    head, sep, chain = path.partition("::")
    if sep and "://" in head and not path.startswith("/"):
        return head, sep + chain
    return None


def _under_chained(head: str, chain: str, column: str, name: str) -> tuple[str, dict]:
    scheme, _, inner = head.partition("://")
    inner = inner.rstrip("/")
    head, prefix = f"{scheme}://{inner}", f"{scheme}://{inner}/" if inner else f"{scheme}://"
    clause = (f"({column} = :{name} OR (substr({column}, 1, :{name}_n) = :{name}_prefix "
              f"AND length({column}) > :{name}_least "
              f"AND substr({column}, length({column}) - :{name}_m + 1) = :{name}_chain))")
    return clause, {name: head + chain, f"{name}_n": len(prefix), f"{name}_prefix": prefix,
                    f"{name}_least": len(prefix) + len(chain), f"{name}_m": len(chain), f"{name}_chain": chain}


def driver_sql(dbapi_conn, statement: str) -> str:
    """A `?`-placeholder statement for a raw driver connection: sqlite3 takes `?`, psycopg `%s`.

    Why raw at all: bulk paths (tagging a million images) skip SQLAlchemy's per-row cost."""
    return statement.replace("?", "%s") if type(dbapi_conn).__module__.startswith("psycopg") else statement


def delete_images(session: Session, ids: Iterable[int]) -> None:
    """Delete these image rows (their tags and vector-log entries follow by trigger/cascade)."""
    from sqlalchemy import delete  # writers only: a query imports this module without SQLAlchemy

    from retrieval.store.schema import Image

    for part in in_chunks(sorted(ids)):
        session.execute(delete(Image).where(Image.id.in_(part)))
