"""The CIFAR-10 test model on a frozen pretrained text tower (tests/models/minilm.py).

Fast: its training captions share no template with what the evaluation
scores, so held-out numbers measure wordings the model never saw.
Slow (trains the model on first use, then cached): zero-shot top-1 on the
10,000 test photos through the product's loading and class-vector code, and
the prompt-ensemble effect the other test models cannot show.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.prompting import prompts
from retrieval.prompting.cupl import load_descriptions
from tests.models import cifar, minilm

DATA = cifar.default_data_root()
# Measured 0.491 with "a photo of a {}." (build of 2026-12-01, key deac23a522fd; bench/results/);
# the bound leaves margin for a rebuild on another processor (one thread gives the same weights
# on the same machine, not necessarily bit for bit on another).
TOP1_BOUND = 0.42


def evaluated_templates() -> set[str]:
    return {*prompts.template_set("imagenet80"), *prompts.template_set("cifar10"), *prompts.PHOTO_TEMPLATES}


def test_training_captions_share_no_template_or_sentence_with_the_evaluation():
    assert not set(minilm.TRAIN_TEMPLATES) & evaluated_templates()
    captions, _ = minilm.captions(list(minilm.SYNONYMS))
    described = {s.casefold() for sentences in load_descriptions("cifar10").values() for s in sentences}
    assert not {c.casefold() for c in captions} & described
    assert all(name in minilm.SYNONYMS[name] for name in minilm.SYNONYMS)  # the class name itself is a caption word


@pytest.fixture(scope="session")
def minilm_model_dir() -> Path:
    """The MiniLM test model (trained on first use, then cached); $CLIPFIND_MINILM_MODEL_DIR names one."""
    if os.environ.get("CLIPFIND_MINILM_MODEL_DIR"):
        return Path(os.environ["CLIPFIND_MINILM_MODEL_DIR"])
    if not (DATA / "train").is_dir():
        pytest.skip(f"CIFAR-10 image folders not found at {DATA} (set CLIPFIND_DATA)")
    return minilm.ensure_minilm_model(log=lambda m: print(f"[minilm model] {m}", file=sys.stderr), data_root=DATA)


@pytest.fixture(scope="module")
def scored(minilm_model_dir):
    """(encoder, unit image vectors of the 10,000 test photos, targets, labels), encoded once."""
    from retrieval.model.encoder import Encoder, ModelSpec
    from retrieval.tagging.labels import from_names

    encoder = Encoder(ModelSpec(model_dir=str(minilm_model_dir)), precision="fp32")
    images, targets, classes = cifar.load_split(DATA / "test")
    features = np.concatenate([encoder.encode_pixels(cifar.to_tensor(images[i:i + 500]))
                               for i in range(0, len(images), 500)])
    return encoder, features, targets, from_names(classes)


def top1(scored, strategy: str) -> float:
    encoder, features, targets, labels = scored
    matrix = prompts.class_vectors(encoder, labels, strategy).matrix
    return float(((features @ matrix.T).argmax(axis=1) == targets).mean())


@pytest.mark.slow
def test_zero_shot_top1_on_the_test_photos(scored):
    assert top1(scored, "template") >= TOP1_BOUND


@pytest.mark.slow
def test_ensemble_is_no_worse_than_the_median_held_out_template(scored):
    held_out = sorted(evaluated_templates() - {"{}"})
    singles = [top1(scored, f"template:{t}") for t in held_out]
    assert top1(scored, "ensemble") >= float(np.median(singles))
    assert top1(scored, "ensemble:cifar10") >= float(np.median(singles))
