"""Queries a hostile or careless user sends: endless files, absurd weights, a wedged server.

Every case is run for real: `/dev/zero`, a FIFO made with mkfifo, a server
socket that accepts and never answers, on a library the real indexer made.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from PIL import Image as PILImage

from retrieval.errors import EXIT_INPUT, EXIT_USAGE, InputError, UsageError
from retrieval.media import synthetic
from retrieval.media.regular import NotRegularFile, open_regular
from retrieval.media.scan import content_hash
from retrieval.query.search import Searcher
from retrieval.query.types import MAX_WEIGHT, Query, split_weight
from retrieval.serve.client import SERVE_FILE, ServerUnavailable, ask
from retrieval.store.library import Library
from tests.cli_runner import clipfind

pytestmark = pytest.mark.timeout(120)  # a regression here is a hang: fail it, do not wait forever


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("hostile")
    photos = base / "photos"
    synthetic.write_collection(photos, per_class=2, seed=41)
    os.mkfifo(photos / "pipe.jpg")  # a FIFO with an image name inside the indexed folder
    lib = base / "lib"
    result = clipfind("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "0",
                      "-q", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    return {"lib": lib, "photos": photos, "base": base, "index_report": report}


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "query.jpg"
    os.mkfifo(path)
    return path


def finishes(func, seconds: float = 10.0):
    """Run func in a thread; its outcome, or a failure if it is still running after `seconds`."""
    box: dict = {}

    def target():
        try:
            box["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return box


# -- reading only regular files ------------------------------------------------------------
@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom"])
def test_devices_are_never_read(path):
    box = finishes(lambda: content_hash(path))
    assert isinstance(box.get("error"), NotRegularFile)
    assert "character device" in str(box["error"])


def test_a_fifo_is_refused_without_blocking(fifo):
    box = finishes(lambda: open_regular(fifo))  # no writer: a plain open() would block forever
    assert isinstance(box.get("error"), NotRegularFile) and "FIFO" in str(box["error"])


def test_content_hash_reads_a_regular_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"x" * 3_000_000)
    assert content_hash(target, chunk=1 << 16) == content_hash(target)


@pytest.mark.parametrize("which", ["/dev/zero", "fifo"])
@pytest.mark.parametrize("command", ["search", "similar"])
def test_query_image_that_is_not_a_file_is_one_line_exit_5(setup, fifo, which, command):
    target = fifo if which == "fifo" else which
    args = ["--image", target] if command == "search" else [target]
    box = finishes(lambda: clipfind(command, *args, "-L", setup["lib"], "--no-server"), 60)
    result = box["value"]
    assert result.exit_code == EXIT_INPUT, result.output
    assert "not a regular file" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_fifo_in_an_indexed_folder_is_counted_as_skipped(setup):
    report = setup["index_report"]
    skipped = {os.path.basename(s["path"]): s for s in report["skipped_files"]}
    assert skipped["pipe.jpg"]["kind"] == "not_image"
    assert "not a regular file (FIFO)" in skipped["pipe.jpg"]["message"]
    assert report["indexed"] == 24


def test_query_image_rejected_while_another_query_holds_the_lock(setup):
    """A server thread busy with the model must not delay the refusal of a bad query image."""
    with Library.open(setup["lib"], create=False) as library:
        searcher = Searcher(library)
        searcher.lock = threading.Lock()
        with searcher.lock:  # another query is using the model and the index
            box = finishes(lambda: searcher.search(Query.build(images="/dev/zero")), 10)
    assert isinstance(box.get("error"), InputError), box
    assert "not a regular file" in str(box["error"])


def test_query_image_decode_happens_outside_the_lock(setup, tmp_path):
    """An unindexed image is read and decoded before the lock is taken; only encoding waits."""
    image = tmp_path / "new.png"
    PILImage.new("RGB", (64, 48), (200, 30, 30)).save(image)
    with Library.open(setup["lib"], create=False) as library:
        searcher = Searcher(library)
        decoded = threading.Event()

        class Watching:
            def __enter__(self):
                decoded.set()  # the first time the lock is wanted, reading and decoding are done
                return self

            def __exit__(self, *exc):
                return False

        searcher.lock = Watching()
        import retrieval.media.images as images

        real_open = images.open_image

        def spying_open(*args, **kwargs):
            assert not decoded.is_set(), "the lock was taken before the query image was decoded"
            return real_open(*args, **kwargs)

        images.open_image = spying_open
        try:
            vector, own = searcher.image_vector(str(image), [])
        finally:
            images.open_image = real_open
    assert own is None and decoded.is_set() and abs(float((vector ** 2).sum()) - 1) < 1e-3


def test_the_cli_gives_up_on_a_silent_server_within_seconds(setup, tmp_path):
    """A server that accepts and never answers costs the CLI about ASK_TIMEOUT, not a minute."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    info = {"url": f"http://127.0.0.1:{port}", "token": "t", "pid": os.getpid()}
    from retrieval.query.types import Filters

    started = time.monotonic()
    try:
        with pytest.raises(ServerUnavailable):
            ask(info, "search", Query.build("red circle"), Filters(), 5)
    finally:
        silent.close()
    assert time.monotonic() - started < 15


def test_cli_falls_back_to_local_search_when_the_server_is_silent(setup):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    serve_file = setup["lib"] / SERVE_FILE
    serve_file.write_text(json.dumps({"url": f"http://127.0.0.1:{silent.getsockname()[1]}",
                                      "token": "t", "pid": os.getpid()}))
    try:
        result = clipfind("search", "red circle", "-L", setup["lib"], "-k", "3")
    finally:
        serve_file.unlink()
        silent.close()
    assert result.exit_code == 0, result.output
    assert "did not answer" in result.stderr and len(result.stdout.splitlines()) == 4


# -- weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["cat^1e39"], ["cat^" + "9" * 40], ["cat^1001"],
    ["cat", "--image", "x.jpg", "--weight", "1e39"],
    ["cat", "--image", "x.jpg", "--weight", "nan"],
    ["cat", "--image", "x.jpg", "--weight", "-inf"],
    ["cat", "--not", "dog", "--not-weight", "inf"],
    ["cat", "--not", "dog", "--not-weight", "1e39"],
])
def test_absurd_weights_are_usage_errors(setup, args):
    result = clipfind("search", *args, "-L", setup["lib"], "--no-server")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "weight" in result.stderr.lower() and "nan" not in result.stdout.lower()


def test_weights_in_range_still_work(setup):
    result = clipfind("search", f"red circle^{MAX_WEIGHT:g}", "blue^0.001", "-L", setup["lib"],
                      "--no-server", "-k", "2", "--json")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2


def test_parser_refuses_what_the_api_would_overflow():
    assert split_weight("cat^2.5e2") == ("cat", 250.0)
    with pytest.raises(UsageError):
        split_weight("cat^1e39")
    with pytest.raises(UsageError):
        Query.build("cat", image_weight=float("nan"))
    with pytest.raises(UsageError):
        Query.build("cat", negative_weight=1e39)
