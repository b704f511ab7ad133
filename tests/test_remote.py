"""Images behind fsspec URLs and `index --file-list`, on the single-process engine.

`memory://` is a real fsspec filesystem that lives in this process (the local engine's
decode runs here with --workers 0), so listing, hashing and decoding all go through fsspec;
the Ray engine reads `file://` URLs from its worker processes in tests/test_ray_engine.py.
The vectors must equal those of the same bytes indexed from a folder.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from retrieval import cli
from retrieval.errors import EXIT_INPUT, EXIT_USAGE
from retrieval.media import remote, synthetic
from retrieval.store.library import Library
from retrieval.store.schema import ErrorRow
from tests.test_index_faults import stored_vectors

fsspec = pytest.importorskip("fsspec")


def index(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli.cli, ["index", *[str(a) for a in args]])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 drawn photos and one broken file, on disk."""
    root = tmp_path_factory.mktemp("remote-photos")
    synthetic.write_collection(root, per_class=1, seed=5)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a photo")
    return root


@pytest.fixture(scope="module")
def local_vectors(folder, tiny_model_dir, tmp_path_factory) -> dict[str, np.ndarray]:
    """name -> vector, from the folder indexed as usual: what every URL run must give."""
    lib = tmp_path_factory.mktemp("remote-local") / "lib"
    code, out = index(folder, "-L", lib, "--model-dir", tiny_model_dir, "--precision", "fp32", "--workers", "0")
    assert code == 0, out
    with Library.open(lib) as library:
        return {os.path.relpath(p, folder): v for p, v in stored_vectors(library).items()}


def to_memory(folder: Path) -> str:
    """The folder's files copied into a fresh memory:// prefix; returns the prefix URL."""
    prefix = f"memory:///photos-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe(f"{prefix[len('memory://'):]}/{path.relative_to(folder)}", path.read_bytes())
    return prefix


def by_name(lib: Path, prefix: str) -> dict[str, np.ndarray]:
    with Library.open(lib) as library:
        got = stored_vectors(library)
    assert all(p.startswith(prefix + "/") for p in got), sorted(got)[:3]
    return {p[len(prefix) + 1:]: v for p, v in got.items()}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-5


def test_a_memory_url_prefix_indexes_like_its_folder(folder, local_vectors, tiny_model_dir, tmp_path):
    prefix = to_memory(folder)
    lib = tmp_path / "lib"
    code, out = index(prefix, "-L", lib, "--model-dir", tiny_model_dir, "--precision", "fp32",
                      "--workers", "0", "--json")
    assert code == 0 and '"encoded": 12' in out and '"corrupt": 1' in out, out
    assert_same(by_name(lib, prefix), local_vectors)
    with Library.open(lib) as library, library.session() as s:
        assert s.scalars(select(ErrorRow.path)).all() == [f"{prefix}/broken.jpg"]
    # unchanged: nothing encoded, and the known-bad object is not read again
    code, out = index(prefix, "-L", lib, "--json")
    assert code == 0 and '"encoded": 0' in out and '"unchanged": 12' in out and '"known_bad": 1' in out, out
    # an object rewritten and one deleted: re-encoded and removed, like files
    fs = fsspec.filesystem("memory")
    names = sorted(local_vectors)
    fs.pipe(f"{prefix[9:]}/{names[0]}", (folder / names[1]).read_bytes())
    fs.rm(f"{prefix[9:]}/{names[2]}")
    code, out = index(prefix, "-L", lib, "--json")
    assert code == 0 and '"removed": 1' in out and '"duplicates": 1' in out, out
    got = by_name(lib, prefix)
    assert names[2] not in got and np.allclose(got[names[0]], local_vectors[names[1]], atol=1e-5)
    checked = CliRunner().invoke(cli.cli, ["verify", "-L", str(lib)])  # URL rows are not "missing files"
    assert checked.exit_code == 0 and "11 rows are URLs" in checked.output, checked.output


def test_a_file_list_of_paths_and_urls(folder, local_vectors, tiny_model_dir, tmp_path):
    prefix = to_memory(folder)
    names = sorted(local_vectors)
    lines = [str(folder / n) for n in names[:5]] + [f"{prefix}/{n}" for n in names[5:]]
    lines += ["", str(folder / "gone.jpg"), f"{prefix}/gone-too.jpg"]  # blank: ignored; gone: skipped
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    lib = tmp_path / "lib"
    code, out = index("--file-list", listing, "-L", lib, "--model-dir", tiny_model_dir, "--precision", "fp32",
                      "--workers", "0", "--json")
    assert code == 0 and '"encoded": 12' in out and '"vanished": 2' in out, out
    with Library.open(lib) as library:
        got = stored_vectors(library)
    named = {(os.path.relpath(p, folder) if not p.startswith(prefix) else p[len(prefix) + 1:]): v
             for p, v in got.items()}
    assert sorted(p for p in got if not p.startswith(prefix)) == [str(folder / n) for n in names[:5]]
    assert_same(named, local_vectors)
    code, out = index("--file-list", listing, "-L", lib, "--json")  # again: all unchanged
    assert code == 0 and '"encoded": 0' in out and '"unchanged": 12' in out, out


