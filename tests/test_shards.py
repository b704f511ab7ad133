"""Shards and `clipfind ingest`, without a cluster: idempotent loads, and the faults refused whole.

The shards here hold real rows (real vectors of the tiny model, made by the single-process
indexer) written by the same ShardWriter `index --engine ray --output-shards` uses; the
Ray-made shards are checked end to end in tests/test_ray_engine.py (slow).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from retrieval import cli
from retrieval.errors import EXIT_INPUT, EXIT_LIBRARY, LibraryError
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.index.inspection import verify_library
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.store.library import Library
from retrieval.store.schema import Image, Run, blobs_to_matrix, path_from_db
from retrieval.store.shards import MANIFEST, ShardWriter, read_manifest


def stored(lib: Library) -> dict[str, np.ndarray]:
    with lib.session() as s:
        found = s.execute(select(Image.path, Image.path_bytes, Image.embedding)).all()
    return {path_from_db(r.path, r.path_bytes): blobs_to_matrix([r.embedding], lib.dim)[0] for r in found}


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir) -> Path:
    """A library indexed the ordinary way: what shards of its rows must reproduce."""
    root = tmp_path_factory.mktemp("shard-source")
    synthetic.write_collection(root / "photos", per_class=2, seed=21)
    with Library.open(root / "lib") as lib:
        index_paths(lib, [str(root / "photos")], ModelSpec(model_dir=str(tiny_model_dir)), precision="fp32",
                    options=IndexOptions(workers=0))
    return root / "lib"


def write_shards_of(lib_dir: Path, out: Path, per_shard: int = 7, fingerprint: str | None = None) -> Path:
    """The library's rows as shards, in the shape the Ray export writes them."""
    import os

    with Library.open(lib_dir) as lib:
        model = dict(lib.model_record)
        with lib.session() as s:
            rows = [{"path": os.fsencode(path_from_db(r.path, r.path_bytes)), "size": r.size,
                     "mtime_ns": r.mtime_ns, "content_hash": r.content_hash, "width": r.width,
                     "height": r.height, "format": r.format,
                     "taken_at": r.taken_at.isoformat() if r.taken_at else None, "embedding": r.embedding}
                    for r in s.scalars(select(Image).order_by(Image.id))]
    if fingerprint:
        model["fingerprint"] = fingerprint
    writer = ShardWriter(out, model, "fp32", "cpu")
    assert writer.open() == {}
    for i in range(0, len(rows), per_shard):
        writer.write(rows[i:i + per_shard])
    writer.finish([])
    return out


def ingest(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli.cli, ["ingest", *[str(a) for a in args]])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def test_ingest_reproduces_the_library_and_twice_adds_nothing(source, tmp_path):
    shards = write_shards_of(source, tmp_path / "shards")
    assert len(read_manifest(shards).shards) == 4  # 24 rows, 7 a shard
    code, out = ingest(shards, tmp_path / "lib", "--json")
    assert code == 0, out
    with Library.open(source) as a, Library.open(tmp_path / "lib") as b:
        want, got = stored(a), stored(b)
        assert a.model_record == b.model_record  # a new library takes the shards' model
        assert sorted(got) == sorted(want) and all(np.array_equal(got[p], want[p]) for p in want)
        assert verify_library(b).ok and b.vectors().index.ntotal == len(want)
        with b.session() as s:
            assert s.scalars(select(Run.precision)).all() == ["fp32"]
    again = CliRunner().invoke(cli.cli, ["ingest", str(shards), "-L", str(tmp_path / "lib"), "--json"])
    assert again.exit_code == 0, again.output
    assert '"added": 0' in again.output and '"updated": 0' in again.output and '"unchanged": 24' in again.output
    with Library.open(tmp_path / "lib") as b:
        assert b.image_count() == 24


