"""The variable-length text export: cut tokens give the full context's vectors, and towers
where that does not hold keep the fixed-length graph."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from retrieval.model.onnx_export import CHECK_TEXTS, export_towers, read_manifest
from retrieval.model.onnx_session import OnnxEncoder
from retrieval.model.onnx_text import length_error, trim, variable_length_tower
from retrieval.model.spec import ModelSpec

TEXTS = ["", "a", "a red circle", "a photo of a big blue square.", "🐶 on a beach", "x " * 40, "RED!!"]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    from retrieval.model.encoder import Encoder

    return Encoder(ModelSpec(model_dir=str(tiny_model_dir)), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def tiny_export(tiny_encoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-text") / "fp32"
    export_towers(tiny_encoder, folder, "fp32")
    return folder


def test_trim_cuts_after_the_last_end_token():
    tokens = np.array([[9, 5, 7, 0, 0, 0], [9, 7, 0, 0, 0, 0]])
    assert trim(tokens, 7).tolist() == [[9, 5, 7], [9, 7, 0]]
    full = np.array([[9, 5, 5, 5, 5, 7]])
    assert trim(full, 7) is full  # a text cut at the context: nothing to trim
    assert trim(np.array([[9, 7, 0, 0]]), 7).shape == (1, 2)


def test_export_takes_any_length_and_matches_the_full_context(tiny_encoder, tiny_export):
    import onnxruntime as ort
    import torch

    manifest = read_manifest(tiny_export)
    assert manifest["dynamic_length"] is True
    session = ort.InferenceSession(str(tiny_export / "text.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", "length"]
    tokens = tiny_encoder.tokenize(TEXTS)
    with torch.no_grad():
        reference = tiny_encoder.model.encode_text(tokens).numpy()
    eot = int(tokens[0].max())
    lengths = {trim(tokens[i:i + 1].numpy(), eot).shape[1] for i in range(len(TEXTS))}
    assert min(lengths) == 2 and max(lengths) == tiny_encoder.context_length  # every length kind ran
    error = length_error(reference, lambda t: session.run(None, {"tokens": t})[0], tokens.numpy(), eot)
    assert error < 1e-5, error
    # the full context still runs, and gives the same vectors
    full = session.run(None, {"tokens": tokens.numpy()})[0]
    assert np.abs(full - reference).max() / np.abs(reference).max() < 1e-5


def test_query_batches_are_cut_to_the_longest_text(tiny_encoder, tiny_export):
    encoder = OnnxEncoder(tiny_export)
    assert encoder.text_batch(["a red circle"]).shape == (1, tiny_encoder.token_count("a red circle"))
    assert encoder.text_batch(["a", "a red circle"]).shape[1] == tiny_encoder.token_count("a red circle")
    assert encoder.text_batch(["x " * 40]).shape[1] == tiny_encoder.context_length
    ref, got = tiny_encoder.encode_texts(TEXTS), encoder.encode_texts(TEXTS)
    assert np.sum(ref * got, axis=1).min() >= 0.9999


def test_a_tower_without_a_causal_mask_or_end_pooling_is_not_cut(tiny_encoder):
    assert variable_length_tower(tiny_encoder.model) is not None
    bidirectional = copy.deepcopy(tiny_encoder.model)
    bidirectional.attn_mask = None  # every position sees the padding: cutting it changes vectors
    assert variable_length_tower(bidirectional) is None
    last = copy.deepcopy(tiny_encoder.model)
    last.text_pool_type = "last"  # reads the last position: a padding one
    assert variable_length_tower(last) is None
    assert variable_length_tower(object()) is None


def test_a_tower_that_disagrees_when_cut_is_exported_at_fixed_length(tiny_encoder, tmp_path, monkeypatch):
    """The exporter checks the graph it made: one whose output depends on the length (as a
    non-causal tower's would) falls back to the fixed-length export, which agrees with torch."""
    import torch

    from retrieval.model import onnx_text

    real = onnx_text.variable_length_tower

    def length_dependent(model):
        tower = real(model)

        class Shifted(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.tower = tower

            def forward(self, tokens):
                return self.tower(tokens) + 0.01 * tokens.shape[1]

        return Shifted().eval()

    monkeypatch.setattr(onnx_text, "variable_length_tower", length_dependent)
    manifest = export_towers(tiny_encoder, tmp_path / "fp32", "fp32")
    assert manifest["dynamic_length"] is False
    encoder = OnnxEncoder(tmp_path / "fp32")
    assert encoder.text_batch(["a"]).shape[1] == tiny_encoder.context_length
    ref, got = tiny_encoder.encode_texts(TEXTS), encoder.encode_texts(TEXTS)
    assert np.sum(ref * got, axis=1).min() >= 0.9999


def test_check_texts_reach_both_ends_of_the_context(tiny_encoder):
    counts = [tiny_encoder.token_count(text) for text in CHECK_TEXTS]
    assert min(counts) == 2 and max(counts) > 77  # the longest is cut at any CLIP context
