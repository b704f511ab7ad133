"""The web app's JSON API and files, over real HTTP on 127.0.0.1 (httpx, and raw sockets where a
client library would refuse to send the bad request). Each hostile request must be refused.

Tests of what the server reads or writes in the library run on both stores (`store_web`,
`store_client`); tests of HTTP itself (framing, bodies, connections, the token) on SQLite only."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from sqlalchemy import text as sql_text

from retrieval.serve.state import MAX_JSON_BODY, MAX_UPLOAD_BYTES
from tests.store_sql import scalar
from tests.webapp import (  # noqa: F401 - fixtures
    TOKEN,
    pg_web_fixture,
    store_web_fixture,
    wait_for,
    web_fixture,
    web_lib_fixture,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(web):
    with httpx.Client(base_url=web.url, headers=AUTH, timeout=30) as c:
        yield c


@pytest.fixture
def store_client(store_web):
    with httpx.Client(base_url=store_web.url, headers=AUTH, timeout=30) as c:
        yield c


def raw(web, data: bytes, read_for: float = 3.0) -> bytes:
    """Send bytes on one fresh connection; everything the server answers until it closes or goes quiet."""
    host, port = web.socket.getsockname()[:2]
    with socket.create_connection((host, port), timeout=read_for) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def raw_get(web, target: str) -> tuple[int, bytes]:
    reply = raw(web, f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Connection: close\r\n\r\n".encode())
    return int(reply.split(b" ", 2)[1]), reply


def post_raw(body: bytes, extra: str = "", path: str = "/search") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode() + body


def image_id(client, name_part: str) -> int:
    hits = client.post("/search", json={"text": "a shape", "k": 100}).json()["results"]
    return next(r["image_id"] for r in hits if name_part in r["path"])


# -- the API the CLI uses, and its schema ---------------------------------------------------
def test_search_similar_and_openapi(store_client):
    client = store_client
    got = client.post("/search", json={"text": "red circle", "k": 5}).json()
    assert len(got["results"]) == 5 and "red_circle" in got["results"][0]["path"]
    assert got["results"] == sorted(got["results"], key=lambda r: -r["score"])
    same = client.get("/search", params={"q": "red circle", "k": 5}).json()
    assert [r["path"] for r in same["results"]] == [r["path"] for r in got["results"]]
    like = client.post("/similar", json={"path": got["results"][0]["path"], "k": 3}).json()
    assert got["results"][0]["path"] not in [r["path"] for r in like["results"]]
    schema = client.get("/openapi.json").json()
    assert {"/search", "/similar", "/health", "/api/upload", "/api/jobs"} <= set(schema["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()  # works offline


@pytest.mark.parametrize("body, says", [
    ({"text": 5}, "text"),
    ({"text": "x", "filters": "x"}, "filters must be an object"),
    ({"text": "x", "filters": {"after": "garbage"}}, "filters.after must be a date"),
    ({"text": "x", "filters": {"min_score": "nan"}}, "filters.min_score"),
    ({"text": "x", "template": []}, "template"),
    ({"text": "x", "k": "many"}, "k must be an integer"),
    ({"text": "x", "k": 0}, "k"),
    ({"query": {"positive": [{"kind": "text", "value": "x", "weight": 1e39}]}}, "weight"),
    ({"text": "x", "template": "/etc/passwd"}, "template"),
    ({"text": "x", "surprise": 1}, "surprise is not a known field"),
])
def test_wrong_types_are_400_with_a_message(client, body, says):
    reply = client.post("/search", json=body)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"] and reply.json()["exit_code"] == 5


def test_deep_json_and_non_json_are_400(client):
    deep = b"[" * 100_000 + b"]" * 100_000
    reply = client.post("/search", content=deep, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and "nests deeper" in reply.json()["error"]
    reply = client.post("/search", content=b"{not json")
    assert reply.status_code == 400 and "not JSON" in reply.json()["error"]
    assert client.get("/health").json()["ok"]


# -- bodies: size, framing, smuggling ----------------------------------------------------------
def test_declared_too_large_body_is_refused_unread(web):
    reply = raw(web, post_raw(b"", f"Content-Length: {64 << 20}\r\n"))
    assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()


def test_negative_or_bad_content_length_is_refused(web):
    for value in ("-1", "abc", "1, 2"):
        reply = raw(web, post_raw(b'{"text": "x"}', f"Content-Length: {value}\r\n"))
        assert reply.startswith(b"HTTP/1.1 400"), (value, reply[:200])
        assert reply.count(b"HTTP/1.1 ") == 1


def test_chunked_body_over_the_limit_is_refused(web):
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_JSON_BODY // len(chunk) + 2))
    reply = raw(web, post_raw(body + b"0\r\n\r\n", "Transfer-Encoding: chunked\r\n"))
    assert reply.startswith(b"HTTP/1.1 413")


def test_a_refused_body_is_never_read_as_the_next_request(web):
    smuggled = f"GET /api/jobs/999 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    for body, extra in ((smuggled, ""),  # not JSON: refused by the body check
                        (b'{"text": 5}' + b" " * 4 + smuggled, "")):  # valid framing, wrong type
        reply = raw(web, post_raw(body, f"Content-Length: {len(body)}\r\n{extra}"))
        assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1 ") == 1, reply
    # No token: refused before the body is read; the body must still not become a request.
    body = smuggled
    reply = raw(web, b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert reply.startswith(b"HTTP/1.1 403") and reply.count(b"HTTP/1.1 ") == 1, reply
    both = post_raw(b"0\r\n\r\n" + smuggled, "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n")
    reply = raw(web, both)
    assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1 ") == 1, reply


# -- connections: idle, many, hang-ups -----------------------------------------------------------
def test_idle_and_half_sent_connections_are_closed(web):
    host, port = web.socket.getsockname()[:2]
    for first in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(first)
            started = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server, with nothing said
            assert time.monotonic() - started < 8


def test_200_concurrent_clients_are_all_answered(web):
    host, port = web.socket.getsockname()[:2]
    barrier = threading.Barrier(200)

    def one(_):
        with socket.create_connection((host, port), timeout=60) as sock:
            barrier.wait()
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         "Connection: close\r\n\r\n".encode())
            out = b""
            while chunk := sock.recv(4096):
                out += chunk
            return out.split(b" ", 2)[1]

    with ThreadPoolExecutor(200) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [b"200"] * 200


def test_hang_ups_leave_no_traceback(web, client, caplog):
    big = image_id(client, "rotated")
    host, port = web.socket.getsockname()[:2]
    with caplog.at_level(logging.DEBUG):
        for target in ("/search?q=blue+square&k=50", f"/image/{big}", f"/thumb/{big}?size=large"):
            for _ in range(5):
                sock = socket.create_connection((host, port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
                sock.close()  # RST: the server's write meets a dead peer
        time.sleep(1.0)
        assert client.get("/health").status_code == 200
    text = caplog.text
    assert "Traceback" not in text and "BrokenPipe" not in text and "ConnectionReset" not in text, text
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


# -- the token ------------------------------------------------------------------------------------
def test_token_bearer_cookie_and_login(web):
    with httpx.Client(base_url=web.url, timeout=30) as anon:
        assert anon.get("/health").status_code == 403
        assert anon.get("/health", headers={"Authorization": "Bearer nope"}).status_code == 403
        assert anon.get("/", headers={"Accept": "text/html"}).status_code == 401
        assert anon.get("/openapi.json").status_code == 403
        assert anon.get("/login", params={"token": "nope"}).status_code == 403
        login = anon.get("/login", params={"token": TOKEN, "next": "//evil.example/x"})
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert anon.get("/health").status_code == 200  # the cookie jar now holds it
        foreign = anon.post("/search", json={"text": "x"}, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
        assert anon.post("/search", json={"text": "red"}, headers={"Origin": web.url}).status_code == 200


# -- files: only indexed ones -------------------------------------------------------------------
@pytest.mark.parametrize("target, statuses", [
    ("/file/../../../../etc/passwd", {400, 404}),
    ("/file/%2e%2e/%2e%2e/%2e%2e/etc/passwd", {400}),
    ("/file/%252e%252e/%252e%252e/etc/passwd", {404}),
    ("/file//etc/passwd", {404}),
    ("/file/etc/passwd", {404}),
    ("/file/..%2f..%2f..%2fetc%2fpasswd", {400}),
    ("/static/../../../../etc/passwd", {404}),
    ("/static/%2e%2e/%2e%2e/state.py", {404}),
    ("/image/-1", {400, 404}),
    ("/thumb/99999", {404}),
])
def test_traversal_and_unindexed_paths_are_refused(web, target, statuses):
    status, reply = raw_get(web, target)
    assert status in statuses, reply[:300]
    assert b"root:" not in reply and b"ServeState" not in reply


def test_indexed_file_by_path_and_symlink_out_is_refused(store_web, store_client, tmp_path):
    web, client = store_web, store_client
    hit = client.post("/search", json={"text": "green square", "k": 1}).json()["results"][0]
    status, reply = raw_get(web, "/file" + hit["path"].replace(" ", "%20"))
    assert status == 200 and reply.endswith(open(hit["path"], "rb").read())
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(open(hit["path"], "rb").read())
    moved = hit["path"] + ".moved"
    os.rename(hit["path"], moved)
    os.symlink(secret, hit["path"])
    try:
        for target in (f"/image/{hit['image_id']}", "/file" + hit["path"]):
            status, reply = raw_get(web, target)
            assert status == 403 and b"symlink" in reply
    finally:
        os.unlink(hit["path"])
        os.rename(moved, hit["path"])


def test_escaped_everywhere(store_client):
    client = store_client
    page = client.get("/", params={"q": "<script>alert(1)</script>"}, headers={"Accept": "text/html"}).text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    xss = image_id(client, "alert(1)")
    photo = client.get(f"/photo/{xss}").text
    assert "<script>alert(1)" not in photo and "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in photo
    listing = client.get("/", params={"q": "blue circle"}).text
    assert "<script>alert" not in listing


# -- thumbnails and uploads ---------------------------------------------------------------------
def test_thumbnails_are_upright_webp_cached_by_content(store_web, store_client):
    web, client = store_web, store_client
    rotated = image_id(client, "rotated")
    before = web.state.thumbs.decodes
    first = client.get(f"/thumb/{rotated}", params={"size": "small", "v": "x"})
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    assert "immutable" in first.headers["cache-control"] and first.headers["etag"]
    image = Image.open(io.BytesIO(first.content))
    assert image.format == "WEBP" and image.height > image.width  # EXIF orientation 6 applied
    large = client.get(f"/thumb/{rotated}", params={"size": "large"})
    assert image.size == (160, 320)
    assert Image.open(io.BytesIO(large.content)).size == (640, 1280)
    made = web.state.thumbs.decodes
    assert 1 <= made - before <= 2  # small made here; large perhaps by an earlier test
    again = client.get(f"/thumb/{rotated}", params={"size": "small", "v": "x"})
    assert again.content == first.content and web.state.thumbs.decodes == made
    cached = client.get(f"/thumb/{rotated}", headers={"If-None-Match": first.headers["etag"]})
    assert cached.status_code == 304
    stored = web.state.thumbs.path_for(web.state.library.image_count() and _hash(web, rotated), "small")
    assert stored.exists() and str(stored).startswith(str(web.state.root))


def _hash(web, image_id_: int) -> str:
    library = web.state.library
    return scalar(library.root, "SELECT content_hash FROM images WHERE id = :i", library.store.url_with_password,
                  i=image_id_)


def test_a_page_of_thumbnails_decodes_each_original_once(store_web, store_client):
    web, client = store_web, store_client
    ids = [r["image_id"] for r in client.post("/search", json={"text": "blue", "k": 40}).json()["results"]]
    hashes = {_hash(web, i) for i in ids}
    fresh = [i for i in ids if not web.state.thumbs.path_for(_hash(web, i), "small").exists()]
    before = web.state.thumbs.decodes
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: client.get(f"/thumb/{i}").status_code, ids + ids))
    assert codes == [200] * (2 * len(ids))
    assert web.state.thumbs.decodes - before <= len({_hash(web, i) for i in fresh}) <= len(hashes)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def test_uploads_are_checked_and_find_their_indexed_copy(store_web, store_client):
    web, client = store_web, store_client
    hit = client.post("/search", json={"text": "red circle", "k": 1}).json()["results"][0]
    data = open(hit["path"], "rb").read()
    up = client.post("/api/upload", content=data, headers={"Content-Type": "image/jpeg"})
    assert up.status_code == 200 and len(up.json()["upload"]) == 64
    page = client.get("/", params={"upload": up.json()["upload"]}).text
    first = page.index('class="hit"')
    assert f'data-id="{hit["image_id"]}"' in page[first:first + 200]
    assert client.post("/api/upload", content=b"not an image").status_code == 400
    assert client.post("/api/upload", content=b"").status_code == 400
    bomb = client.post("/api/upload", content=_png(8000, 8000))
    assert bomb.status_code == 400 and "pixels" in bomb.json()["error"]
    # Refused on the declared length, before a byte of the body is read.
    huge = raw(web, post_raw(b"", f"Content-Length: {MAX_UPLOAD_BYTES + 1}\r\n", "/api/upload"))
    assert huge.startswith(b"HTTP/1.1 413")
    assert client.get("/", params={"upload": "../../etc/passwd"}).status_code == 400


# -- reads while a writer holds the database, and runs started over the API ---------------------
def test_pages_answer_while_a_writer_holds_the_database(store_web, store_client):
    """A writer mid-transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: the library's write lock and
    uncommitted updates of the rows the pages read) must not hold up a reader."""
    library = store_web.state.library
    with contextlib.ExitStack() as stack:
        if library.store.is_postgres:
            stack.enter_context(library.write_lock())
            conn = stack.enter_context(library.engine.connect())  # closed uncommitted: rolled back
            conn.execute(sql_text("UPDATE meta SET value = value"))
            conn.execute(sql_text("UPDATE images SET size = size"))
        else:
            writer = sqlite3.connect(library.db_path, timeout=1, isolation_level=None)
            stack.callback(writer.close)
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE meta SET value = value WHERE key = 'model'")
            stack.callback(writer.execute, "ROLLBACK")
        started = time.monotonic()
        for path in ("/status", "/tags", "/api/status", "/"):
            assert store_client.get(path).status_code == 200, path
        assert store_client.post("/search", json={"text": "red", "k": 3}).status_code == 200
        assert time.monotonic() - started < 20


def test_index_run_over_the_api_shows_progress_and_new_images(store_web, store_client):
    from retrieval.media import synthetic

    client = store_client
    folder = store_web.state.library.root.parent / "photos" / "api-added"
    synthetic.write_collection(folder, per_class=1, seed=77, labels=["green circle"])
    before = client.get("/api/status").json()["images"]
    job = client.post("/api/jobs", json={"folders": [str(folder)]})
    assert job.status_code == 200, job.text
    assert client.post("/api/jobs", json={"folders": [str(folder)]}).status_code in (200, 400)
    done = wait_for(lambda: (j := client.get(f"/api/jobs/{job.json()['id']}").json())["state"] != "running"
                    and j, timeout=240, every=0.5)
    assert done["state"] == "done", done
    assert done["new_images"] == 1 and client.get("/api/status").json()["images"] == before + 1
    paths = [r["path"] for r in client.post("/search", json={"text": "green circle", "k": 50}).json()["results"]]
    assert any("api-added" in p for p in paths)
    assert client.post("/api/jobs", json={"folders": ["relative/path"]}).status_code == 400
    assert client.post("/api/jobs", json={}).status_code == 400


def test_tagging_run_over_the_api(store_client, tmp_path):
    client = store_client
    labels = tmp_path / "colours.txt"
    labels.write_text("red thing\ngreen thing\nblue thing\nyellow thing\n")
    job = client.post("/api/jobs", json={"labels": str(labels)})
    assert job.status_code == 200, job.text
    done = wait_for(lambda: (j := client.get(f"/api/jobs/{job.json()['id']}").json())["state"] != "running"
                    and j, timeout=240, every=0.5)
    assert done["state"] == "done" and done["result"]["name"] == "colours", done
    page = client.get("/tags").text
    assert "red thing" in page and "/tags/red%20thing" in page
    missing = client.post("/api/jobs", json={"labels": str(tmp_path / "nope.txt")})
    assert missing.status_code == 400 and "no labels file" in missing.json()["error"]


def test_cli_help_does_not_import_the_web_stack():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; import retrieval.cli as c; "
            "r = CliRunner().invoke(c.cli, ['--help']); "
            "print(r.exit_code, sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []"
