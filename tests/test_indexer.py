"""The indexing pipeline through the library API: incremental runs, moves, duplicates, FAISS."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select, text

from retrieval.errors import InputError, LibraryError, ModelError
from retrieval.facade import Library
from retrieval.index.indexer import IndexOptions, index_paths, remove_paths
from retrieval.index.inspection import library_status, verify_library
from retrieval.index.refresh import rebuild_index
from retrieval.media import synthetic
from retrieval.media.images import open_image
from retrieval.model.encoder import ModelSpec
from retrieval.store.schema import Image, Run, blobs_to_matrix, path_from_db


@pytest.fixture
def spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec(model_dir=str(tiny_model_dir))


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    synthetic.write_collection(root, per_class=2, seed=11, labels=synthetic.LABELS[:6])
    return root


@pytest.fixture
def library(tmp_path, spec, store):
    """A new library on each store (SQLite, PostgreSQL): every test here runs on both."""
    lib = Library.open(tmp_path / "lib", model=spec)
    yield lib
    lib.close()


def run(library, roots, spec=None, precision="auto", **options) -> dict:
    options.setdefault("workers", 0)
    result = index_paths(library, [str(r) for r in roots], spec, precision=precision,
                         options=IndexOptions(**options))
    return result.stats


def rows(library) -> dict[str, tuple[int, np.ndarray]]:
    """path -> (id, vector) for every row."""
    with library.session() as s:
        found = s.execute(select(Image.id, Image.path, Image.path_bytes, Image.embedding)).all()
    dim = library.dim
    return {path_from_db(r.path, r.path_bytes): (r.id, blobs_to_matrix([r.embedding], dim)[0])
            for r in found}


def faiss_ids(library) -> set[int]:
    import faiss

    vectors = library.vectors()
    return set(faiss.vector_to_array(vectors.index.id_map).tolist())


def test_first_run_stores_unit_vectors_matching_direct_encoding(library, photos, spec):
    # fp32: dynamic int8 scales activations per batch, so its vectors depend on batch-mates
    stats = run(library, [photos], spec, precision="fp32", workers=2, batch_size=5)
    assert stats["encoded"] == stats["indexed"] == 12 and stats["skipped"] == 0
    got = rows(library)
    assert len(got) == 12 and faiss_ids(library) == {i for i, _ in got.values()}
    encoder = library.encoder()
    some = sorted(got)[:3]
    direct = encoder.encode_images([open_image(p, draft_size=(encoder.image_size,) * 2) for p in some])
    stored = np.stack([got[p][1] for p in some])
    assert np.allclose(stored, direct, atol=1e-5)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)
    with library.session() as s:
        row = s.scalars(select(Image).limit(1)).one()
        assert (row.width, row.height, row.format) == (128, 128, "JPEG") and len(row.content_hash) == 32
        run_row = s.get(Run, row.run_id)
        assert (run_row.status, run_row.precision, run_row.device) == ("done", "fp32", "cpu")
    assert verify_library(library).ok
    info = library_status(library)
    assert info["images"] == 12 and info["index"]["type"] == "Flat" and info["last_run"]["status"] == "done"


def test_unchanged_rerun_encodes_nothing_and_does_not_load_the_model(tmp_path, photos, spec, store):
    with Library.open(tmp_path / "lib", model=spec) as lib:
        run(lib, [photos], spec)
    with Library.open(tmp_path / "lib") as lib:  # a fresh process would start like this
        stats = lib.index(photos, workers=0).stats
        assert stats["encoded"] == 0 and stats["unchanged"] == 12 and lib.loaded_encoder is None
        assert stats["faiss"] == "ok"


def test_changes_moves_duplicates_and_deletions(library, photos, spec):
    run(library, [photos], spec)
    before = rows(library)
    files = sorted(before)
    changed, moved, deleted, copied, touched = files[0], files[1], files[2], files[3], files[4]
    PILImage.new("RGB", (96, 64), (10, 200, 30)).save(changed, quality=90)
    target = str(photos / "elsewhere" / "renamed.jpg")
    os.makedirs(os.path.dirname(target))
    os.rename(moved, target)
    os.remove(deleted)
    copy_path = str(photos / "copy.jpg")
    shutil.copyfile(copied, copy_path)
    twin_a, twin_b = str(photos / "twin_a.png"), str(photos / "twin_b.png")
    PILImage.new("RGB", (64, 64), (200, 20, 20)).save(twin_a)
    shutil.copyfile(twin_a, twin_b)
    os.utime(touched, ns=(1_000_000_000, 1_000_000_000))

    stats = run(library, [photos])
    assert stats["encoded"] == 2  # the changed file and one of the twins; nothing else
    assert (stats["moved"], stats["duplicates"], stats["removed"], stats["touched"]) == (1, 2, 1, 1)
    after = rows(library)
    assert deleted not in after and moved not in after
    assert after[changed][0] == before[changed][0] and not np.allclose(after[changed][1], before[changed][1])
    assert after[target][0] == before[moved][0] and np.array_equal(after[target][1], before[moved][1])
    assert after[copy_path][0] != before[copied][0] and np.array_equal(after[copy_path][1], before[copied][1])
    assert np.array_equal(after[twin_a][1], after[twin_b][1])
    assert after[touched][0] == before[touched][0]
    assert np.array_equal(after[touched][1], before[touched][1])
    assert faiss_ids(library) == {i for i, _ in after.values()}
    assert verify_library(library).ok
    assert run(library, [photos])["encoded"] == 0


def test_moved_file_with_a_second_copy_encodes_nothing(library, photos, spec):
    run(library, [photos], spec)
    before = rows(library)
    source = sorted(before)[0]
    shutil.copyfile(source, photos / "copy-of-moved.jpg")  # listed before the moved file
    target = photos / "elsewhere" / os.path.basename(source)
    target.parent.mkdir()
    os.rename(source, target)
    stats = run(library, [photos])
    assert (stats["encoded"], stats["moved"], stats["duplicates"]) == (0, 1, 1)
    after = rows(library)
    assert after[str(target)][0] == before[source][0]  # the same name wins the move
    assert np.array_equal(after[str(photos / "copy-of-moved.jpg")][1], before[source][1])


def test_changed_file_that_breaks_loses_its_row(library, photos, spec):
    run(library, [photos], spec)
    victim = sorted(rows(library))[0]
    with open(victim, "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    stats = run(library, [photos])
    assert stats["skipped"] == 1 and victim not in rows(library)
    assert verify_library(library).ok


def test_roots_only_touch_their_own_rows(library, photos, tmp_path, spec):
    other = tmp_path / "other"
    synthetic.write_collection(other, per_class=1, seed=5, labels=synthetic.LABELS[:2])
    run(library, [photos, other], spec)
    assert len(rows(library)) == 14
    shutil.rmtree(other / synthetic.label_dirname(synthetic.LABELS[0]))
    assert run(library, [photos])["removed"] == 0  # `other` was not scanned: its rows stay
    assert run(library, [other])["removed"] == 1


def test_remove_by_file_and_folder_prefix(library, photos, spec):
    run(library, [photos], spec)
    red_circle = photos / synthetic.label_dirname("red circle")
    lookalike = photos / (red_circle.name + "_2")
    shutil.copytree(red_circle, lookalike)
    run(library, [photos])
    assert len(rows(library)) == 14
    assert remove_paths(library, [red_circle], dry_run=True) == 2 and len(rows(library)) == 14
    assert remove_paths(library, [red_circle]) == 2
    left = rows(library)
    assert len(left) == 12 and all(str(lookalike) in p or str(red_circle) not in p for p in left)
    assert remove_paths(library, [sorted(left)[0]]) == 1
    assert remove_paths(library, [photos / "nothing-here"]) == 0
    assert faiss_ids(library) == {i for i, _ in rows(library).values()} and verify_library(library).ok


def test_index_types_and_reindex(library, photos, spec):
    run(library, [photos], spec, index_type="IVF2,Flat")
    assert library_status(library)["index"]["type"] == "IVF2,Flat"
    assert verify_library(library).ok
    stats = rebuild_index(library, "HNSW8")
    assert stats == {**stats, "index_type": "HNSW8", "vectors": 12}
    assert verify_library(library).ok
    assert rebuild_index(library)["index_type"] == "HNSW8"  # kept
    with pytest.raises(InputError, match="not a FAISS index factory"):
        rebuild_index(library, "NoSuchIndex99")
    with pytest.raises(InputError, match="cannot build"):
        rebuild_index(library, "IVF64,Flat")  # 64 centroids from 12 vectors
    assert library_status(library)["index"]["type"] == "HNSW8"  # the failed builds changed nothing
    assert verify_library(library).ok


def test_flat_index_grows_into_ivf(library, photos, spec, monkeypatch):
    import retrieval.index.refresh as refresh
    import retrieval.store.vectors as vectors

    run(library, [photos], spec)
    monkeypatch.setattr(refresh, "EXACT_LIMIT", 10)
    monkeypatch.setattr(vectors, "EXACT_LIMIT", 10)
    monkeypatch.setattr(vectors, "choose_factory", lambda n, dim: "IVF2,Flat")
    monkeypatch.setattr(refresh, "choose_factory", lambda n, dim: "IVF2,Flat")
    shutil.copyfile(sorted(rows(library))[0], photos / "one-more.jpg")
    assert run(library, [photos])["faiss"] == "rebuilt"
    assert library_status(library)["index"]["type"] == "IVF2,Flat"


def test_dry_run_changes_nothing(library, photos, spec):
    result = index_paths(library, [str(photos)], spec, options=IndexOptions(dry_run=True))
    assert result.dry_run and len(result.plan.encode) == 12
    assert library.image_count() == 0 and library.model_record is None


def test_model_rules(tmp_path, photos, spec, store):
    with Library.open(tmp_path / "lib") as lib:
        with pytest.raises(ModelError, match="no model given"):
            index_paths(lib, [str(photos)])
        run(lib, [photos], spec)
    with pytest.raises(LibraryError, match="was made with"):
        Library.open(tmp_path / "lib", model=ModelSpec(model="ViT-B-32", random_weights=True))
    with Library.open(tmp_path / "lib") as lib, pytest.raises(InputError, match="no such file"):
        index_paths(lib, [str(tmp_path / "nope")])


def test_stale_running_runs_are_marked_interrupted(library, photos, spec):
    stale = library.start_run("index")
    run(library, [photos], spec)
    with library.session() as s:
        assert s.get(Run, stale).status == "interrupted"


def test_reindex_interrupted_is_recorded_as_interrupted(library, photos, spec, monkeypatch):
    import retrieval.index.refresh as refresh

    run(library, [photos], spec)

    def cut(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refresh, "refresh_vectors", cut)
    with pytest.raises(KeyboardInterrupt):
        rebuild_index(library)
    with library.session() as s:
        last = s.scalars(select(Run).order_by(Run.id.desc())).first()
    assert (last.kind, last.status) == ("reindex", "interrupted")


def test_verify_finds_missing_files_bad_vectors_and_a_wrong_index(library, photos, spec):
    import faiss

    run(library, [photos], spec)
    got = rows(library)
    os.remove(sorted(got)[0])
    report = verify_library(library)
    assert not report.ok and report.missing == [sorted(got)[0]]
    assert verify_library(library, check_files=False).ok

    vectors = library.vectors()  # a saved index that silently lost a vector
    vectors.index.remove_ids(np.array([got[sorted(got)[1]][0]], dtype=np.int64))
    vectors.index.add_with_ids(np.ones((1, library.dim), np.float32) / np.sqrt(library.dim),
                               np.array([10_000], dtype=np.int64))
    vectors.save()
    report = verify_library(library, check_files=False)
    assert report.found("faiss_ids") and "FAISS ids differ" in str(report.problems[0])

    rebuild_index(library)
    vectors = library.vectors()
    wrong = vectors.reconstruct(got[sorted(got)[2]][0]) * -1
    vectors.index.remove_ids(np.array([got[sorted(got)[2]][0]], dtype=np.int64))
    vectors.index.add_with_ids(wrong[None, :], np.array([got[sorted(got)[2]][0]], dtype=np.int64))
    vectors.save()
    report = verify_library(library, check_files=False)
    assert report.found("faiss_vectors") and not report.found("faiss_ids")
    assert faiss.vector_to_array(vectors.index.id_map).size == 12

    rebuild_index(library)
    with library.engine.begin() as conn:
        conn.execute(text("UPDATE images SET embedding = :e WHERE id = :i"),
                     {"e": bytes(4), "i": got[sorted(got)[3]][0]})
    report = verify_library(library, check_files=False)
    assert report.found("bad_vectors") and "FAISS not checked" in report.notes[-1]
