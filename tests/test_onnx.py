"""ONNX export and the torch-free query path: agreement with torch fp32, faults, fallbacks."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.facade import Library
from retrieval.media import synthetic
from retrieval.model.autoprecision import topk_overlap
from retrieval.model.onnx_export import (
    MANIFEST,
    export_towers,
    problems,
    read_manifest,
)
from retrieval.model.onnx_session import OnnxEncoder
from retrieval.model.spec import ModelSpec
from retrieval.store.onnx_exports import ensure_export, export_folder

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent.parent / "shared" / "data" / "cifar10" / "test"
TEXTS = [template.format(label) for template in ("a photo of a {}.", "a {}.", "{}", "a drawing of a {}")
         for label in synthetic.LABELS] + ["", "🐶 on a beach", "a very long query " * 20, "RED!!"]


def pictures(size: int, count: int = 48) -> list:
    rng = random.Random(5)
    images = [synthetic.draw(synthetic.LABELS[i % len(synthetic.LABELS)], size, rng) for i in range(count)]
    if CIFAR.is_dir():
        from PIL import Image

        images += [Image.open(p).convert("RGB") for p in sorted(CIFAR.glob("*/000*.jpg"))[:20]]
    return images


def agreement(reference, candidate, texts, images) -> dict:
    """Mean cosine of text and image vectors, and text->image top-10 overlap, candidate vs reference."""
    ref_t, cand_t = reference.encode_texts(texts), candidate.encode_texts(texts)
    ref_i, cand_i = reference.encode_images(images), candidate.encode_images(images)
    return {"text_cos": float(np.sum(ref_t * cand_t, axis=1).mean()),
            "image_cos": float(np.sum(ref_i * cand_i, axis=1).mean()),
            "overlap": _overlap(ref_t, ref_i, cand_t, cand_i)}


def _overlap(ref_t, ref_i, cand_t, cand_i, k: int = 10) -> float:
    ref_top = np.argsort(-(ref_t @ ref_i.T), axis=1, kind="stable")[:, :k]
    cand_top = np.argsort(-(cand_t @ cand_i.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top.tolist(), cand_top.tolist())]))


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    from retrieval.model.encoder import Encoder

    return Encoder(ModelSpec(model_dir=str(tiny_model_dir)), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def tiny_export(tiny_encoder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("onnx") / "fp32"
    export_towers(tiny_encoder, folder, "fp32")
    return folder


def test_onnx_agrees_with_torch_fp32(tiny_encoder, tiny_export):
    figures = agreement(tiny_encoder, OnnxEncoder(tiny_export), TEXTS, pictures(tiny_encoder.image_size))
    assert figures["text_cos"] >= 0.999 and figures["image_cos"] >= 0.999, figures
    assert figures["overlap"] >= 0.95, figures


def test_one_shot_sessions_load_unoptimised_and_agree(tiny_export):
    """A fresh `clipfind search` skips the graph optimisations (they cost more than they save
    on one run): same vectors, up to float error."""
    texts, images = TEXTS[:12], pictures(32, 8)
    warm, once = OnnxEncoder(tiny_export), OnnxEncoder(tiny_export, one_shot=True)
    assert once.session("text").get_session_options().graph_optimization_level.name == "ORT_DISABLE_ALL"
    assert warm.session("text").get_session_options().graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert np.abs(warm.encode_texts(texts) - once.encode_texts(texts)).max() < 1e-5
    assert np.abs(warm.encode_images(images) - once.encode_images(images)).max() < 1e-5


def test_server_text_sessions_prepack_and_take_the_wide_one_only_on_idle_cores(tiny_export, monkeypatch):
    """The server's text tower: pre-packed, 1 thread while other work runs, `wide_threads` while
    the cores are idle; both sessions give the same vectors, up to float error."""
    from retrieval import config

    texts = TEXTS[:12]
    one_thread = OnnxEncoder(tiny_export).encode_texts(texts)
    served = OnnxEncoder(tiny_export, prepack=("text",), wide_threads=2)
    monkeypatch.setattr(config, "query_threads", lambda: 1)  # another process holds a core
    busy = served.encode_texts(texts)
    assert served.loaded_sessions == [("text", 1)]
    monkeypatch.setattr(config, "query_threads", lambda: 2)  # both cores idle
    idle = served.encode_texts(texts)
    assert served.loaded_sessions == [("text", 1), ("text", 2)]
    assert served.session("text", 2).get_session_options().intra_op_num_threads == 2
    unpacked = OnnxEncoder(tiny_export).session("text").get_session_options()
    assert unpacked.get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(Exception, match="does not have configuration"):  # pre-packing left on
        served.session("text").get_session_options().get_session_config_entry("session.disable_prepacking")
    served.encode_images(pictures(32, 2))
    assert ("image", 2) not in served.loaded_sessions  # images keep one session
    assert np.abs(busy - one_thread).max() < 1e-5 and np.abs(idle - one_thread).max() < 1e-5
    fixed = OnnxEncoder(tiny_export, threads=2, wide_threads=2)  # no wider than its own: no second session
    assert fixed.session_threads("text") == [2]


def test_int8_image_tower_agrees_and_is_smaller(tiny_encoder, tiny_export, tmp_path):
    manifest = export_towers(tiny_encoder, tmp_path / "int8", "int8")
    assert set(manifest["files"]) == {"image"}
    fp32_bytes = sum(read_manifest(tiny_export)["files"][role]["bytes"] for role in ("image", "image_data"))
    assert manifest["files"]["image"]["bytes"] < fp32_bytes / 2
    images = pictures(tiny_encoder.image_size)
    ref, got = tiny_encoder.encode_images(images), OnnxEncoder(tmp_path / "int8").encode_images(images)
    cos = np.sum(ref * got, axis=1)
    assert cos.mean() >= 0.995, cos.mean()
    queries = tiny_encoder.encode_texts(TEXTS[:24])
    assert topk_overlap(ref, got, queries) >= 0.9


def test_manifest_records_what_a_query_needs(tiny_encoder, tiny_export):
    manifest = read_manifest(tiny_export)
    assert manifest["fingerprint"] == tiny_encoder.fingerprint and manifest["embed_dim"] == tiny_encoder.embed_dim
    assert manifest["tokenizer"] == {"kind": "clip-bpe", "clean": "lower", "context_length": 16}
    assert manifest["dynamic_length"] is True  # a causal CLIP text tower: queries cut their tokens
    assert manifest["preprocess"]["size"] == [32, 32] and manifest["preprocess_supported"]
    assert set(manifest["files"]) == {"text", "text_data", "image", "image_data", "vocab"}
    assert manifest["files"]["text_data"]["bytes"] > 10 * manifest["files"]["text"]["bytes"]  # weights outside
    assert problems(tiny_export, tiny_encoder.fingerprint, "fp32", full=True) == []
    assert problems(tiny_export, "other-weights", "fp32")  # stale


def test_interrupted_export_leaves_no_half_written_folder(tiny_encoder, tmp_path, monkeypatch):
    from retrieval.model import onnx_export

    real = onnx_export.export_graph

    def cut(module, example, path, name, **kwargs):
        if name == "pixels":  # the text tower is written, then Ctrl-C
            raise KeyboardInterrupt
        real(module, example, path, name, **kwargs)

    monkeypatch.setattr(onnx_export, "export_graph", cut)
    with pytest.raises(KeyboardInterrupt):
        export_towers(tiny_encoder, tmp_path / "fp32", "fp32")
    assert list(tmp_path.iterdir()) == []


# -- the library side ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("onnx-lib")
    synthetic.write_collection(base / "photos", per_class=3, seed=9)
    lib = Library.open(base / "lib")
    result = lib.index(base / "photos", ModelSpec(model_dir=str(tiny_model_dir)), workers=0)
    assert not result.warnings, result.warnings
    lib.close()
    return base


def _search(root: Path, runtime: str, text: str = "a red circle", image: str | None = None) -> dict:
    """A fresh process that searches and reports its results, warnings and heavy imports."""
    code = f"""