def test_url_and_list_mistakes_are_one_line(tmp_path, tiny_model_dir):
    base = ["-L", tmp_path / "lib", "--model-dir", tiny_model_dir]
    code, out = index("nosuchproto://bucket/photos", *base)
    assert code == EXIT_USAGE and out.count("\n") == 1 and "Protocol not known" in out, out
    try:
        import s3fs  # noqa: F401
    except ImportError:  # the usual case here: the backend is the user's to install
        code, out = index("s3://bucket/photos/", *base)
        assert code == EXIT_USAGE and out.count("\n") == 1 and "s3fs" in out, out
    code, out = index("memory:///no-such-prefix", *base)
    assert code == EXIT_INPUT and out.count("\n") == 1 and "no such file or folder" in out, out
    (tmp_path / "empty.txt").write_text("\n\n")
    code, out = index("--file-list", tmp_path / "empty.txt", *base)
    assert code == EXIT_INPUT and "names no files" in out, out
    code, out = index(*base)
    assert code == EXIT_USAGE and "--file-list" in out, out
    assert not (tmp_path / "lib").exists()  # refused before a library was made


def test_mtime_from_each_backends_info():
    from datetime import datetime, timezone

    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ns = int(when.timestamp() * 1e9)
    assert remote.mtime_ns({"mtime": when.timestamp()}) == ns  # local
    assert remote.mtime_ns({"LastModified": when}) == ns  # s3fs
    assert remote.mtime_ns({"updated": "2026-01-02T03:04:05Z"}) == ns  # gcsfs
    assert remote.mtime_ns({"size": 3}) == 0
    assert remote.is_url("s3://b/k.jpg") and remote.is_url("zip://a.jpg::file:///x.zip")
    assert not remote.is_url("/data/photos") and not remote.is_url("C:/photos")


def write_zip(zip_path: Path, folder: Path, names: list[str]) -> None:
    """`names` (files of `folder`) under `photos/` in a zip, replaced whole (a new inode)."""
    import zipfile

    partial = zip_path.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w") as archive:
        for name in names:
            archive.write(folder / name, f"photos/{name}")
    partial.replace(zip_path)


def test_a_chained_zip_prefix_reruns_removes_and_adds_like_a_folder(folder, local_vectors, tiny_model_dir,
                                                                     tmp_path, store):
    """`zip://photos::file:///x.zip` names its inner path first, so its rows
    (`zip://photos/a.jpg::file:///x.zip`) are under it by prefix and suffix, not by prefix."""
    names = sorted(local_vectors)
    archive = tmp_path / "x.zip"
    write_zip(archive, folder, names[:-1])
    root = f"zip://photos::{archive.as_uri()}"
    lib = tmp_path / "lib"
    code, out = index(root, "-L", lib, "--model-dir", tiny_model_dir, "--precision", "fp32", "--workers", "0",
                      "--json")
    assert code == 0 and f'"encoded": {len(names) - 1}' in out, out
    with Library.open(lib) as library:
        got = stored_vectors(library)
    suffix = f"::{archive.as_uri()}"
    assert all(p.startswith("zip://photos/") and p.endswith(suffix) for p in got), sorted(got)[:2]
    assert_same({p[len("zip://photos/"):-len(suffix)]: v for p, v in got.items()},
                {n: local_vectors[n] for n in names[:-1]})
    code, out = index(root, "-L", lib, "--json")  # unchanged: nothing added, nothing removed
    assert code == 0 and '"encoded": 0' in out and '"removed": 0' in out, out
    assert f'"unchanged": {len(names) - 1}' in out and '"duplicates": 0' in out, out
    write_zip(archive, folder, names[1:-1])  # rewritten without the first photo
    code, out = index(root, "-L", lib, "--json")
    assert code == 0 and '"removed": 1' in out and '"encoded": 0' in out, out
    assert f'"unchanged": {len(names) - 2}' in out, out
    write_zip(archive, folder, names[1:])  # and one photo added
    code, out = index(root, "-L", lib, "--json")
    assert code == 0 and '"encoded": 1' in out and '"removed": 0' in out, out
    assert f'"unchanged": {len(names) - 2}' in out and '"duplicates": 0' in out, out
    with Library.open(lib) as library:
        assert len(stored_vectors(library)) == len(names) - 1
    found = CliRunner().invoke(cli.cli, ["search", "a shape", "-L", str(lib), "-k", "50", "--path", root,
                                         "--paths"])
    assert found.exit_code == 0 and len(found.output.split()) == len(names) - 1, found.output
    removed = CliRunner().invoke(cli.cli, ["remove", root, "-L", str(lib), "--json"])
    assert removed.exit_code == 0 and f'"removed": {len(names) - 1}' in removed.output, removed.output


def test_chained_folder_clause_and_local_paths_with_colons(tmp_path):
    """A local path holding `::` keeps the plain folder clause, byte for byte."""
    import zipfile

    from retrieval.store.sql import under_folder

    assert under_folder("/data/a::b/") == (
        "(path = :folder OR substr(path, 1, :folder_n) = :folder_prefix)",
        {"folder": "/data/a::b", "folder_n": 11, "folder_prefix": "/data/a::b/"})
    clause, params = under_folder("zip://photos/::file:///x.zip")
    assert params["folder"] == "zip://photos::file:///x.zip" and params["folder_prefix"] == "zip://photos/"
    assert params["folder_chain"] == "::file:///x.zip" and "length(path)" in clause
    zipfile.ZipFile(tmp_path / "x.zip", "w").close()
    uri = (tmp_path / "x.zip").as_uri()
    assert remote.canonical(f"zip://photos/::{uri}/") == f"zip://photos::{uri}"
    assert remote.canonical(f"zip://::{uri}") == f"zip://::{uri}"
