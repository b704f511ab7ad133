"""The FAISS cache answers only for the database it was built from.

The three ways the issue found to pair an index with the wrong database, done
for real on libraries the indexer made: the database deleted and made again,
a zero-byte database, and another library's index files copied in. In each,
an image of the new collection must find its own row first, and `verify` must
pass after the first search has rebuilt the cache.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from retrieval.facade import Library
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.index.inspection import verify_library
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.store.library import DB_NAME


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("binding")
    # y outgrows x: its change log then runs past x's watermark, the case that fooled the cache
    synthetic.write_collection(base / "x", per_class=2, seed=101)
    synthetic.write_collection(base / "y", per_class=3, seed=202)
    return base / "x", base / "y"


def index(lib_dir: Path, folder: Path, model_dir: Path) -> None:
    spec = ModelSpec(model_dir=str(model_dir))
    with Library.open(lib_dir, model=spec) as library:
        index_paths(library, [str(folder)], spec, options=IndexOptions(workers=0))


def drop_database(lib_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{lib_dir / DB_NAME}{suffix}").unlink(missing_ok=True)


def assert_finds_its_own_rows(lib_dir: Path, folder: Path) -> None:
    photos = sorted(folder.rglob("*.jpg"))[:6]
    with Library.open(lib_dir, create=False) as library:
        assert library.image_count() == len(list(folder.rglob("*.jpg")))
        for photo in photos:
            best = library.search(image=str(photo), k=1)[0]
            assert best.path == str(photo) and best.score > 0.999
        report = verify_library(library, sample=1000)
    assert report.ok, report.problems


def saved_state(lib_dir: Path) -> dict:
    return json.loads((lib_dir / "index.json").read_text())


def test_database_deleted_and_made_again(tmp_path, folders, tiny_model_dir):
    x, y = folders
    lib = tmp_path / "a"
    index(lib, x, tiny_model_dir)
    first_id = saved_state(lib)["library_id"]
    drop_database(lib)
    index(lib, y, tiny_model_dir)
    assert saved_state(lib)["library_id"] not in (None, first_id)
    assert_finds_its_own_rows(lib, y)


def test_zero_byte_database(tmp_path, folders, tiny_model_dir):
    x, y = folders
    lib = tmp_path / "a"
    index(lib, x, tiny_model_dir)
    drop_database(lib)
    (lib / DB_NAME).write_bytes(b"")
    index(lib, y, tiny_model_dir)
    assert_finds_its_own_rows(lib, y)


def test_another_librarys_index_files_copied_in(tmp_path, folders, tiny_model_dir):
    x, y = folders
    a, b = tmp_path / "a", tmp_path / "b"
    index(a, y, tiny_model_dir)
    index(b, x, tiny_model_dir)
    for name in ("index.faiss", "index.json"):
        shutil.copyfile(b / name, a / name)
    with Library.open(a, create=False) as library:  # verify names the wrong cache first
        report = verify_library(library)
    assert not report.ok and any("another database" in p.message for p in report.problems)
    assert_finds_its_own_rows(a, y)
    assert saved_state(a)["library_id"] != saved_state(b)["library_id"]


def test_identity_is_kept_across_opens_and_written_once(tmp_path, folders, tiny_model_dir):
    lib = tmp_path / "a"
    index(lib, folders[1], tiny_model_dir)
    with Library.open(lib, create=False) as library:
        first = library.identity
    with Library.open(lib, create=False) as library:
        assert library.identity == first and len(first) == 32
    assert os.path.getsize(lib / "index.json") > 0 and saved_state(lib)["library_id"] == first


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_index_file_is_rebuilt(tmp_path, folders, tiny_model_dir, damage):
    lib = tmp_path / "a"
    index(lib, folders[1], tiny_model_dir)
    data = (lib / "index.faiss").read_bytes()
    broken = {"garbage": os.urandom(len(data)), "truncated": data[: len(data) // 2], "empty": b""}[damage]
    (lib / "index.faiss").write_bytes(broken)
    with Library.open(lib, create=False) as library:
        report = verify_library(library)
    assert not report.ok and report.found("faiss_unreadable")
    assert_finds_its_own_rows(lib, folders[1])
