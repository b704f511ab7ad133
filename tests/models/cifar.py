"""A small open_clip model trained on real photos (CIFAR-10 train split), cached on disk.

Why: the drawn-shapes model (retrieval.devmodels.tiny) proves the pipeline on
pictures we made ourselves; this one proves it on real photos nobody here
made.  `ensure_cifar_model()` trains a ~7.6 M-parameter open_clip CLIP on the
50,000 photos of `../shared/data/cifar10/train` (never the test split) with
templated captions ("a blurry photo of a dog."), following the measured recipe
in shared/docs/offline.md, and stores it in open_clip's local-dir layout, so
the product loads it exactly as it loads a user's own model folder:

    ModelSpec(model_dir=str(ensure_cifar_model()))

The stopping rule is a fixed number of steps (not wall time), so the weights
depend on the code and the data only, not on how busy the machine is.  The
cache key hashes this file, the trainer and open_clip's version together with
a manifest of the train split (relative paths and byte sizes, cheap to list);
changing any of them retrains on next use.  Decoded pixels are cached as a
uint8 array beside the models, keyed by the manifest, so a retrain does not
decode 50,000 JPEGs again.

    python -m tests.models.cifar      # train (or find) it; print time and test top-1
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from retrieval import config
from retrieval.devmodels import training
from retrieval.devmodels.tiny import (
    CONFIG_FILE,
    PREPROCESS_CFG,
    WEIGHTS_FILE,
    build_cached,
    load_model,
    write_config,
)
from retrieval.model.runtime import torch_threads

MODEL_NAME = "cifar10"
DEFAULT_TEMPLATE = "a photo of a {}."
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

CIFAR_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 3, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2, "mlp_ratio": 4.0},
}
# Ten photo captions per class.  Varied enough that the text tower learns the
# class word rather than one sentence; the product's prompts ("a photo of a
# {}.", the search templates, a bare name) all read like one of these.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a small photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
)
# Fixed step count (≈300 s on 2 idle cores in offline.md's measurement: 729 steps).
TRAIN: dict[str, Any] = {"steps": 720, "batch_size": 128, "lr": 5e-4, "warmup": 50, "seed": 2024,
                         "soft_targets": True, "flip": True, "crop_pad": 4}


# -- data -----------------------------------------------------------------------------------
def default_data_root() -> Path:
    """$CLIPFIND_DATA/cifar10 if set, else ../shared/data/cifar10 beside the repository."""
    env = config.data_root()
    if env is not None:
        return env / "cifar10"
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"


def split_files(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, sorted [(relative path, class index)]) of an image-folder split."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no CIFAR-10 split at {split_dir} (set CLIPFIND_DATA to the folder holding cifar10/)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = []
    for index, name in enumerate(classes):
        with os.scandir(split_dir / name) as it:
            names = sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        files.extend((f"{name}/{n}", index) for n in names)
    if not files:
        raise FileNotFoundError(f"CIFAR-10 split {split_dir} holds no images")
    return classes, files


def manifest_hash(split_dir: Path) -> str:
    """Hash of every relative path and byte size in a split: cheap (no pixels read), and
    any added, removed, renamed or rewritten-to-a-new-size file changes it."""
    split_dir = Path(split_dir)
    _, files = split_files(split_dir)
    h = hashlib.sha256()
    for rel, _ in files:
        h.update(f"{rel}\t{(split_dir / rel).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _decode_chunk(paths: list[str]) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), 32, 32, 3), np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                im = im.resize((32, 32), Image.BICUBIC)
            out[i] = np.asarray(im)
    return out


def load_split(split_dir: Path, cache_root: Path | None = None, workers: int | None = None,
               log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images N×32×32×3, int64 labels, class names) of a split, decoded once and cached.

    The cache file is keyed by the split's manifest hash and written atomically,
    so concurrent callers either find it whole or decode it themselves.
    """
    split_dir = Path(split_dir)
    root = Path(cache_root).expanduser() if cache_root is not None else config.cache_root()
    classes, files = split_files(split_dir)
    key = manifest_hash(split_dir)
    cache = root / "data" / f"cifar10-{split_dir.name}-{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return z["images"], z["labels"], [str(c) for c in z["classes"]]
        except (OSError, ValueError, KeyError):
            pass  # damaged: decode again
    started = time.perf_counter()
    paths = [str(split_dir / rel) for rel, _ in files]
    workers = workers or config.usable_cores()
    chunks = [paths[i:i + 2000] for i in range(0, len(paths), 2000)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            images = np.concatenate(list(pool.map(_decode_chunk, chunks)))
    else:
        images = np.concatenate([_decode_chunk(c) for c in chunks])
    labels = np.asarray([c for _, c in files], np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=cache.name + ".", suffix=".tmp", dir=cache.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, images=images, labels=labels, classes=np.asarray(classes))
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if log is not None:
        log(f"decoded {len(paths)} images of {split_dir} in {time.perf_counter() - started:.1f} s -> {cache}")
    return images, labels, classes


_MEAN = np.asarray(PREPROCESS_CFG["mean"], np.float32)
_STD = np.asarray(PREPROCESS_CFG["std"], np.float32)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 -> normalised float N×3×H×W, exactly as open_clip's transform at 32 px."""
    arr = images.astype(np.float32) / 255.0
    return torch.from_numpy(((arr - _MEAN) / _STD).transpose(0, 3, 1, 2).copy())


def sampler(images: np.ndarray, labels: np.ndarray, classes: list[str], seed: int, flip: bool = True,
            crop_pad: int = 4) -> training.SampleBatch:
    """A `sample_batch` for training.train_clip: random photos, flip + padded random crop,
    and a random caption template per photo.  Deterministic given the seed."""
    rng = np.random.default_rng(seed)
    n, h, w, _ = images.shape

    def sample_batch(size: int) -> tuple[torch.Tensor, list[str], list[int]]:
        idx = rng.integers(0, n, size)
        batch = images[idx]
        if crop_pad:
            padded = np.pad(batch, ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad), (0, 0)), mode="reflect")
            dy = rng.integers(0, 2 * crop_pad + 1, size)
            dx = rng.integers(0, 2 * crop_pad + 1, size)
            batch = np.stack([padded[i, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])
        if flip:
            mirror = rng.random(size) < 0.5
            batch[mirror] = batch[mirror, :, ::-1]
        templates = rng.integers(0, len(CAPTION_TEMPLATES), size)
        ids = labels[idx].tolist()
        captions = [CAPTION_TEMPLATES[t].format(classes[c]) for t, c in zip(templates, ids)]
        return to_tensor(batch), captions, ids

    return sample_batch


# -- model ----------------------------------------------------------------------------------
def code_key() -> str:
    """Hash of the code that decides the weights: this file, the trainer, open_clip's version."""
    h = hashlib.sha256()
    for mod_file in (training.__file__, __file__):
        h.update(Path(mod_file).read_bytes())
    h.update(open_clip.__version__.encode())
    return h.hexdigest()[:12]


def model_key(data_root: Path | None = None) -> str:
    """Cache key: code hash + train-split manifest hash."""
    data_root = Path(data_root) if data_root is not None else default_data_root()
    return hashlib.sha256(f"{code_key()}/{manifest_hash(data_root / 'train')}".encode()).hexdigest()[:12]


@torch.no_grad()
def zero_shot_top1(model: Any, tokenizer: Any, images: np.ndarray, labels: np.ndarray, classes: list[str],
                   template: str = DEFAULT_TEMPLATE, batch: int = 500) -> float:
    """Top-1 with one template, straight from open_clip (independent of the product's code)."""
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([template.format(c) for c in classes])), dim=-1)
    correct = 0
    for start in range(0, len(images), batch):
        feats = F.normalize(model.encode_image(to_tensor(images[start:start + batch])), dim=-1)
        correct += int(((feats @ text.t()).argmax(dim=-1).numpy() == labels[start:start + batch]).sum())
    return correct / max(1, len(images))


