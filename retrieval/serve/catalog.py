"""Read-only facts for the pages: one image, its tags, tag counts, recent images, skipped files.

Plain SQL on the server's read-only connection (`ServeState.read`): nothing
here loads the model or waits for a search, and nothing can write.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text

from retrieval.store.schema import path_from_db
from retrieval.store.sql import chained_url_parts

_IMAGE_COLUMNS = "id, path, path_bytes, size, width, height, format, taken_at, mtime_ns, content_hash"


@dataclass
class ImageRow:
    id: int
    path: str  # as open() wants it
    size: int
    width: int | None
    height: int | None
    format: str | None
    taken_at: datetime | None
    mtime_ns: int
    content_hash: str

    @property
    def when(self) -> datetime:
        """Taken (EXIF), else modified: the date the filters use."""
        return self.taken_at or datetime.fromtimestamp(self.mtime_ns / 1e9)

    @property
    def shown_path(self) -> str:
        return os.fsencode(self.path).decode("utf-8", "backslashreplace")

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.shown_path, "size": self.size, "width": self.width,
                "height": self.height, "format": self.format, "date": self.when.isoformat(timespec="seconds"),
                "taken_at": self.taken_at.isoformat() if self.taken_at else None}


def _row(r) -> ImageRow:
    taken = r.taken_at
    if isinstance(taken, str):
        taken = datetime.fromisoformat(taken)
    return ImageRow(r.id, path_from_db(r.path, r.path_bytes), r.size, r.width, r.height, r.format,
                    taken, r.mtime_ns, r.content_hash)


def image(conn, image_id: int) -> ImageRow | None:
    r = conn.execute(text(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = :i"), {"i": image_id}).first()
    return _row(r) if r else None


def images(conn, ids: list[int]) -> dict[int, ImageRow]:
    if not ids:
        return {}
    marks = ",".join(str(int(i)) for i in ids)
    rows = conn.execute(text(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN ({marks})")).all()
    return {r.id: _row(r) for r in rows}


def image_by_path(conn, stored_path: str) -> ImageRow | None:
    r = conn.execute(text(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE path = :p"), {"p": stored_path}).first()
    return _row(r) if r else None


def tags_of(conn, image_id: int) -> list[dict]:
    rows = conn.execute(text(
        "SELECT r.name AS run, t.label, t.score, t.rank FROM tags t JOIN tag_runs r ON r.id = t.tag_run_id "
        "WHERE t.image_id = :i ORDER BY r.name, t.rank"), {"i": image_id}).all()
    return [{"run": r.run, "label": r.label, "score": round(float(r.score), 4), "rank": r.rank} for r in rows]


def tag_counts(conn) -> list[tuple[str, int]]:
    """Every tag label and on how many images it is, most used first."""
    rows = conn.execute(text("SELECT label, count(DISTINCT image_id) AS n FROM tags GROUP BY label "
                             "ORDER BY n DESC, label")).all()
    return [(r.label, int(r.n)) for r in rows]


def tagged(conn, label: str, limit: int, offset: int = 0) -> list[tuple[ImageRow, float]]:
    """Images carrying `label`, best score first."""
    rows = conn.execute(text(
        f"SELECT {', '.join('i.' + c.strip() for c in _IMAGE_COLUMNS.split(','))}, max(t.score) AS score "
        "FROM tags t JOIN images i ON i.id = t.image_id WHERE t.label = :l GROUP BY i.id "
        "ORDER BY score DESC, i.id LIMIT :n OFFSET :o"), {"l": label, "n": limit, "o": offset}).all()
    return [(_row(r), float(r.score)) for r in rows]


def recent(conn, limit: int) -> list[ImageRow]:
    rows = conn.execute(text(f"SELECT {_IMAGE_COLUMNS} FROM images ORDER BY id DESC LIMIT :n"),
                        {"n": limit}).all()
    return [_row(r) for r in rows]


def skipped(conn, limit: int) -> list[dict]:
    rows = conn.execute(text("SELECT path, kind, message, at FROM errors ORDER BY id DESC LIMIT :n"),
                        {"n": limit}).all()
    return [{"path": r.path, "kind": r.kind, "message": r.message, "at": str(r.at)} for r in rows]


def runs(conn, limit: int) -> list[dict]:
    rows = conn.execute(text("SELECT id, kind, status, started_at, finished_at, precision, stats FROM runs "
                             "ORDER BY id DESC LIMIT :n"), {"n": limit}).mappings().all()
    out = []
    for r in rows:
        stats = r["stats"]
        stats = json.loads(stats) if isinstance(stats, str) else (stats or {})
        out.append({**dict(r), "stats": stats if isinstance(stats, dict) else {}})
    return out


def folders(conn, limit: int = 200) -> list[tuple[str, int]]:
    """The folders images sit in, with counts (the biggest `limit`)."""
    rows = conn.execute(text("SELECT path FROM images")).scalars()
    counts = Counter(folder_of(p) for p in rows)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


def common_root(conn) -> str | None:
    """The deepest folder holding every indexed local image (the default for a new index run).

    Rows indexed from URLs (`s3://...`) are left out: a URL and a path have no common folder."""
    lo, hi = conn.execute(text("SELECT min(path), max(path) FROM images WHERE substr(path, 1, 1) = '/'")).one()
    if lo is None:
        return None
    return os.path.commonpath([os.path.dirname(lo), os.path.dirname(hi)])


def folder_of(path: str) -> str:
    """The folder a path or URL is in; a chained URL's is in its inner path, which comes first
    (`zip://photos/a.jpg::file:///x.zip` is in `zip://photos::file:///x.zip`)."""
    chained = chained_url_parts(path)
    if chained:
        return os.path.dirname(chained[0]) + chained[1]
    return os.path.dirname(path)


def facet_counts(rows: list[ImageRow], tags_by_id: dict[int, list[str]]) -> dict[str, list[tuple[str, int]]]:
    """How the current results spread over folders and tags (the filter sidebar's counts)."""
    by_folder = Counter(folder_of(r.shown_path) for r in rows)
    by_tag = Counter(label for r in rows for label in set(tags_by_id.get(r.id, ())))
    return {"folders": by_folder.most_common(30), "tags": by_tag.most_common(30)}


def labels_by_image(conn, ids: list[int]) -> dict[int, list[str]]:
    if not ids:
        return {}
    marks = ",".join(str(int(i)) for i in ids)
    out: dict[int, list[str]] = {}
    for image_id, label in conn.execute(text(f"SELECT image_id, label FROM tags WHERE image_id IN ({marks})")):
        out.setdefault(image_id, []).append(label)
    return out