def test_a_truncated_shard_is_refused_whole(source, tmp_path):
    shards = write_shards_of(source, tmp_path / "shards")
    last = tmp_path / "shards" / read_manifest(shards).shards[-1]["file"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    code, out = ingest(shards, tmp_path / "lib")
    assert code == EXIT_INPUT and out.count("\n") == 1 and "truncated" in out, out
    assert not (tmp_path / "lib").exists()  # checked before anything is made or written


def test_shards_of_another_model_are_refused(source, tmp_path):
    lib_dir = tmp_path / "lib"
    shutil.copytree(source, lib_dir)
    with Library.open(lib_dir) as lib:
        before = stored(lib)
    with Library.open(lib_dir) as lib, lib.session() as s, s.begin():
        s.query(Image).filter(Image.id % 2 == 0).delete()  # room for the shards to add rows
    shards = write_shards_of(source, tmp_path / "shards", fingerprint="0123456789abcdef01234567")
    code, out = ingest(shards, lib_dir)
    assert code == EXIT_LIBRARY and out.count("\n") == 1 and "fingerprint 0123456789abcdef01234567" in out, out
    with Library.open(lib_dir) as lib:
        assert lib.image_count() == len(before) // 2


def test_a_shard_swapped_in_from_another_model_is_refused(source, tmp_path):
    """The manifest's checksums pass when a shard and its line are both replaced; the shard's own
    parquet metadata still names the model that made it."""
    import json

    ours = write_shards_of(source, tmp_path / "ours")
    theirs = write_shards_of(source, tmp_path / "theirs", fingerprint="fedcba9876543210fedcba98")
    doc = json.loads((ours / MANIFEST).read_text())
    foreign = json.loads((theirs / MANIFEST).read_text())["shards"][0]
    shutil.copy(theirs / foreign["file"], ours / foreign["file"])
    doc["shards"][0] = foreign
    (ours / MANIFEST).write_text(json.dumps(doc))
    code, out = ingest(ours, tmp_path / "lib")
    assert code == EXIT_LIBRARY and out.count("\n") == 1 and "fedcba9876543210fedcba98" in out, out
    assert not (tmp_path / "lib").exists()


def test_not_a_shard_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    code, out = ingest(tmp_path / "empty", tmp_path / "lib")
    assert code == EXIT_INPUT and out.count("\n") == 1 and "manifest.json" in out, out


def test_a_killed_writer_leaves_listed_shards_whole_and_a_rerun_takes_over(source, tmp_path):
    """What a kill between a shard's rename and its manifest leaves (an unlisted shard) is removed;
    the listed rows come back to the resumed writer, so it writes only the rest."""
    shards = write_shards_of(source, tmp_path / "shards")
    manifest = read_manifest(shards)
    (shards / "shard-deadbeef-00009.parquet").write_bytes(b"PAR1 half a shard")
    (shards / ".shard-deadbeef-00010.parquet.tmp").write_bytes(b"PAR1")
    with Library.open(source) as lib:
        writer = ShardWriter(shards, dict(lib.model_record), "fp32", "cpu")
    done = writer.open()
    assert len(done) == manifest.rows == 24
    assert sorted(p.name for p in shards.iterdir()) == sorted([MANIFEST, *(s["file"] for s in manifest.shards)])
    with Library.open(source) as lib:
        other = ShardWriter(shards, {**lib.model_record, "fingerprint": "another"}, "fp32", "cpu")
    with pytest.raises(LibraryError, match="another model"):
        other.open()


def test_files_the_workers_could_not_decode_are_the_ingest_runs_skips(source, tmp_path):
    """Recorded as `index` records its skips (error rows of the run, runs.stats, --json, -v), once."""
    import json

    shards = write_shards_of(source, tmp_path / "shards")
    doc = json.loads((shards / MANIFEST).read_text())
    doc["skipped"] = [{"path": "/photos/broken.jpg", "kind": "corrupt", "message": "broken.jpg: JPEG header unreadable"},
                      {"path": "/photos/half.jpg", "kind": "truncated", "message": "half.jpg: truncated file"}]
    (shards / MANIFEST).write_text(json.dumps(doc))
    result = CliRunner().invoke(cli.cli, ["ingest", str(shards), str(tmp_path / "lib"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["skipped"] == 2 and out["skipped_by_kind"] == {"corrupt": 1, "truncated": 1}
    assert [s["path"] for s in out["skipped_files"]] == ["/photos/broken.jpg", "/photos/half.jpg"]
    with Library.open(tmp_path / "lib") as lib, lib.session() as s:
        from retrieval.store.schema import ErrorRow

        rows = s.execute(select(ErrorRow.run_id, ErrorRow.path, ErrorRow.kind).order_by(ErrorRow.path)).all()
        run = s.execute(select(Run.id, Run.stats).order_by(Run.id.desc())).first()
    assert rows == [(run.id, "/photos/broken.jpg", "corrupt"), (run.id, "/photos/half.jpg", "truncated")]
    assert run.stats["skipped_by_kind"] == {"corrupt": 1, "truncated": 1}
    again = CliRunner().invoke(cli.cli, ["ingest", str(shards), str(tmp_path / "lib"), "-v"])
    assert again.exit_code == 0 and "skipped 2 files: 1 corrupt, 1 truncated" in again.output, again.output
    assert "truncated   /photos/half.jpg: truncated file" in again.output
    with Library.open(tmp_path / "lib") as lib, lib.session() as s:
        from retrieval.store.schema import ErrorRow

        assert s.query(ErrorRow).count() == 2  # the same failures again: not recorded twice
    status = CliRunner().invoke(cli.cli, ["status", "-L", str(tmp_path / "lib"), "--json"])
    info = json.loads(status.output)
    assert info["last_index_run"]["kind"] == "ingest" and info["skipped_last_index_run"] == 2
    assert info["errors_recorded"] == 2
