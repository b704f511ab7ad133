"""A real library and a real server on loopback for the web tests (tiny model, drawn photos).

Import `web_fixture` and `web_lib_fixture` into a test module to use the `web` / `web_lib` fixtures
(a SQLite library). For the tests that touch the store, import `store_web_fixture` too: `store_web`
is the same server on each store (SQLite's `web`, and one over a PostgreSQL library with the
`postgres` mark), so protocol-only tests do not pay for a second library.

The photos: 36 drawn shapes (red ones dated 2020, the rest 2024 by mtime), one
file named `<script>alert(1)</script>.jpg`, one 12-MP-style JPEG with EXIF
orientation 6 (stored landscape, shown portrait), tags from a tagging run.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from retrieval import Library
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.query.search import Searcher
from retrieval.serve.runner import WebServer
from retrieval.serve.state import ServeState
from retrieval.tagging.labels import from_names
from tests.conftest import STORES

XSS_NAME = "<script>alert(1)</script>.jpg"  # a folder `<script>alert(1)<` holding `script>.jpg`
TOKEN = "test-token-0123456789abcdef"
OLD, NEW = datetime(2020, 6, 1, 12), datetime(2024, 6, 1, 12)


def rotated_jpeg(path: Path, size=(1600, 800)) -> None:
    """A landscape JPEG whose EXIF says 'rotate 90° clockwise' (orientation 6): shown portrait."""
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, "JPEG", exif=exif.tobytes())


def build_library(base: Path, model_dir: Path, db: str | None = None) -> Path:
    photos = base / "photos"
    pairs = synthetic.write_collection(photos / "shapes", per_class=3, seed=31)
    for path, label in pairs:
        when = OLD if label.startswith("red") else NEW
        os.utime(path, (when.timestamp(), when.timestamp()))
    (photos / XSS_NAME).parent.mkdir()  # the "/" in "</script>" makes it a folder and a file
    shutil.copy(pairs[-1][0], photos / XSS_NAME)
    rotated_jpeg(photos / "rotated.jpg")
    spec = ModelSpec(model_dir=str(model_dir))
    with Library.open(base / "lib", model=spec, db=db) as library:
        index_paths(library, [str(photos)], spec, options=IndexOptions(workers=0))
        labels = sorted({label.replace("_", " ") for _, label in pairs})
        library.tag(from_names(labels), name="shapes")
    return base / "lib"


@pytest.fixture(scope="module", name="web_lib")
def web_lib_fixture(tmp_path_factory, tiny_model_dir) -> Path:
    return build_library(tmp_path_factory.mktemp("web"), tiny_model_dir)


def serve(lib: Path, db: str | None = None):
    """A running server on 127.0.0.1 (any free port) with a known token; stop it after."""
    library = Library.open(lib, create=False, db=db)
    server = WebServer(ServeState(library, Searcher(library), token=TOKEN), "127.0.0.1", 0,
                       idle_timeout=2.0).start_in_thread()
    try:
        yield server
    finally:
        server.stop()
        library.close()


@pytest.fixture(scope="module", name="web")
def web_fixture(web_lib):
    """The server over the SQLite library."""
    yield from serve(web_lib)


@pytest.fixture(scope="module", name="pg_web")
def pg_web_fixture(tmp_path_factory, tiny_model_dir, pg_server):
    """The same server over the same photos, kept in a PostgreSQL database."""
    url = pg_server.database()
    yield from serve(build_library(tmp_path_factory.mktemp("web-pg"), tiny_model_dir, db=url), db=url)


@pytest.fixture(params=STORES, name="store_web")
def store_web_fixture(request):
    """`web` on each store: SQLite, then PostgreSQL."""
    return request.getfixturevalue("web" if request.param == "sqlite" else "pg_web")


def wait_for(predicate, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def build_url_library(base: Path, model_dir: Path) -> tuple[Path, dict[str, Path]]:
    """A library of drawn photos indexed four ways: a local folder, a `file://` URL of another
    folder, a `memory://` prefix (fsspec's in-process store: the server runs in this process) and
    a folder inside a zip file (a chained URL, `zip://photos::file:///.../photos.zip`).
    Returns the library and {URL of each URL row: the file its bytes came from}."""
    import uuid
    import zipfile

    import fsspec

    photos = base / "photos"
    local = synthetic.write_collection(photos / "local", per_class=1, seed=41, labels=synthetic.LABELS[:3])
    by_file = synthetic.write_collection(photos / "by-url", per_class=1, seed=42, labels=synthetic.LABELS[3:7])
    in_memory = synthetic.write_collection(base / "for-memory", per_class=1, seed=43, labels=synthetic.LABELS[7:])
    prefix = f"memory:///web-{uuid.uuid4().hex[:8]}"
    memory = fsspec.filesystem("memory")
    sources = {}
    for path, _ in in_memory:
        url = f"{prefix}/{path.parent.name}/{path.name}"
        memory.pipe(url[len("memory://"):], path.read_bytes())
        sources[url] = path
    for path, _ in by_file:
        sources[path.as_uri()] = path
    zipped = synthetic.write_collection(base / "for-zip", per_class=1, seed=44, labels=synthetic.LABELS[:2])
    archive = base / "photos.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path, _ in zipped:
            out.write(path, f"photos/{path.parent.name}/{path.name}")
            sources[f"zip://photos/{path.parent.name}/{path.name}::{archive.as_uri()}"] = path
    spec = ModelSpec(model_dir=str(model_dir))
    with Library.open(base / "lib", model=spec) as library:
        index_paths(library, [str(photos / "local"), (photos / "by-url").as_uri(), prefix,
                              f"zip://photos::{archive.as_uri()}"], spec, options=IndexOptions(workers=0))
    assert local  # indexed as plain files beside the URL rows
    return base / "lib", sources


@pytest.fixture(scope="module", name="url_lib")
def url_lib_fixture(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict[str, Path]]:
    return build_url_library(tmp_path_factory.mktemp("web-urls"), tiny_model_dir)


@pytest.fixture(scope="module", name="url_web")
def url_web_fixture(url_lib):
    """The server over a library whose rows are local files, `file://` and `memory://` URLs."""
    yield from serve(url_lib[0])
