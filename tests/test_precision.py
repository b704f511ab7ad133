"""CPU precision as a measured choice: towers, agreement checks, auto's pick, the cache, mixed libraries.

No timing is asserted anywhere: the machine is shared. Rates are only fed in
by hand (to `pick`) or taken as whatever was measured.
"""

from __future__ import annotations

import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from retrieval import config
from retrieval.config import cpu_has_native_bf16
from retrieval.errors import ModelError
from retrieval.index.reembed import reembed
from retrieval.media import synthetic
from retrieval.model import autoprecision as precision
from retrieval.model import precision_cache, runtime
from retrieval.model.encoder import Encoder, ModelSpec, resolve_precision
from retrieval.store import runs as run_sql

ONNX_MODES = ["onnx-fp32", "onnx-int8"] if precision_cache.onnxruntime_version() else []
CPU_MODES = ["int8", *(["bf16"] if cpu_has_native_bf16() else []), *ONNX_MODES]
QUERIES = [f"a photo of a {label}." for label in synthetic.LABELS]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private precision cache (the tiny model itself stays where the suite keeps it)."""
    monkeypatch.setenv("CLIPFIND_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / precision_cache.CACHE_FILE


@pytest.fixture(scope="module")
def tiny_spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec(model_dir=str(tiny_model_dir))


@pytest.fixture(scope="module")
def encoder(tiny_spec, tmp_path_factory) -> Encoder:
    """One fp32 tiny encoder for the module (forced fp32 measures nothing)."""
    return Encoder(tiny_spec, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def pictures() -> list:
    rng = random.Random(8)
    return [synthetic.draw(label, 32, rng) for label in synthetic.LABELS for _ in range(6)]


@pytest.fixture(scope="module")
def broken_int8_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with one huge weight per MLP whose output channel is then thrown away.

    fp32 computes exactly the same function as the tiny model (that channel is
    multiplied by zero), but int8's per-tensor weight scale now fits the huge
    value, so every other weight of those layers rounds to zero.
    """
    out = tmp_path_factory.mktemp("broken-int8")
    shutil.copy(tiny_model_dir / "open_clip_config.json", out)
    state = load_file(str(tiny_model_dir / "open_clip_model.safetensors"))
    for name in [n for n in state if n.startswith("visual.") and n.endswith("mlp.c_fc.weight")]:
        fc, proj = state[name].clone(), state[name.replace("c_fc", "c_proj")].clone()
        fc[0, :] = 0.0
        fc[0, 0] = 1e4
        proj[:, 0] = 0.0
        state[name], state[name.replace("c_fc", "c_proj")] = fc, proj
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


# -- towers ------------------------------------------------------------------------------


def test_split_attention_is_the_same_maths(encoder):
    """The nn.Linear form of self-attention (what lets int8 reach q/k/v) changes nothing in fp32."""
    clone = runtime.image_model_at(encoder.model, "fp32")
    runtime.split_self_attention(clone.visual)
    assert any(isinstance(m, runtime.SelfAttention) for m in clone.visual.modules())
    assert not any(isinstance(m, runtime.SelfAttention) for m in encoder.model.modules())  # original kept
    x = torch.randn(5, 3, encoder.image_size, encoder.image_size)
    with torch.inference_mode():
        torch.testing.assert_close(clone.encode_image(x), encoder.model.encode_image(x), atol=1e-5, rtol=1e-4)


def test_int8_tower_quantises_attention_and_mlp_and_shares_the_text_tower(encoder):
    int8 = runtime.image_model_at(encoder.model, "int8")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    layers = list(int8.visual.modules())
    assert sum(isinstance(m, DynamicQuantizedLinear) for m in layers) == 4 * len(encoder.model.visual.transformer.resblocks)
    assert not any(type(m) is torch.nn.Linear for m in layers)  # attention projections included
    assert int8.transformer is encoder.model.transformer  # the text tower is not copied
    assert type(encoder.model.visual.transformer.resblocks[0].mlp.c_fc) is torch.nn.Linear
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    bf16 = runtime.image_model_at(encoder.model, "bf16")
    assert {p.dtype for p in bf16.visual.parameters()} == {torch.bfloat16} and bf16.input_dtype == torch.bfloat16
    after = encoder.model.state_dict()  # building towers never touches the fp32 model
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


