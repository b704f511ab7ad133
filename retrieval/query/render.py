"""Search results as a person or a pipe wants them: table, JSON lines, bare paths, HTML sheet.

Every function takes typed results (`retrieval.query.types.SearchResult`) and writes
to a stream, so the CLI, the server's client and a Python user share them.
Paths go to pipes as the raw bytes of the file name (a name that is not UTF-8
still opens); text outputs show such bytes as \\xNN.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.query.types import SearchResponse, SearchResult

THUMB_SIZE = 256


def shown_path(path: str) -> str:
    """A path that prints: names that are not UTF-8 show their bad bytes as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def table_path(path: str) -> str:
    """A path on one table row: control characters (a newline in a file name) escaped as
    \\n, \\t, \\xNN, so a name cannot split a row or move the terminal's cursor."""
    shown = shown_path(path)
    if shown.isprintable():
        return shown
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in shown)


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover - unreachable


def table(results: Sequence[SearchResult]) -> str:
    """rank, score, relevance, size, path: fixed columns first so paths of any length stay aligned."""
    if not results:
        return "no results\n"
    lines = [f"{'rank':>4}  {'score':>6}  {'relev':>5}  {'size':>9}  path"]
    for r in results:
        relevance = "    -" if r.relevance is None else f"{r.relevance:>5.2f}"
        lines.append(f"{r.rank:>4}  {r.score:>6.4f}  {relevance}  {human_size(r.size):>9}  {table_path(r.path)}")
    return "\n".join(lines) + "\n"


def json_lines(results: Iterable[SearchResult]) -> str:
    """One JSON object per result per line (jq, pandas.read_json(lines=True))."""
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in results)


def paths_bytes(results: Iterable[SearchResult], separator: bytes = b"\n") -> bytes:
    """Bare paths as file-name bytes, each followed by `separator` (b"\\0" for xargs -0)."""
    return b"".join(os.fsencode(r.path) + separator for r in results)


# -- HTML contact sheet --------------------------------------------------------------------
def thumbnail_data_uri(path: str, size: int = THUMB_SIZE) -> str:
    """A small JPEG of the image as a data: URI, so the sheet needs no other file."""
    from retrieval.media.images import open_image  # deferred: Pillow, only for --html

    image = open_image(path, draft_size=(size, size))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em;margin:0 0 .2em}
.meta{color:#666;margin:0 0 1em}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em .8em;margin:0 0 1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
.missing{height:120px;display:flex;align-items:center;justify-content:center;color:#a00;background:#f4f4f4}
figcaption{margin-top:6px;font-size:12px;word-break:break-all}
.score{font-weight:600}
"""


def html_sheet(response: SearchResponse, thumb_size: int = THUMB_SIZE) -> str:
    """One self-contained HTML page: every thumbnail inline (base64), scores and paths beside."""
    esc = html.escape
    cards = []
    for r in response.results:
        path = shown_path(r.path)
        try:
            image = f'<img src="{thumbnail_data_uri(r.path, thumb_size)}" alt="{esc(path)}">'
        except Exception as exc:  # a moved or broken file must not lose the rest of the sheet
            reason = str(exc) or type(exc).__name__
            image = f'<div class="missing">cannot show: {esc(reason)}</div>'
        dims = f" · {r.width}×{r.height}" if r.width and r.height else ""
        uri = Path(r.path).as_uri() if os.path.isabs(r.path) else esc(path)
        cards.append(
            f'<figure class="hit" data-rank="{r.rank}" data-score="{r.score:.6f}">{image}'
            f'<figcaption><span class="rank">#{r.rank}</span> '
            f'<span class="score">{r.score:.4f}</span>{dims} · {esc(human_size(r.size))}<br>'
            f'<a href="{esc(uri)}">{esc(path)}</a></figcaption></figure>'
        )
    warnings = "".join(f'<p class="warn">{esc(w)}</p>' for w in response.warnings)
    made = datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = (f"{len(response.results)} results from {response.library_size} images · "
            f"model: {esc(response.model)} · {made}")
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>clipfind: {esc(response.query)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{esc(response.query)}</h1><p class=\"meta\">{meta}</p>{warnings}"
        f"<div class=\"grid\">{''.join(cards) or '<p>no results</p>'}</div></body></html>\n"
    )


def write_html(response: SearchResponse, target: str | os.PathLike, thumb_size: int = THUMB_SIZE) -> Path:
    """Write the sheet atomically (temp file + rename) so a browser never sees half of it."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(html_sheet(response, thumb_size), encoding="utf-8")
    os.replace(tmp, target)
    return target


def write_output(response: SearchResponse, fmt: str, stream: IO[bytes]) -> None:
    """Render `response` as `fmt` (table, json, paths, paths0) onto a binary stream."""
    if fmt == "table":
        data = table(response.results).encode("utf-8")
    elif fmt == "json":
        data = json_lines(response.results).encode("utf-8")
    elif fmt == "paths":
        data = paths_bytes(response.results, b"\n")
    elif fmt == "paths0":
        data = paths_bytes(response.results, b"\0")
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    stream.write(data)
    stream.flush()