def train_into(out: Path, data_root: Path, cache_root: Path | None, key: str, log: Callable[[str], None] | None,
               steps: int | None = None) -> dict[str, Any]:
    """Train on the train split, save in local-dir layout into `out`, reload and score on the test split."""
    train = dict(TRAIN, steps=steps or TRAIN["steps"])
    images, labels, classes = load_split(data_root / "train", cache_root, log=log)
    torch.manual_seed(train["seed"])
    model = open_clip.CLIP(**copy.deepcopy(CIFAR_MODEL_CFG))
    tokenizer = open_clip.SimpleTokenizer(context_length=CIFAR_MODEL_CFG["text_cfg"]["context_length"])
    stats = training.train_clip(
        model, tokenizer, sampler(images, labels, classes, train["seed"], train["flip"], train["crop_pad"]),
        steps=train["steps"], batch_size=train["batch_size"], lr=train["lr"], warmup=train["warmup"],
        seed=train["seed"], soft_targets=train["soft_targets"], log=log,
    )
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    meta: dict[str, Any] = {
        "name": MODEL_NAME,
        "key": key,
        "labels": classes,
        "template": DEFAULT_TEMPLATE,
        "caption_templates": list(CAPTION_TEMPLATES),
        "train_images": len(images),
        "train_seconds": round(stats["seconds"], 1),
        "train_cpu_seconds": round(stats.get("cpu_seconds", float("nan")), 1),
        "train_data_wait_seconds": round(stats["data_wait_seconds"], 1),
        "train": {**train, "last_loss": round(stats["last_loss"], 4), "logit_scale": round(stats["logit_scale"], 2),
                  "threads": stats["threads"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    write_config(out, CIFAR_MODEL_CFG, PREPROCESS_CFG, meta)
    # Score through the loading path the product uses, on photos training never saw.
    loaded, _, tok = load_model(out)
    test_images, test_labels, test_classes = load_split(data_root / "test", cache_root, log=log)
    if test_classes != classes:
        raise ValueError(f"test classes {test_classes} differ from train classes {classes}")
    with torch_threads(config.usable_cores()):
        meta["test_zero_shot_top1"] = round(zero_shot_top1(loaded, tok, test_images, test_labels, classes), 4)
    meta["test_images"] = len(test_images)
    write_config(out, CIFAR_MODEL_CFG, PREPROCESS_CFG, meta)
    return meta


def ensure_cifar_model(cache_root: Path | None = None, log: Callable[[str], None] | None = None,
                       data_root: Path | None = None) -> Path:
    """Directory of the CIFAR-10 model, training it once if needed (a few minutes on 2 cores).

    Concurrency-safe through `testmodels.build_cached`.  Raises FileNotFoundError when the data is absent.
    """
    root = Path(cache_root).expanduser() if cache_root is not None else config.cache_root()
    data_root = Path(data_root) if data_root is not None else default_data_root()
    key = model_key(data_root)
    return build_cached(root / "models", MODEL_NAME, key,
                        lambda tmp: train_into(tmp, data_root, root, key, log))


def read_meta(model_dir: Path) -> dict[str, Any]:
    """The "clipfind" section of a model dir's open_clip_config.json."""
    return json.loads((Path(model_dir) / CONFIG_FILE).read_text()).get("clipfind", {})


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the CIFAR-10 model and print where it is, how long training took, and its test top-1."""
    parser = argparse.ArgumentParser(prog="python -m tests.models.cifar", description=main.__doc__)
    parser.add_argument("--cache-root", type=Path, default=None, help="default: $CLIPFIND_CACHE or ~/.cache/clipfind")
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding train/ and test/ "
                        "(default: $CLIPFIND_DATA/cifar10 or ../shared/data/cifar10)")
    parser.add_argument("--out", type=Path, help="experiment: train into this folder (not the cache), "
                        "optionally with --steps")
    parser.add_argument("--steps", type=int, help="with --out: train this many steps instead of the recipe's")
    args = parser.parse_args(argv)
    if args.steps and not args.out:
        parser.error("--steps needs --out (the cached model always follows the recipe)")
    t0 = time.perf_counter()
    data_root = args.data_root or default_data_root()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        train_into(args.out, data_root, args.cache_root, "experiment", print, steps=args.steps)
        path = args.out
    else:
        path = ensure_cifar_model(args.cache_root, log=print, data_root=data_root)
    meta = read_meta(path)
    print(f"model dir:          {path}")
    print(f"ensure took:        {time.perf_counter() - t0:.1f} s")
    print(f"training:           {meta.get('train', {}).get('steps')} steps in {meta.get('train_seconds')} s "
          f"(CPU {meta.get('train_cpu_seconds')} s, {meta.get('train', {}).get('threads')} thread(s) at the end)")
    print(f"parameters:         {meta.get('parameters'):,}")
    print(f"test zero-shot top-1 ({meta.get('test_images')} photos, {meta.get('template')!r}): "
          f"{meta.get('test_zero_shot_top1')} (chance 0.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
