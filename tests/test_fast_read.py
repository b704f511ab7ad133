"""The query path's stdlib-sqlite3 reads (`retrieval.store.fast_read`) against the SQLAlchemy
path they stand in for: byte-identical answers from `clipfind search`/`similar` on a real
library (table and --json), and a fall-back to `Library.open` wherever they do not cover it."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3

import pytest
from PIL import Image

from retrieval.errors import LibraryError
from retrieval.media import synthetic
from retrieval.model.spec import ModelSpec
from retrieval.store import fast_read
from retrieval.store.binding import SCHEMA_HEAD
from retrieval.store.fast_read import QueryLibrary, open_for_query
from retrieval.store.library import Library
from tests.cli_runner import clipfind


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    """Photos with EXIF dates (one with sub-seconds), a file name that is not UTF-8, tags;
    indexed and tagged by the real CLI; and a query image that is not in the library."""
    base = tmp_path_factory.mktemp("fast-read")
    photos = base / "photos"
    synthetic.write_collection(photos, per_class=3, seed=23)
    for i, name in enumerate(["red_circle/0000.jpg", "blue_square/0001.jpg", "green_triangle/0002.jpg"]):
        path = photos / name
        exif = Image.Exif()
        exif.get_ifd(0x8769)[36867] = f"202{i}:0{i + 3}:1{i} 12:34:56"  # DateTimeOriginal
        if i == 1:
            exif.get_ifd(0x8769)[37521] = "25"  # SubSecTimeOriginal: .25 s
        with Image.open(path) as img:
            img.convert("RGB").save(path, exif=exif, quality=92)
    odd = os.fsdecode(os.fsencode(str(photos / "red_circle")) + b"/caf\xe9.jpg")
    shutil.copyfile(photos / "red_circle" / "0001.jpg", odd)
    lib = base / "lib"
    result = clipfind("index", photos, "-L", lib, "--model-dir", tiny_model_dir, "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    (base / "labels.txt").write_text("\n".join(synthetic.LABELS) + "\n")
    result = clipfind("tag", "-L", lib, "--labels", base / "labels.txt", "--top-k", "1", "-q")
    assert result.exit_code == 0, result.output
    outside = base / "query.jpg"
    synthetic.draw(synthetic.LABELS[-1], 64, random.Random(5)).save(outside, quality=90)
    return {"base": base, "lib": lib, "photos": photos, "outside": outside}


def answer(args: list, fast: bool, monkeypatch) -> tuple[bytes, str]:
    """stdout of `clipfind ARGS --no-server`, and the kind of library the command read through."""
    opened: list[str] = []
    real = fast_read.open_for_query

    def spy(*a, **kw):
        library = real(*a, **kw)
        opened.append(type(library).__name__)
        return library

    with monkeypatch.context() as mp:
        mp.setattr(fast_read, "open_for_query", spy)
        if not fast:
            mp.setattr(QueryLibrary, "open", classmethod(lambda cls, root, open_full: None))
        result = clipfind(*args, "--no-server")
    assert result.exit_code == 0, result.output
    assert len(opened) == 1, opened
    return result.stdout_bytes, opened[0]


def queries(made) -> list[list]:
    lib, photos = made["lib"], made["photos"]
    return [
        ["search", "red circle", "-L", lib],
        ["search", "blue square", "-L", lib, "-k", "40", "--json"],
        ["search", "circle", "-L", lib, "--path", photos / "red_circle", "--json"],
        ["search", "square", "-L", lib, "--path", f"{photos}/*/000[01].jpg"],
        ["search", "shape", "-L", lib, "--after", "2021-01-01", "--json"],
        ["search", "shape", "-L", lib, "--before", "2022-01-01", "--min-score", "-1", "--json"],
        ["search", "circle", "-L", lib, "--tag", synthetic.LABELS[0], "--json"],
        ["search", "red", "-L", lib, "--not", "circle", "--until-irrelevant", "--json"],
        ["search", "--image", photos / "blue_square" / "0001.jpg", "-L", lib, "--json"],
        ["search", "--image", made["outside"], "-L", lib, "--json"],
        ["similar", photos / "red_circle" / "0001.jpg", "-L", lib, "--json"],
        ["similar", photos / "green_triangle" / "0002.jpg", "-L", lib, "--paths0"],
    ]


def test_both_paths_give_identical_answers(made, monkeypatch):
    seen_dates = seen_odd = False
    for args in queries(made):
        fast, fast_kind = answer(args, True, monkeypatch)
        full, full_kind = answer(args, False, monkeypatch)
        assert (fast_kind, full_kind) == ("QueryLibrary", "Library")
        assert fast == full, args
        assert fast.strip(), args  # an empty answer would agree with anything
        if "--json" in args:
            rows = [json.loads(line) for line in fast.decode().splitlines()]
            seen_dates |= any(r["taken_at"] for r in rows)
            seen_odd |= any("path_b64" in r for r in rows)
    assert seen_dates and seen_odd  # the columns that need decoding were compared too


def test_a_faiss_index_rebuilt_or_caught_up_through_sqlite3_answers_the_same(made, tmp_path, monkeypatch):
    """The FAISS sync runs its reads through stdlib sqlite3 too: a missing index is rebuilt from
    the rows, and rows deleted behind the saved index (the triggers log them) are caught up."""
    copies = {}
    for name in ("fast", "full"):
        lib = shutil.copytree(made["lib"], tmp_path / name)
        victim = next(p for p in sorted(made["photos"].rglob("*.jpg")) if "red_circle" in str(p))
        with sqlite3.connect(lib / "clipfind.db") as conn:
            conn.execute("DELETE FROM images WHERE path = ?", (str(victim),))
        copies[name] = lib
    args = ["search", "red circle", "-k", "100", "--json"]
    fast, _ = answer([*args, "-L", copies["fast"]], True, monkeypatch)
    full, _ = answer([*args, "-L", copies["full"]], False, monkeypatch)
    assert fast == full and str(victim).encode() not in fast
    for name in ("fast", "full"):
        (copies[name] / "index.faiss").unlink()
        (copies[name] / "index.json").unlink()
    fast, _ = answer([*args, "-L", copies["fast"]], True, monkeypatch)
    full, _ = answer([*args, "-L", copies["full"]], False, monkeypatch)
    assert fast == full and (copies["fast"] / "index.faiss").exists()


def library_copy(made, tmp_path):
    return shutil.copytree(made["lib"], tmp_path / "lib")


def test_what_it_does_not_cover_falls_back_to_the_full_library(made, tmp_path, monkeypatch):
    lib = library_copy(made, tmp_path)
    with open_for_query(lib) as library:
        assert isinstance(library, QueryLibrary)
    db = sqlite3.connect(lib / "clipfind.db")
    db.execute("UPDATE alembic_version SET version_num = '9999_future'")  # not this clipfind's head
    db.commit()
    with pytest.raises(LibraryError, match="newer than this clipfind knows"):  # the full path's words
        open_for_query(lib)
    db.execute("UPDATE alembic_version SET version_num = ?", (SCHEMA_HEAD,))
    db.execute("DELETE FROM meta WHERE key = 'library_id'")  # from before identities
    db.commit()
    with open_for_query(lib) as library:
        assert isinstance(library, Library)
    assert db.execute("SELECT count(*) FROM meta WHERE key = 'library_id'").fetchone()[0] == 1  # it wrote one
    db.close()
    with open_for_query(lib) as library:
        assert isinstance(library, QueryLibrary)
    monkeypatch.setenv("CLIPFIND_DB", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert QueryLibrary.open(lib, lambda: None) is None  # PostgreSQL is the full path's
    monkeypatch.delenv("CLIPFIND_DB")
    (lib / "database.json").write_text('{"url": "postgresql+psycopg://nobody@127.0.0.1:1/none"}\n')
    assert QueryLibrary.open(lib, lambda: None) is None
    assert QueryLibrary.open(tmp_path / "nowhere", lambda: None) is None


def test_it_refuses_another_model_and_cannot_write(made, tmp_path, tiny_model_dir):
    lib = library_copy(made, tmp_path)
    with pytest.raises(LibraryError, match="was made with"):
        open_for_query(lib, ModelSpec(model="ViT-B-32", random_weights=True))
    with open_for_query(lib, ModelSpec(model_dir=str(tiny_model_dir))) as library:
        assert isinstance(library, QueryLibrary)
        with library.reads() as reads, pytest.raises(sqlite3.OperationalError, match="readonly"):
            reads.all("DELETE FROM images")
        # What it lacks is the full library's, opened on first use (here: a session).
        assert library.full is not None and library.image_count() > 0


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line}


def test_a_query_maps_the_flat_index_and_edits_only_an_in_memory_copy(made, tmp_path):
    """A one-shot query maps index.faiss instead of copying it; a catch-up (rows deleted
    behind the saved index) first swaps in an in-memory copy, since FAISS aborts the process
    on editing a mapped index. Both answer as the SQLAlchemy path does."""
    lib = library_copy(made, tmp_path)
    index_file = str(lib / "index.faiss")
    with open_for_query(lib) as library:
        assert isinstance(library, QueryLibrary)
        vectors = library.vectors()
        assert index_file in mapped_files()
        before = int(vectors.index.ntotal)
    with sqlite3.connect(lib / "clipfind.db") as conn:
        conn.execute("DELETE FROM images WHERE id = (SELECT min(id) FROM images)")
    with open_for_query(lib) as library:
        caught_up = library.vectors()
        assert int(caught_up.index.ntotal) == before - 1
    with Library.open(lib, create=False) as full:
        assert int(full.vectors().index.ntotal) == before - 1
