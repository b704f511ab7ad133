"""Tiny, real, aligned open_clip test models trained here, cached on disk.

Why: pretrained CLIP weights cannot be downloaded on these machines, and a
random-weight model proves only plumbing.  `ensure_tiny_model()` trains a
3.5 M-parameter open_clip CLIP on drawn coloured shapes (retrieval.media.synthetic)
(600 steps of 64; about 50 CPU-seconds, so 30-60 s on 2 idle cores and
longer on a busy machine; held-out zero-shot top-1 about 0.93 over 12
classes) and stores it in open_clip's "local-dir" layout, so the product
loads it through exactly the code path that loads real weights:

    open_clip.create_model_and_transforms("local-dir:" + str(path))
    open_clip.get_tokenizer("local-dir:" + str(path))

The cache key hashes the source of the generator, the trainer and this file,
so editing any of them retrains on next use.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from retrieval import config
from retrieval.devmodels import training
from retrieval.media import synthetic
from retrieval.model.runtime import torch_threads

MODEL_NAME = "tiny-shapes"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
DEFAULT_TEMPLATE = "a photo of a {}."

TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
# OpenAI CLIP statistics, written into the config so open_clip's transform
# and the training normalisation cannot disagree (the CIFAR-10 test model uses it too).
PREPROCESS_CFG: dict[str, Any] = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
TRAIN = {"steps": 600, "batch_size": 64, "lr": 2e-3, "warmup": 50, "seed": 1234}
HELDOUT_SEED = 987_654  # never used for training pictures
HELDOUT_PER_CLASS = 30


def model_key() -> str:
    """Short hash of everything that decides the weights: generator, trainer, this file."""
    h = hashlib.sha256()
    for mod_file in (synthetic.__file__, training.__file__, __file__):
        h.update(Path(mod_file).read_bytes())
    h.update(open_clip.__version__.encode())
    return h.hexdigest()[:12]


def is_complete(path: Path) -> bool:
    """A model folder is usable once both its config and its weights are in place."""
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images already at model size -> normalised batch, as open_clip's transform does."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    mean = np.asarray(PREPROCESS_CFG["mean"], dtype=np.float32)
    std = np.asarray(PREPROCESS_CFG["std"], dtype=np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(0, 3, 1, 2).copy())


def shapes_sampler(seed: int, size: int = 32) -> Callable[[int], tuple[torch.Tensor, list[str], list[int]]]:
    """A `sample_batch` for training.train_clip over the 12 drawn shape classes."""
    rng = random.Random(seed)

    def sample_batch(n: int) -> tuple[torch.Tensor, list[str], list[int]]:
        ids = [rng.randrange(len(synthetic.LABELS)) for _ in range(n)]
        labels = [synthetic.LABELS[i] for i in ids]
        images = [synthetic.draw(lab, size, rng) for lab in labels]
        return to_tensor(images), [synthetic.caption(lab, rng) for lab in labels], ids

    return sample_batch


def heldout_images(size: int, jpeg: bool, hard: bool = False, per_class: int = HELDOUT_PER_CLASS) -> tuple[list[Image.Image], list[str]]:
    """Held-out pictures (seed never used in training), optionally JPEG round-tripped."""
    images, labels = [], []
    for label in synthetic.LABELS:
        for i in range(per_class):
            img = synthetic.draw(label, size, random.Random(f"{HELDOUT_SEED}/{label}/{i}/{int(hard)}"), hard=hard)
            if jpeg:
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                buf.seek(0)
                img = Image.open(buf).convert("RGB")
            images.append(img)
            labels.append(label)
    return images, labels


@torch.no_grad()
def _accuracy(model: Any, tokenizer: Any, preprocess: Any, images: Sequence[Image.Image], labels: Sequence[str], classnames: Sequence[str], template: str) -> float:
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([template.format(c) for c in classnames])), dim=-1)
    correct = 0
    for start in range(0, len(images), 256):
        batch = torch.stack([preprocess(im) for im in images[start:start + 256]])
        feats = F.normalize(model.encode_image(batch), dim=-1)
        pred = (feats @ text.t()).argmax(dim=-1).tolist()
        correct += sum(classnames[p] == lab for p, lab in zip(pred, labels[start:start + 256]))
    return correct / max(1, len(images))


def load_model(model_dir: Path) -> tuple[Any, Any, Any]:
    """(model, preprocess, tokenizer) of a local-dir model, through open_clip's factory."""
    name = "local-dir:" + str(model_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def zero_shot_accuracy(
    model_dir: Path,
    images: list[Image.Image],
    labels: list[str],
    classnames: list[str],
    template: str = DEFAULT_TEMPLATE,
) -> float:
    """Top-1 zero-shot accuracy, computed directly with open_clip.

    Independent of the product's own tagging code on purpose, so tests can
    use it as a reference: normalised image and prompt embeddings, argmax of
    cosine similarity.
    """
    model, preprocess, tokenizer = load_model(Path(model_dir))
    return _accuracy(model, tokenizer, preprocess, images, labels, classnames, template)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock, so two processes never train the same model at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_config(path: Path, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any],
                 extra: dict[str, Any]) -> None:
    """Write `open_clip_config.json` (open_clip's local-dir layout) atomically."""
    doc = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "clipfind": extra}
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)


