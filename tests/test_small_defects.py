"""Issue 15's smaller defects, each on the real thing: a killed run's status, Pillow's
decompression-bomb warning, control characters in a path, the text cache's mode."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from retrieval.index.inspection import library_status
from retrieval.media.images import ImageError, open_image, read_info
from retrieval.query.render import table
from retrieval.query.search import SearchResult
from retrieval.query.textcache import CachedText, TextCache
from retrieval.store.library import Library


# -- a killed run is not "running" ------------------------------------------------------
def test_a_run_whose_process_is_gone_shows_as_interrupted(tmp_path):
    with Library.open(tmp_path / "lib") as library:
        run_id = library.start_run("index")  # what a run killed with -9 leaves behind
        with library.write_lock():  # while a writer holds the lock, it is running
            assert library_status(library)["last_run"]["status"] == "running"
        status = library_status(library)
    assert status["last_run"]["id"] == run_id
    assert status["last_run"]["status"] == "interrupted"
    assert status["last_run"]["note"] == "its process is gone" and status["interrupted_runs"] == 1


def test_a_run_held_by_another_live_process_stays_running(tmp_path):
    lib_dir = tmp_path / "lib"
    with Library.open(lib_dir) as library:
        library.start_run("index")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; fh = open(sys.argv[1], 'a+'); fcntl.flock(fh, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(lib_dir / "write.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Library.open(lib_dir, create=False) as library:
            assert library_status(library)["last_run"]["status"] == "running"
    finally:
        holder.kill()
        holder.wait()
    with Library.open(lib_dir, create=False) as library:
        assert library_status(library)["last_run"]["status"] == "interrupted"


# -- decompression bombs go to the skip report, not raw to stderr ----------------------------
def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height and whose pixel data is cut short."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 2000)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("megapixels, kind", [(95, "truncated"), (150, "too_large")])
def test_decompression_bomb_warning_never_escapes(tmp_path, megapixels, kind):
    assert megapixels * 1_000_000 > PILImage.MAX_IMAGE_PIXELS  # Pillow warns for these sizes
    path = tmp_path / "huge.png"
    png_header_only(path, 10_000, megapixels * 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = read_info(path)
        with pytest.raises(ImageError) as failure:
            open_image(path)
    assert info.width * info.height == megapixels * 1_000_000
    assert failure.value.kind == kind
    assert not [w for w in caught if issubclass(w.category, PILImage.DecompressionBombWarning)]


# -- control characters in a path -------------------------------------------------------------
def test_a_newline_in_a_file_name_stays_on_its_row():
    results = [SearchResult(1, 0.9, 1, "/photos/two\nlines.jpg", 1000, 10, 10, None),
               SearchResult(2, 0.8, 2, "/photos/bell\x07\tand\x1b[2J.jpg", 1000, 10, 10, None),
               SearchResult(3, 0.7, 3, "/photos/plain é.jpg", 1000, 10, 10, None)]
    rows = table(results).splitlines()
    assert len(rows) == 4
    assert rows[1].endswith("/photos/two\\nlines.jpg")
    assert rows[2].endswith("/photos/bell\\x07\\tand\\x1b[2J.jpg")
    assert rows[3].endswith("/photos/plain é.jpg")


# -- the text cache is private ---------------------------------------------------------------
def test_text_cache_files_are_private(tmp_path):
    previous = os.umask(0o022)  # the usual umask: files would be world-readable without the fix
    try:
        cache = TextCache(tmp_path / "textcache.db")
        cache.put("k", CachedText(np.ones(4, np.float32) / 2, 3, 77))
    finally:
        os.umask(previous)
    assert cache.get("k") is not None
    for name in os.listdir(tmp_path):
        mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    cache.close()
