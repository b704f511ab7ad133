"""Build only the image tower for indexing, with the fingerprint of the whole model.

Why (issue 17): loading the whole ViT-B-32 (~610 MB, text tower ~260 MB of it) next
to torch + open_clip (~790 MB) put an indexing run's peak at ~1.4 GB, and indexing
never runs the text tower. Here open_clip builds the model on torch's meta device
(no memory), the checkpoint is opened mapped (`torch.load(mmap=True)`; safetensors
map their file anyway) and loaded by open_clip's own `load_checkpoint` (so every
conversion it makes applies) with `assign=True`; then each tensor is sampled for the
fingerprint and its file pages are dropped again (`release.drop_file_pages`), so the
checkpoint never sits in memory whole. Only the image tower is copied into memory.
Random weights (`--random-weights`) are re-drawn: the image tower once for its part
of the fingerprint, dropped, the text tower drawn after it (the same random stream as
a whole build), sampled and dropped, then the image tower drawn again.

The fingerprint, weights and graph are exactly those of `encoder.load_model`'s model
(tests/test_towers.py); anything this does not cover (a GPU, a pretrained tag, a
Hugging Face text tower or timm image tower, an architecture other than CLIP /
CustomTextCLIP, weights that need anything besides a plain load) returns None and the
caller loads the whole model as before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.model import release
from retrieval.model.spec import ModelSpec

if TYPE_CHECKING:
    import torch

# What open_clip looks for in a model folder, in its order (open_clip.factory).
MODEL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


def sample(tensor: torch.Tensor) -> tuple[tuple[int, ...], bytes]:
    """(shape, strided sample of values): one tensor's part of `weights_fingerprint`."""
    flat = tensor.detach().reshape(-1).float().cpu()
    step = max(1, flat.numel() // 4096)
    return tuple(tensor.shape), flat[::step].numpy().tobytes()


def fingerprint_of(samples: dict[str, tuple[tuple[int, ...], bytes]]) -> str:
    """The fingerprint of a model whose state dict gave `samples` (name -> `sample`)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=12)
    for name in sorted(samples):
        shape, values = samples[name]
        digest.update(f"{name}:{shape}".encode())
        digest.update(values)
    return digest.hexdigest()


def weights_file(spec: ModelSpec) -> Path | None:
    """The checkpoint open_clip would load for `spec` (None: random weights, or not known here)."""
    if spec.checkpoint:
        return Path(spec.checkpoint)
    if spec.model_dir:
        folder = Path(spec.model_dir)
        present = [folder / n for n in MODEL_DIR_WEIGHTS if (folder / n).is_file()]
        others = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth")]
        # Anything besides open_clip's preferred names makes its choice less obvious: leave it to open_clip.
        return present[0] if present and len(others) == len(present) else None
    return None


@contextlib.contextmanager
def _mapped_torch_load() -> Iterator[None]:
    """torch.load maps the checkpoint instead of reading it (open_clip calls torch.load itself)."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # an older torch: read, not mapped (more memory, same weights)
        yield
        return
    previous = config.load.mmap
    config.load.mmap = True
    try:
        yield
    finally:
        config.load.mmap = previous


def load_image_tower(spec: ModelSpec, name: str, pretrained: str | None, overrides: dict,
                     device: torch.device) -> tuple[Any, Any, str] | None:
    """(model with only its image tower in memory, eval transform, whole-model fingerprint),
    or None when this spec needs the whole build. `name`, `pretrained`, `overrides` are
    what `encoder.load_model` gives open_clip for this spec."""
    import open_clip
    import torch
    from open_clip.model import CLIP, CustomTextCLIP

    if device.type != "cpu" or overrides or spec.pretrained:
        return None
    cfg = open_clip.get_model_config(name) or {}
    if "timm_model_name" in cfg.get("vision_cfg", {}) or "hf_model_name" in cfg.get("text_cfg", {}):
        return None
    if spec.random_weights:
        return _random_image_tower(name, (CLIP, CustomTextCLIP))
    path = weights_file(spec)
    if path is None or path.suffix in (".npz", ".npy"):
        return None
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=pretrained, load_weights=False, device="meta",
                                       pretrained_image=False, pretrained_text=False)
    if type(model) not in (CLIP, CustomTextCLIP):
        return None
    dtypes = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items()}
    model.load_state_dict = functools.partial(torch.nn.Module.load_state_dict, model, assign=True)
    try:
        with _mapped_torch_load():
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    finally:
        del model.load_state_dict
    mapped = release.file_ranges(path)
    samples = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        samples[key] = sample(tensor)
        release.drop_file_pages(tensor, mapped)  # the image tower's are read again once, when copied
    fingerprint = fingerprint_of(samples)
    release.release_tensors(model, keep=release.tensors_of(model.visual))
    _own_copy(model.visual, {n[len("visual."):]: d for n, d in dtypes.items() if n.startswith("visual.")}, mapped)
    if any(t.is_meta for t in release.tensors_of(model.visual)):
        return None  # a buffer the checkpoint does not hold: only a whole build makes it
    model.eval()
    return model, _transform(model), fingerprint