# -- agreement ---------------------------------------------------------------------------


def test_topk_overlap_and_cosine_arithmetic():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 8)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    queries = ref[:4]
    assert precision.topk_overlap(ref, ref, queries) == 1.0
    assert precision.cosine_agreement(ref, ref)["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    shuffled = ref[rng.permutation(30)]
    assert precision.topk_overlap(ref, shuffled, queries) < 0.9
    verdict = precision.judge(ref, shuffled, queries)
    assert verdict["ok"] is False and verdict["cosine_mean"] < precision.MIN_COSINE


@pytest.mark.parametrize("mode", CPU_MODES)
def test_each_mode_agrees_with_fp32_on_the_tiny_model(encoder, pictures, mode):
    figures = precision.agreement_with_fp32(encoder, mode, pictures, QUERIES)
    assert figures["ok"], figures
    assert figures["cosine_mean"] >= precision.MIN_COSINE
    assert figures["top10_overlap"] >= precision.MIN_OVERLAP


@pytest.mark.skipif(cpu_has_native_bf16(), reason="this CPU has bf16")
def test_bf16_refused_on_a_cpu_without_it():  # pragma: no cover - depends on the CPU
    with pytest.raises(ModelError, match="AVX512-BF16 or AMX"):
        resolve_precision("bf16", torch.device("cpu"))


def test_bad_modes_for_the_device_are_clear_errors_and_auto_skips_them(monkeypatch):
    with pytest.raises(ModelError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"))
    monkeypatch.setattr("retrieval.config.cpu_has_native_bf16", lambda: False)
    with pytest.raises(ModelError, match="needs a CPU with AVX512-BF16 or AMX"):
        resolve_precision("bf16", torch.device("cpu"))
    assert precision.candidates("cpu") == ["fp32", "int8", *ONNX_MODES]  # auto just leaves bf16 out
    with pytest.raises(ModelError, match="CPU only"):
        resolve_precision("onnx-int8", torch.device("cuda"))  # a GPU keeps torch fp16
    assert precision.candidates("cuda") == []


def test_broken_int8_fails_its_check_and_auto_never_picks_it(broken_int8_dir, pictures, cache, caplog):
    broken = Encoder(ModelSpec(model_dir=str(broken_int8_dir)), device="cpu", precision="fp32")
    figures = precision.agreement_with_fp32(broken, "int8", pictures, QUERIES)
    assert not figures["ok"] and figures["cosine_mean"] < precision.MIN_COSINE
    for other in CPU_MODES:
        if other not in ("int8", "onnx-int8"):  # ONNX Runtime's int8 meets the same huge weight
            assert precision.agreement_with_fp32(broken, other, pictures, QUERIES)["ok"]

    with caplog.at_level(logging.WARNING, logger="clipfind.precision"):
        broken.set_precision("auto")
    report = broken.precision_report
    assert report["source"] == "measured" and report["agreement"]["int8"]["ok"] is False
    assert broken.precision != "int8" and report["chosen"] != "int8"
    assert report["chosen"] not in [m for m, f in report["agreement"].items() if not f["ok"]]
    assert not caplog.records  # auto falls back silently
    # Even if int8 had been by far the fastest, it would not have been chosen.
    assert precision.pick({**report["rates"], "int8": 1e6}, report["agreement"])[0] != "int8"

    broken.set_precision("int8")  # forced: allowed, but it says what it measured (when first used)
    assert not caplog.records
    assert broken.precision == "int8"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "--precision int8 disagrees with fp32" in warning
    assert f"cosine to fp32 {report['agreement']['int8']['cosine_mean']:.4f}" in warning


def test_injected_broken_candidate_is_measured_and_rejected(encoder, cache):
    """Any image model can be put through the check; one that answers noise never wins."""

    class Noise(torch.nn.Module):
        def encode_image(self, pixels):
            return torch.randn(len(pixels), encoder.embed_dim)

    entry = precision.measure(encoder, ["fp32"], batches=2, extra_models={"noise": Noise()})
    assert set(entry["rates"]) == {"fp32", "noise"}
    assert entry["agreement"]["noise"]["ok"] is False and entry["chosen"] == "fp32"


def test_pick_rules():
    good, bad = {"ok": True}, {"ok": False}
    assert precision.pick({"fp32": 10, "bf16": 20, "int8": 30}, {"bf16": good, "int8": bad})[0] == "bf16"
    assert precision.pick({"fp32": 10, "bf16": 20, "int8": 30}, {"bf16": good, "int8": good})[0] == "int8"
    close = {"bf16": {"ok": True, "cosine_mean": 0.99996}, "int8": {"ok": True, "cosine_mean": 0.9997}}
    assert precision.pick({"fp32": 10, "bf16": 29, "int8": 30}, close)[0] == "bf16"  # a tie: the closer one
    assert precision.pick({"fp32": 10, "int8": 10.5}, {"int8": good})[0] == "fp32"  # not worth it
    assert precision.pick({"fp32": 10, "int8": 30}, {"int8": bad}) == (
        "fp32", "no other mode agrees with fp32 (int8 disagreed with fp32)")
    assert precision.pick({"fp32": 5000, "int8": 9000}, {"int8": good})[0] == "fp32"  # decode-bound anyway
    assert precision.pick({"fp32": 10}, {}) == ("fp32", "no other mode to try")


# -- the cache ---------------------------------------------------------------------------


def test_cache_hit_miss_on_other_torch_or_cpu_and_atomic_file(encoder, cache, monkeypatch):
    calls = []
    real_measure = precision.measure

    def counting(*args, **kwargs):
        calls.append(1)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(precision, "measure", counting)
    first = precision.settle(encoder, "auto")
    assert first["source"] == "measured" and len(calls) == 1
    doc = json.loads(cache.read_text())
    (entry,) = doc["entries"].values()
    assert entry["key"] == precision_cache.machine_key(encoder.fingerprint)
    assert entry["key"]["torch"] == torch.__version__ and entry["key"]["cpu"] == config.cpu_model_name()
    assert set(entry["rates"]) == set(precision.candidates()) and entry["chosen"] in entry["rates"]
    assert [p.name for p in cache.parent.iterdir() if p.name.endswith(".tmp")] == []

    again = precision.settle(encoder, "auto")  # hit: nothing measured
    assert again["source"] == "cached" and len(calls) == 1 and again["chosen"] == first["chosen"]

    monkeypatch.setattr(precision_cache, "torch_version", lambda: "9.9.9+other")
    assert precision.settle(encoder, "auto")["source"] == "measured" and len(calls) == 2
    monkeypatch.setattr("retrieval.config.cpu_model_name", lambda: "Some Other CPU @ 3.0GHz")
    assert precision.settle(encoder, "auto")["source"] == "measured" and len(calls) == 3
    monkeypatch.setattr(precision_cache, "onnxruntime_version", lambda: "0.0.1")  # another ONNX Runtime
    assert precision.settle(encoder, "auto")["source"] == "measured" and len(calls) == 4
    assert len(json.loads(cache.read_text())["entries"]) == 4  # one per machine key, none lost

    # An entry filed under this key but describing another machine is not trusted.
    doc = json.loads(cache.read_text())
    key_id = precision_cache.key_id(precision_cache.machine_key(encoder.fingerprint))
    doc["entries"][key_id]["key"]["torch"] = "1.0"
    cache.write_text(json.dumps(doc))
    assert precision.settle(encoder, "auto")["source"] == "measured" and len(calls) == 5

    cache.write_text("{not json")  # a damaged cache is measured again and rewritten
    assert precision.settle(encoder, "auto")["source"] == "measured" and len(calls) == 6
    assert json.loads(cache.read_text())["version"] == precision_cache.CACHE_VERSION


def test_auto_is_settled_only_when_an_image_needs_it(tiny_spec, cache, monkeypatch, pictures):
    calls = []
    real_measure = precision.measure
    monkeypatch.setattr(precision, "measure", lambda *a, **k: calls.append(1) or real_measure(*a, **k))
    enc = Encoder(tiny_spec, device="cpu")  # auto
    enc.encode_texts(["a red circle"])  # text never waits for the image tower's measurement
    assert calls == [] and not cache.exists()
    enc.encode_images(pictures[:3])
    assert calls == [1] and enc.precision_report["source"] == "measured"
    assert enc.precision == enc.precision_report["chosen"]


def test_encoder_auto_uses_the_cached_choice(tiny_spec, cache):
    enc = Encoder(tiny_spec, device="cpu")  # auto
    report = enc.precision_report
    key = report["key"]
    assert report["requested"] == "auto" and enc.precision == report["chosen"]
    assert "precision: " in precision.describe(report) and key["cpu"] in precision.describe(report)
    # Fake a cached choice for this machine: the next encoder takes it without measuring.
    mode = CPU_MODES[0]
    entry = {**precision_cache.cached_entry(key), "chosen": mode}
    precision_cache.store_entry(key, entry)
    again = Encoder(tiny_spec, device="cpu")
    assert again.precision == mode and again.precision_report["source"] == "cached"
    forced = Encoder(tiny_spec, device="cpu", precision="fp32")
    assert forced.precision == "fp32" and f"auto would choose {mode}" in precision.describe(forced.precision_report)


# -- libraries -----------------------------------------------------------------------------


def test_mixed_precision_library_is_reported_by_verify_and_made_uniform_by_reindex(tmp_path, tiny_spec, cache):
    from click.testing import CliRunner

    from retrieval import cli
    from retrieval.index.indexer import IndexOptions, index_paths
    from retrieval.index.inspection import verify_library
    from retrieval.store.library import Library

    photos = tmp_path / "photos"
    synthetic.write_collection(photos / "a", per_class=1, seed=3, labels=synthetic.LABELS[:4])
    synthetic.write_collection(photos / "b", per_class=1, seed=4, labels=synthetic.LABELS[4:8])
    lib_dir = tmp_path / "lib"

    def clipfind(*args):
        out = CliRunner().invoke(cli.cli, [str(a) for a in args])
        assert "Traceback" not in out.output, out.output
        return out

    with Library.open(lib_dir, model=tiny_spec) as library:
        index_paths(library, [str(photos / "a")], tiny_spec, "cpu", "fp32", IndexOptions(workers=0))
        assert run_sql.mixed_precision_runs(library.engine) == [] and verify_library(library).ok
        before = _vectors(library)
    result = clipfind("index", photos / "b", "-L", lib_dir, "--precision", "int8", "--device", "cpu",
                      "--workers", "0", "-v")
    assert result.exit_code == 0, result.output
    assert "precision: int8 (forced; auto would choose " in result.output  # --verbose shows the report
    assert "vectors were made at fp32 precision" in result.output  # the indexer's own warning
    with Library.open(lib_dir) as library:
        runs = run_sql.mixed_precision_runs(library.engine)
        assert sorted((r["precision"], r["images"]) for r in runs) == [("fp32", 4), ("int8", 4)]
        report = verify_library(library)
        assert not report.ok and any("different precisions (4 at fp32, 4 at int8)" in p.message for p in report.problems)

    verify = clipfind("verify", "-L", lib_dir, "--no-files")
    assert verify.exit_code == 6 and "different precisions" in verify.output
    status = clipfind("status", "-L", lib_dir)
    assert "vectors:   fp32 4, int8 4" in status.output and "precision: auto here = " in status.output

    reindex = clipfind("reindex", "-L", lib_dir, "--precision", "fp32", "--device", "cpu", "-q", "--json")
    assert reindex.exit_code == 0, reindex.output
    redone = json.loads(reindex.output.strip().splitlines()[-1])["reembedded"]
    assert (redone["reembedded"], redone["stale"], redone["vectors_by_precision"]) == (8, 0, {"fp32": 8})
    assert clipfind("verify", "-L", lib_dir).exit_code == 0
    with Library.open(lib_dir) as library:
        after = _vectors(library)
        assert run_sql.mixed_precision_runs(library.engine) == []
    for path, vector in before.items():  # fp32 again: the same vectors as the first fp32 run
        np.testing.assert_allclose(after[path], vector, atol=1e-5)


def test_reembed_keeps_changed_files_for_index_and_says_so(tmp_path, tiny_spec, cache):
    from retrieval.index.indexer import IndexOptions, index_paths
    from retrieval.store.library import Library

    photos = tmp_path / "photos"
    files = synthetic.write_collection(photos, per_class=1, seed=5, labels=synthetic.LABELS[:3])
    with Library.open(tmp_path / "lib", model=tiny_spec) as library:
        index_paths(library, [str(photos)], tiny_spec, "cpu", "int8", IndexOptions(workers=0))
        files[0][0].unlink()
        stats = reembed(library, "fp32", "cpu")
        assert (stats["reembedded"], stats["stale"]) == (2, 1)
        assert run_sql.vectors_by_precision(library.engine) == {"fp32": 2, "int8": 1}
        assert run_sql.mixed_precision_problem(library.engine) is not None


def _vectors(library) -> dict[str, np.ndarray]:
    from retrieval.store.schema import Image, blobs_to_matrix

    with library.session() as s:
        rows = s.query(Image.path, Image.embedding).all()
    return {path: blobs_to_matrix([blob], library.dim)[0] for path, blob in rows}


@pytest.mark.skipif(not ONNX_MODES, reason="onnxruntime is not installed")
def test_onnx_runtime_is_measured_and_a_runtime_mix_is_reported(tmp_path, tiny_spec, cache):
    """ONNX Runtime's towers are auto candidates judged like the torch modes; a library whose
    vectors came from two runtimes is a mix `verify` reports, and the run says what it used."""
    from click.testing import CliRunner

    from retrieval import cli
    from retrieval.index.inspection import verify_library
    from retrieval.store.library import Library

    encoder = Encoder(tiny_spec, device="cpu", precision="fp32")
    entry = precision.measure(encoder)
    assert {"onnx-fp32", "onnx-int8"} <= set(entry["rates"]) and not entry["errors"]
    assert entry["agreement"]["onnx-fp32"]["cosine_mean"] >= 0.9999  # the same maths, another runtime
    onnx = Encoder(tiny_spec, device="cpu", precision="onnx-fp32")
    assert onnx.precision == "onnx-fp32"
    rng = random.Random(2)
    images = [synthetic.draw(label, 32, rng) for label in synthetic.LABELS]
    cos = np.sum(onnx.encode_images(images) * encoder.encode_images(images), axis=1)
    assert cos.min() >= 0.9999

    photos = tmp_path / "photos"
    synthetic.write_collection(photos / "a", per_class=1, seed=3, labels=synthetic.LABELS[:4])
    synthetic.write_collection(photos / "b", per_class=1, seed=4, labels=synthetic.LABELS[4:8])
    lib_dir = tmp_path / "lib"
    first = CliRunner().invoke(cli.cli, ["index", str(photos / "a"), "-L", str(lib_dir), "--model-dir",
                                         tiny_spec.model_dir, "--precision", "fp32", "--workers", "0"])
    assert first.exit_code == 0 and "encoded with fp32 (torch) on cpu" in first.output, first.output
    second = CliRunner().invoke(cli.cli, ["index", str(photos / "b"), "-L", str(lib_dir), "--precision",
                                          "onnx-fp32", "--workers", "0", "--threads", "1", "--json"])
    assert second.exit_code == 0, second.output
    stats = json.loads(second.output.strip().splitlines()[-1])
    assert (stats["runtime"], stats["precision"], stats["threads"], stats["workers"]) == ("onnx", "onnx-fp32", 1, 0)
    with Library.open(lib_dir) as library:
        report = verify_library(library)
        assert any("4 at fp32, 4 at onnx-fp32" in p.message for p in report.problems), report.problems
