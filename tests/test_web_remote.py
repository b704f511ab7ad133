"""Rows indexed from fsspec URLs in the web app, over real HTTP on 127.0.0.1: thumbnails,
originals, the photo page and "search with this" read the object through fsspec, with the
refusals a local file gets (gone: 404, changed since indexing: 409), a size cap (413) and one
line, not a traceback, when the server has no backend for the URL's protocol.

The library (`tests/webapp.build_url_library`) holds local files, `file://` URL rows,
`memory://` URL rows (fsspec's in-process store: the server runs in a thread of this process)
and the members of a zip file (`zip://photos/a.jpg::file:///.../photos.zip`).
"""

from __future__ import annotations

import importlib.util
import io
import re
import sqlite3

import fsspec
import httpx
import pytest
from PIL import Image

from retrieval.serve import files
from tests.webapp import TOKEN, url_lib_fixture, url_web_fixture  # noqa: F401 - fixtures

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(url_web):
    with httpx.Client(base_url=url_web.url, headers=AUTH, timeout=30) as c:
        yield c


def ids_by_path(lib) -> dict[str, int]:
    with sqlite3.connect(lib / "clipfind.db") as db:
        return {path: row_id for row_id, path in db.execute("SELECT id, path FROM images")}


def url_rows(url_lib, scheme: str) -> list[tuple[str, int]]:
    lib, sources = url_lib
    ids = ids_by_path(lib)
    rows = sorted((url, ids[url]) for url in sources if url.startswith(scheme))
    assert len(rows) >= 2, (scheme, sorted(ids))
    return rows


@pytest.mark.parametrize("scheme", ["file://", "memory://", "zip://"])
def test_thumbnail_original_and_photo_page_of_url_rows(url_lib, client, scheme):
    lib, sources = url_lib
    url, row_id = url_rows(url_lib, scheme)[0]
    thumb = client.get(f"/thumb/{row_id}", params={"size": "small"})
    assert thumb.status_code == 200, thumb.text
    assert thumb.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(thumb.content)).size[0] > 0
    original = client.get(f"/image/{row_id}")
    assert original.status_code == 200, original.text
    assert original.content == sources[url].read_bytes()
    assert original.headers["content-type"] == "image/jpeg"
    page = client.get(f"/photo/{row_id}")
    assert page.status_code == 200 and url in page.text
    assert 'class="error"' not in page.text  # similar photos found, from the stored vector
    assert page.text.count('class="hit"') >= 3
    search_with = client.get("/", params={"img": row_id})
    assert search_with.status_code == 200, search_with.text
    first = search_with.text.index('class="hit"')
    assert f'data-id="{row_id}"' in search_with.text[first:first + 200]
    api = client.post("/similar", json={"path": url, "k": 3})
    assert api.status_code == 200 and url not in [r["path"] for r in api.json()["results"]]


def test_status_page_with_url_rows_offers_the_local_folder(url_lib, client):
    page = client.get("/status")
    assert page.status_code == 200, page.text[:300]
    assert f'value="{url_lib[0].parent / "photos" / "local"}"' in page.text


def test_a_changed_or_deleted_memory_object_is_refused(url_lib, client):
    (changed, changed_id), (deleted, deleted_id) = url_rows(url_lib, "memory://")[:2]
    memory = fsspec.filesystem("memory")
    path = changed[len("memory://"):]
    before = memory.cat_file(path)
    memory.pipe(path, before + b"\0")  # the same picture, one byte longer: not what was indexed
    try:
        for target in (f"/image/{changed_id}", f"/thumb/{changed_id}?size=large"):
            reply = client.get(target)
            assert reply.status_code == 409 and "changed since it was indexed" in reply.json()["error"]
    finally:
        memory.pipe(path, before)
    gone = deleted[len("memory://"):]
    kept = memory.cat_file(gone)
    memory.rm(gone)
    try:
        for target in (f"/image/{deleted_id}", f"/thumb/{deleted_id}?size=large", f"/photo/{deleted_id}"):
            reply = client.get(target)
            if target.startswith("/photo"):  # the page itself comes from the database; its image 404s
                assert reply.status_code == 200
                continue
            assert reply.status_code == 404 and "gone" in reply.json()["error"]
    finally:
        memory.pipe(gone, kept)


def test_a_deleted_file_url_is_404_and_a_big_object_413(url_lib, client, monkeypatch):
    lib, sources = url_lib
    (url, row_id), (big_url, big_id) = url_rows(url_lib, "file://")[:2]
    moved = sources[url].with_suffix(".moved")
    sources[url].rename(moved)
    try:
        reply = client.get(f"/image/{row_id}")
        assert reply.status_code == 404 and "gone" in reply.json()["error"]
    finally:
        moved.rename(sources[url])
    assert client.get(f"/image/{row_id}").status_code == 200
    assert client.get("/file/" + url).status_code in (400, 404)  # /file/ names local paths only
    monkeypatch.setattr(files, "MAX_OBJECT_BYTES", sources[big_url].stat().st_size - 1)
    for target in (f"/image/{big_id}", f"/thumb/{big_id}?size=large"):
        reply = client.get(target)
        assert reply.status_code == 413 and "larger than the server reads" in reply.json()["error"]


def test_a_url_whose_backend_is_missing_is_one_line(url_lib, client):
    """A row indexed elsewhere from a store this server has no backend for (or an unknown one)."""
    missing = next((p for p, module in (("s3", "s3fs"), ("gcs", "gcsfs"), ("abfs", "adlfs"))
                    if importlib.util.find_spec(module) is None), None)
    lib, _ = url_lib
    url, row_id = url_rows(url_lib, "memory://")[-1]
    protocols = ([missing] if missing else []) + ["nosuchproto"]
    with sqlite3.connect(lib / "clipfind.db") as db:
        try:
            for protocol in protocols:
                db.execute("UPDATE images SET path = ? WHERE id = ?", (f"{protocol}://bucket/a.jpg", row_id))
                db.commit()
                reply = client.get(f"/image/{row_id}")
                assert reply.status_code == 501, reply.text
                detail = reply.json()["error"]
                assert "cannot read the object" in detail and "\n" not in detail and "Traceback" not in detail
        finally:
            db.execute("UPDATE images SET path = ? WHERE id = ?", (url, row_id))
            db.commit()


def test_folder_filter_and_facets_take_url_prefixes(url_lib, client):
    lib, sources = url_lib
    memory = dict(url_rows(url_lib, "memory://"))
    prefix = next(iter(memory)).rsplit("/", 2)[0]  # memory:///web-XXXX, above one folder per label
    page = client.get("/", params={"q": "a shape", "folder": prefix})
    assert page.status_code == 200, page.text[:300]
    assert {int(i) for i in re.findall(r'class="hit"[^>]*data-id="(\d+)"', page.text)} == set(memory.values())
    everything = client.get("/", params={"q": "a shape"}).text
    one = next(iter(memory)).rsplit("/", 1)[0]
    assert f'title="{one}"' in everything  # the sidebar's folder of a URL row is its URL prefix


def test_the_folder_of_a_chained_url_is_in_its_inner_path():
    from retrieval.serve.catalog import folder_of

    assert folder_of("zip://photos/a.jpg::file:///x.zip") == "zip://photos::file:///x.zip"
    assert folder_of("/data/a::b/c.jpg") == "/data/a::b" and folder_of("s3://b/p/c.jpg") == "s3://b/p"