def _own_copy(module: torch.nn.Module, dtypes: dict[str, torch.dtype], mapped: list[tuple[int, int]]) -> None:
    """Replace `module`'s mapped checkpoint tensors by copies in memory, at the dtype the model
    declares (a load without `assign` converts the same way), dropping each file page after."""
    import torch

    for prefix, sub in module.named_modules():
        for table in (sub._parameters, sub._buffers):
            for key, tensor in list(table.items()):
                if tensor is None or tensor.is_meta:
                    continue
                full = f"{prefix}.{key}" if prefix else key
                copy = tensor.detach().to(dtypes.get(full, tensor.dtype), copy=True)
                release.drop_file_pages(tensor, mapped)
                table[key] = torch.nn.Parameter(copy, requires_grad=False) \
                    if isinstance(tensor, torch.nn.Parameter) else copy


def _random_image_tower(name: str, classes: tuple) -> tuple[Any, Any, str] | None:
    """`--random-weights`: the image tower as a whole build draws it (seed 0), and the fingerprint
    of the whole model, without both towers in memory at once."""
    import open_clip
    import open_clip.model as oc_model
    import torch

    build = oc_model._build_vision_tower  # noqa: SLF001 - CLIP.__init__ calls it by this module name
    drawn: dict[str, Any] = {}

    def first_draw(*args, **kwargs):
        drawn["rng"], drawn["args"] = torch.get_rng_state(), (args, kwargs)
        visual = build(*args, **kwargs)
        drawn["samples"] = {f"visual.{k}": sample(t) for k, t in visual.state_dict().items()}
        return visual.to("meta")  # the text tower is drawn next, from the same random stream

    torch.manual_seed(0)  # as encoder.load_model does
    oc_model._build_vision_tower = first_draw
    try:
        model = open_clip.create_model(name, pretrained=None, load_weights=False, device=None,
                                       pretrained_image=False, pretrained_text=False)
    finally:
        oc_model._build_vision_tower = build
    if type(model) not in classes or "samples" not in drawn:
        return None
    samples = dict(drawn["samples"])
    for key, tensor in model.state_dict().items():
        if not key.startswith("visual."):
            samples[key] = sample(tensor)
        elif key not in samples:
            return None
    fingerprint = fingerprint_of(samples)
    release.release_tensors(model)
    release.trim_heap()
    state = torch.get_rng_state()
    torch.set_rng_state(drawn["rng"])
    args, kwargs = drawn["args"]
    visual = build(*args, **kwargs)
    torch.set_rng_state(state)
    for key, value in vars(model.visual).items():  # what create_model set on it (preprocess_cfg)
        if not key.startswith("_") and key not in vars(visual):
            setattr(visual, key, value)
    model.visual = visual
    if {f"visual.{k}": sample(t) for k, t in model.visual.state_dict().items()} != drawn["samples"]:
        return None  # not drawn the same way twice: leave it to the whole build
    model.eval()
    return model, _transform(model), fingerprint


def _transform(model: Any) -> Any:
    """The eval transform `open_clip.create_model_and_transforms` gives this model."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