def _train_into(out: Path, key: str, log: Callable[[str], None] | None) -> None:
    """Train, save in local-dir layout into `out`, reload through open_clip and measure."""
    torch.manual_seed(TRAIN["seed"])
    model = open_clip.CLIP(**copy.deepcopy(TINY_MODEL_CFG))
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_MODEL_CFG["text_cfg"]["context_length"])
    stats = training.train_clip(
        model, tokenizer, shapes_sampler(TRAIN["seed"]),
        steps=TRAIN["steps"], batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
        warmup=TRAIN["warmup"], seed=TRAIN["seed"], soft_targets=True, log=log,
        # One thread, always: thread count changes float summation order, and tests tuned on
        # these weights must see the same weights on every machine (~45 s on 2 cores).
        threads=1,
    )
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    meta: dict[str, Any] = {
        "name": MODEL_NAME,
        "key": key,
        "labels": list(synthetic.LABELS),
        "template": DEFAULT_TEMPLATE,
        "train_seconds": round(stats["seconds"], 2),
        "train_cpu_seconds": round(stats["cpu_seconds"], 2),
        "train": {**TRAIN, "last_loss": round(stats["last_loss"], 4), "logit_scale": round(stats["logit_scale"], 2),
                  "threads": stats["threads"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    write_config(out, TINY_MODEL_CFG, PREPROCESS_CFG, meta)
    # Measure through the same loading path as the product (proves the layout).
    loaded, preprocess, tok = load_model(out)
    with torch_threads(1):  # tiny batches: 1 thread is never slow, 2 can be
        for field, size, jpeg, hard in (
            ("heldout_zero_shot_top1", 32, False, False),
            ("heldout_zero_shot_top1_128px_jpeg", 128, True, False),
            ("heldout_hard_zero_shot_top1_128px_jpeg", 128, True, True),
        ):
            imgs, labs = heldout_images(size, jpeg, hard)
            meta[field] = round(_accuracy(loaded, tok, preprocess, imgs, labs, synthetic.LABELS, DEFAULT_TEMPLATE), 4)
    meta["heldout_images_per_variant"] = HELDOUT_PER_CLASS * len(synthetic.LABELS)
    write_config(out, TINY_MODEL_CFG, PREPROCESS_CFG, meta)


def build_cached(models: Path, name: str, key: str, train: Callable[[Path], None]) -> Path:
    """Return `models/<name>-<key>`, calling `train(tmp_dir)` to make it once if it is missing.

    Safe under concurrency: an exclusive flock serialises trainers, training
    happens in a temp dir beside the target, and os.rename publishes it whole,
    so readers never see a half-written model.
    """
    final = models / f"{name}-{key}"
    if is_complete(final):
        return final
    with locked(models / f".{name}-{key}.lock"):
        if is_complete(final):  # another process finished while we waited
            return final
        prefix = f".tmp-{name}-{key}-"
        for stale in models.glob(prefix + "*"):  # left by a crashed trainer
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete leftover of unknown origin
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=models))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            train(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def ensure_tiny_model(cache_root: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Return the directory of the tiny shapes model, training it once if needed (see build_cached)."""
    root = Path(cache_root).expanduser() if cache_root is not None else config.cache_root()
    key = model_key()
    return build_cached(root / "models", MODEL_NAME, key, lambda tmp: _train_into(tmp, key, log))


def read_meta(model_dir: Path) -> dict[str, Any]:
    """The "clipfind" section of a model dir's open_clip_config.json."""
    return json.loads((Path(model_dir) / CONFIG_FILE).read_text()).get("clipfind", {})


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the tiny model and print where it is and how good it is."""
    parser = argparse.ArgumentParser(prog="python -m retrieval.devmodels.tiny", description=main.__doc__)
    parser.add_argument("--cache-root", type=Path, default=None, help="default: $CLIPFIND_CACHE or ~/.cache/clipfind")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    path = ensure_tiny_model(args.cache_root, log=print)
    meta = read_meta(path)
    print(f"model dir:        {path}")
    print(f"ensure took:      {time.perf_counter() - t0:.1f} s (training {meta.get('train_seconds')} s wall, "
          f"{meta.get('train_cpu_seconds')} s CPU, {meta.get('train', {}).get('threads')} torch thread(s))")
    for field in ("heldout_zero_shot_top1", "heldout_zero_shot_top1_128px_jpeg", "heldout_hard_zero_shot_top1_128px_jpeg"):
        print(f"{field}: {meta.get(field)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