import json, sys
from retrieval.facade import Library
from retrieval.query.search import Searcher, Query
from retrieval.query.textcache import TextCache
lib = Library.open({str(root / 'lib')!r}, create=False)
s = Searcher(lib, runtime={runtime!r}, cache=TextCache(None))  # no cache: every text is encoded
r = s.search(Query.build({text!r} if {image!r} is None else (), {image!r} or ()), k=10)
onnx = s.runtimes.onnx_encoder
print(json.dumps({{"paths": [x.path for x in r], "scores": [x.score for x in r], "warnings": r.warnings,
    "torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules,
    "towers": onnx.loaded_towers if onnx else [], "used": sorted(s.runtimes.used)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_first_index_exports_and_a_text_query_needs_no_torch(library):
    folder = next((library / "lib" / "onnx").glob("*/fp32"))
    assert read_manifest(folder) is not None
    onnx = _search(library, "auto", "a blue square")
    assert onnx["used"] == ["onnx"] and not onnx["torch"] and not onnx["open_clip"], onnx
    assert onnx["towers"] == ["text"] and not onnx["warnings"]
    torch = _search(library, "torch", "a blue square")
    assert torch["used"] == ["torch"] and torch["torch"]
    assert onnx["paths"] == torch["paths"]
    assert np.allclose(onnx["scores"], torch["scores"], atol=1e-4)


def test_image_query_loads_only_the_image_tower(library, tmp_path):
    query = tmp_path / "query.png"
    synthetic.draw("green triangle", 48, random.Random(1)).save(query)  # not in the library
    onnx = _search(library, "onnx", image=str(query))
    torch = _search(library, "torch", image=str(query))
    assert onnx["towers"] == ["image"] and not onnx["torch"], onnx
    assert onnx["paths"][:5] == torch["paths"][:5]
    assert np.allclose(onnx["scores"], torch["scores"], atol=1e-4)


def test_a_large_query_photo_is_decoded_as_the_indexer_decodes_it(library, tiny_model_dir, tmp_path):
    """JPEG draft mode, as indexing uses: the query vector of a file equals the vector indexing
    that file stores (and a full decode, as before, would not)."""
    from retrieval.media.images import open_image
    from retrieval.query.search import Searcher
    from retrieval.query.textcache import TextCache

    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    drawn = np.asarray(synthetic.draw("green triangle", 960, random.Random(3)), dtype=np.float32)
    grain = np.random.default_rng(3).normal(0, 60, drawn.shape)  # fine detail: decodes differ
    Image.fromarray(np.clip(drawn + grain, 0, 255).astype(np.uint8)).save(photos / "big.jpg", quality=90)
    with Library.open(tmp_path / "other") as other:
        other.index(photos, ModelSpec(model_dir=str(tiny_model_dir)), workers=0)
        stored, stored_id = Searcher(other, cache=TextCache(None)).image_vector(str(photos / "big.jpg"), [])
    assert stored_id is not None  # the row's own vector, as indexing made it
    with Library.open(library / "lib", create=False) as lib:
        searcher = Searcher(lib, runtime="onnx", cache=TextCache(None))
        query, own_id = searcher.image_vector(str(photos / "big.jpg"), [])
        full = searcher.runtimes.onnx_encoder.encode_images([open_image(photos / "big.jpg")])[0]
    assert own_id is None and searcher.runtimes.used == {"onnx"}
    assert float(query @ stored) >= 0.99999, float(query @ stored)
    # the test tells the two decodes apart: a full decode misses by 5x the tolerance above, or more
    # (0.99984 here; 640 px with less grain gave 0.99994, too close to call on some CPUs)
    assert float(full @ stored) < 0.99995, float(full @ stored)


@pytest.mark.parametrize("damage", ["truncate", "stale", "remove"])
def test_damaged_export_is_rebuilt_with_a_notice(library, damage):
    with Library.open(library / "lib", create=False) as lib:
        folder = export_folder(lib)
    if damage == "truncate":
        path = folder / "text.onnx.data"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "stale":
        manifest = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": "older-weights"}))
    else:
        import shutil

        shutil.rmtree(folder)
    with Library.open(library / "lib", create=False) as lib:
        from retrieval.index.inspection import verify_library

        if damage == "truncate":
            found = verify_library(lib, check_files=False).problems
            assert [p.kind for p in found] == ["onnx_export"] and "truncated" in found[0].message
    result = _search(library, "auto", "a yellow star")
    assert result["used"] == ["onnx"] and len(result["warnings"]) == 1, result
    assert "exporting the model to ONNX" in result["warnings"][0]
    with Library.open(library / "lib", create=False) as lib:
        assert problems(export_folder(lib), lib.model_record["fingerprint"], "fp32", full=True) == []
        assert ensure_export(lib) == export_folder(lib)


def test_no_onnxruntime_falls_back_to_torch_with_one_notice(library, monkeypatch):
    from retrieval.query.search import Query, Searcher

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with Library.open(library / "lib", create=False) as lib:
        searcher = Searcher(lib, runtime="auto")
        first = searcher.search(Query.build("a red square"), k=5)
        second = searcher.search(Query.build("a blue circle"), k=5)
    assert [w for w in first.warnings if "onnxruntime is not installed" in w] == first.warnings
    assert len(first.warnings) == 1 and second.warnings == []
    assert searcher.runtimes.used == {"torch"} and len(first) == 5


def test_unloadable_export_falls_back_to_torch(library, tmp_path):
    with Library.open(library / "lib", create=False) as lib:
        path = export_folder(lib) / "text.onnx"
    original = path.read_bytes()
    try:
        path.write_bytes(b"\0" * len(original))  # same size, so only ONNX Runtime notices
        result = _search(library, "auto", "a purple triangle")
        assert result["used"] == ["torch"] and "ONNX Runtime cannot load" in result["warnings"][0]
    finally:
        path.unlink()
        path.write_bytes(original)


@pytest.mark.slow
def test_vit_b_32_export_agrees_with_torch(tmp_path):
    """The export path on a real architecture (random weights: agreement, not quality)."""
    from retrieval.model.encoder import Encoder

    encoder = Encoder(ModelSpec(model="ViT-B-32", random_weights=True), device="cpu", precision="fp32")
    assert export_towers(encoder, tmp_path / "fp32", "fp32")["dynamic_length"] is True
    figures = agreement(encoder, OnnxEncoder(tmp_path / "fp32", threads=None), TEXTS[:16], pictures(64, 16))
    assert figures["text_cos"] >= 0.999 and figures["image_cos"] >= 0.999, figures


def test_an_int8_export_quantised_another_way_is_stale(tmp_path):
    """int8 exports are U8U8 (signed weights saturated on CPUs without VNNI): an older int8
    export must be remade, not reused."""
    import json

    from retrieval.model.onnx_export import EXPORT_VERSION, MANIFEST, QUANTISATION, problems

    manifest = {"version": EXPORT_VERSION, "fingerprint": "f", "precision": "int8", "files": {}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert "quantised another way" in problems(tmp_path, "f", "int8")[0]
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "quantisation": QUANTISATION}))
    assert problems(tmp_path, "f", "int8") == []
