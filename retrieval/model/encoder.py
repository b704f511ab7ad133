"""One door to a CLIP model: load it from any spec, pick device and precision, encode.

A model spec is one of
  * an open_clip name + pretrained tag (`ViT-B-32` + `laion2b_s34b_b79k`), fetched
    into the usual cache when online;
  * a local checkpoint file (any open_clip state dict) with the architecture name;
  * a model directory in open_clip's local-dir layout (`open_clip_config.json` +
    `open_clip_model.safetensors`), which is also what a Hugging Face cache holds;
  * an architecture with random weights, only when asked for (plumbing tests).

Outputs are always L2-normalised float32 numpy arrays, whatever ran inside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from retrieval import config
from retrieval.errors import ModelError
from retrieval.model import autoprecision, hftext, release, towers
from retrieval.model.onnx_export import ExportError
from retrieval.model.onnx_tower import ONNX_MODES, onnx_image_model
from retrieval.model.runtime import image_model_at
from retrieval.model.spec import PRECISIONS, ModelSpec

__all__ = ["PRECISIONS", "Encoder", "ModelSpec"]

def choose_device(requested: str = "auto") -> torch.device:
    """cuda > mps > cpu, unless the user named one."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"--device {requested} asked for, but no CUDA GPU is available")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(requested: str, device: torch.device) -> str:
    """Turn `auto` into a concrete mode and refuse modes the device cannot run.

    `auto` is fp16 on a GPU and fp32 on a CPU here; on a CPU the Encoder then
    replaces it with the measured winner (`retrieval.model.autoprecision.settle`).
    """
    if requested not in PRECISIONS:
        raise ModelError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "fp16" if device.type in ("cuda", "mps") else "fp32"
    if requested in ("int8", "onnx-fp32", "onnx-int8") and device.type != "cpu":
        raise ModelError(f"--precision {requested} runs on the CPU only; use fp16 on a GPU")
    if requested == "fp16" and device.type == "cpu":
        raise ModelError("--precision fp16 needs a GPU; on a CPU use fp32, bf16 or int8")
    if requested == "bf16" and device.type == "cpu" and not config.cpu_has_native_bf16():
        raise ModelError("--precision bf16 needs a CPU with AVX512-BF16 or AMX; this one has neither")
    return requested


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, stable hash of a model's weights (names, shapes, strided sample of values).

    Hashing every byte of a 600 MB model would add seconds to each query; a
    strided sample of every tensor tells different weights apart just as well.
    """
    return towers.fingerprint_of({name: towers.sample(t) for name, t in model.state_dict().items()})


def _is_config_file(model: str | None) -> bool:
    return bool(model) and model.endswith(".json")


def _register_config(path: str) -> str:
    """Make a bare open_clip model config JSON known to open_clip; its name is the file stem."""
    import open_clip

    file = Path(path)
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model config {path}: {exc}") from exc
    if "model_cfg" in cfg:
        raise ModelError(f"{path} is a model-folder config; pass its folder with --model-dir instead")
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    open_clip.add_model_config(file)
    return file.stem


def _open_clip_name(spec: ModelSpec) -> tuple[str, str | None]:
    if spec.model_dir:
        return f"local-dir:{spec.model_dir}", None
    if _is_config_file(spec.model):
        name = _register_config(spec.model)
        # A config file has no pretrained tags, so a --pretrained that passed the source
        # check is a weights file: load it (it used to be dropped for unseeded random weights).
        return name, spec.checkpoint or spec.pretrained
    if spec.checkpoint:
        return spec.model, spec.checkpoint
    if spec.random_weights:
        return spec.model, None
    return spec.model, spec.pretrained


def _check_source_exists(spec: ModelSpec) -> None:
    import open_clip

    if spec.model_dir:
        folder = Path(spec.model_dir)
        if not (folder / "open_clip_config.json").is_file():
            raise ModelError(f"{spec.label}: no open_clip_config.json there")
        if not any((folder / n).is_file() for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
            raise ModelError(f"{spec.label}: no open_clip_model.safetensors or open_clip_pytorch_model.bin there")
        return
    if _is_config_file(spec.model):
        _register_config(spec.model)
    elif spec.model not in open_clip.list_models():
        raise ModelError(f"unknown model {spec.model!r}; `clipfind models` lists the architectures")
    if spec.checkpoint and not Path(spec.checkpoint).is_file():
        raise ModelError(f"checkpoint file not found: {spec.checkpoint}")
    if spec.pretrained and not Path(spec.pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        if spec.pretrained not in tags:
            known = ", ".join(tags) or "none"
            raise ModelError(f"{spec.model} has no pretrained tag {spec.pretrained!r} (known: {known})")


def _load_failure(spec: ModelSpec, exc: Exception) -> ModelError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if spec.pretrained and ("download" in text.lower() or "offline" in text.lower() or "connect" in text.lower()):
        why = "no network" if not hub_reachable() else "the download failed"
        return ModelError(
            f"could not get weights for {spec.label}: not in the local cache and {why}. Offline, give the weights "
            "yourself: --model NAME --checkpoint FILE, or --model-dir DIR (open_clip_config.json + "
            "weights), or put them in the Hugging Face cache (HF_HOME)"
        )
    if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text or "Error(s) in loading" in text:
        return ModelError(f"{spec.label}: the weights do not match the architecture ({text[:200]})")
    return ModelError(f"could not load {spec.label}: {text[:300]}")


def hub_reachable(host: str = "huggingface.co") -> bool:
    """Whether the weights hub resolves at all; offline, we go straight to the local cache."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _quiet_offline_aware_loading(needs_download: bool) -> Iterator[None]:
    """Silence open_clip/hub chatter and, with no network, skip the hub's minute of retries.

    huggingface_hub reads its offline switch at call time, so flipping it here makes a
    cached download succeed at once and a missing one fail at once.
    """
    from huggingface_hub import constants as hub_constants

    previous_offline = hub_constants.HF_HUB_OFFLINE
    if needs_download and not hub_reachable():
        hub_constants.HF_HUB_OFFLINE = True
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        hub_constants.HF_HUB_OFFLINE = previous_offline


def _own_config(spec: ModelSpec) -> tuple[dict | None, Path | None]:
    """(model config, the folder its relative paths start from) for a model dir or a config file;
    (None, None) for open_clip's built-in names, whose configs need nothing resolved."""
    if spec.model_dir:
        file = Path(spec.model_dir) / "open_clip_config.json"
    elif _is_config_file(spec.model):
        file = Path(spec.model)
    else:
        return None, None
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model config {file}: {exc}") from exc
    cfg = doc.get("model_cfg", doc) if isinstance(doc, dict) else None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("text_cfg"), dict):
        raise ModelError(f"{file} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    return cfg, file.parent


def _creation_args(spec: ModelSpec) -> tuple[str, str | None, dict, bool]:
    """(open_clip name, pretrained, create_model overrides, needs a download) for `spec`.

    A config whose text tower is a Hugging Face model gets its tower folder
    resolved first (retrieval.model.hftext), so a model dir or config file that
    names a local folder or an installed package loads with no network.
    """
    _check_source_exists(spec)
    name, pretrained = _open_clip_name(spec)
    needs_download = bool(spec.pretrained) and not Path(spec.pretrained).is_file()
    own_cfg, base_dir = _own_config(spec)
    overrides: dict = {}
    if own_cfg is not None and hftext.is_hf_text(own_cfg):
        hftext.require_transformers(spec.label)
        overrides["text_cfg"], needs_hub = hftext.resolve_text_cfg(own_cfg, base_dir, spec.label)
        needs_download = needs_download or needs_hub
    return name, pretrained, overrides, needs_download


def load_model(spec: ModelSpec, device: torch.device):
    """Build the open_clip model, its eval transform and tokenizer; every failure is a ModelError."""
    import open_clip

    name, pretrained, overrides, needs_download = _creation_args(spec)
    if spec.random_weights:
        torch.manual_seed(0)  # the same "random" model every time, so libraries can reopen it
    try:
        with _quiet_offline_aware_loading(needs_download):
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, load_weights=not spec.random_weights, **overrides
            )
            tokenizer = _tokenizer(name, overrides)
    except ModelError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/pickle errors
        raise _load_failure(spec, exc) from exc
    model.eval()
    return model, preprocess, tokenizer


def _tokenizer(name: str, overrides: dict):
    import open_clip

    return hftext.hf_tokenizer(overrides["text_cfg"]) if overrides else open_clip.get_tokenizer(name)


def load_image_model(spec: ModelSpec, device: torch.device):
    """(model with only its image tower in memory, eval transform, tokenizer, fingerprint of the
    whole model), or None where only the whole build can do it (retrieval.model.towers)."""
    name, pretrained, overrides, needs_download = _creation_args(spec)
    try:
        with _quiet_offline_aware_loading(needs_download):
            built = towers.load_image_tower(spec, name, pretrained, overrides, device)
            if built is None:
                return None
            tokenizer = _tokenizer(name, overrides)
    except Exception:  # noqa: BLE001 - e.g. a TorchScript archive torch cannot map: the whole build
        return None    # loads it, or says in one line what is wrong with it
    model, preprocess, fingerprint = built
    return model, preprocess, tokenizer, fingerprint


class Encoder:
    """A loaded model that turns PIL images, pixel tensors and texts into unit vectors."""

    def __init__(self, spec: ModelSpec, device: str = "auto", precision: str = "auto",
                 embed_dim: int | None = None, images_only: bool = False) -> None:
        """`embed_dim`: the dimension when the caller knows it (a Ray actor: the library's), which
        saves a text forward pass (~1 s of CPU on ViT-B-32) before the first image.
        `images_only`: the caller encodes images only (indexing), so on a CPU only the image
        tower is built where `towers` can (the text tower comes on first need, as after
        `keep_image_tower_only`); the fingerprint is the whole model's either way."""
        self.spec = spec
        self.device = choose_device(device)
        self._precision = resolve_precision(precision, self.device)
        self._released: str | None = None  # "text" or "all": freed by keep_image_tower_only()
        self._image_model = None
        self._freed = 0  # bytes let go while an int8 copy was made (keep_image_tower_only reports them)
        built = load_image_model(spec, self.device) if images_only else None
        if built is not None:
            self._model, self.preprocess, self.tokenizer, self.fingerprint = built
            self._released = "text"
            if self.device.type == "cpu" and autoprecision.will_measure(self, precision):
                # Measuring once per model and machine judges text queries too: whole model,
                # loaded after this one is let go (_reload), so the two never add up.
                self._reload()
        else:
            self._model, self.preprocess, self.tokenizer = load_model(spec, self.device)
            self.fingerprint = weights_fingerprint(self._model)
        self.image_size = _image_size(self._model)
        self.embed_dim = int(embed_dim) if embed_dim else self._probe_dim()
        # The tokenizer's limit is the one texts are cut at (a BERT tower reports 512 positions).
        self.context_length = int(getattr(self.tokenizer, "context_length", None)
                                  or getattr(self._model, "context_length", 77))
        self._image_model = self._prepare_for_precision(self._precision)  # ONNX exports need the above
        self._precision_report: dict | None = None
        # Settled on first need (an image to encode, or `precision` read), so that commands
        # that only encode text never pay for measuring the image tower.
        self._unsettled: str | None = precision if self.device.type == "cpu" else None

    @property
    def model(self) -> torch.nn.Module:
        """The whole model, both towers in fp32 (reloaded if `keep_image_tower_only` freed them)."""
        if self._released:
            self._reload()
        return self._model

    # -- memory ----------------------------------------------------------------------
    def keep_image_tower_only(self) -> int:
        """Free the weights that encoding images at the settled precision does not use.

        Indexing encodes images only: the text tower (~260 MB of ViT-B-32's 660 MB) and,
        once an int8, bf16 or ONNX image tower runs, the fp32 image weights are dead
        weight there (retrieval.model.release says what they cost). The text tower goes
        before the int8/bf16 copy is made, so the two never add up; if the precision has
        to be measured first (once per model and machine), that needs both towers.
        Anything that needs them later (`model`, `encode_texts`) reloads them: seconds,
        never wrong answers. Returns the bytes let go; a no-op on a GPU.
        """
        if self.device.type != "cpu" or self._released == "all":
            return 0
        if self._unsettled is not None and autoprecision.will_measure(self, self._unsettled):
            self._settle()
        freed = 0
        if not self._released:
            freed = release.release_tensors(self._model, keep=release.tensors_of(self._model.visual))
            self._released = "text"
            release.trim_heap()
        self._settle()  # builds the int8/bf16 copy or ONNX session from the fp32 image tower
        freed, self._freed = freed + self._freed, 0  # an int8 copy lets the fp32 parts go as it goes
        image_tower = getattr(self._image_model, "visual", None)
        if image_tower is not self._model.visual:
            freed += release.release_tensors(self._model.visual, keep=release.tensors_of(image_tower))
            self._released = "all"
            release.trim_heap()
        return freed

    def _let_go(self, module: torch.nn.Module, keep: torch.nn.Module) -> None:
        """Release `module`'s tensors that `keep` does not use; counted for keep_image_tower_only."""
        self._freed += release.release_tensors(module, keep=release.tensors_of(keep))

    def _reload(self) -> None:
        """Load the weights again after `keep_image_tower_only`; they must be the same weights.

        When images run on the fp32 tower itself, that tower is let go first: the reload
        replaces it, so the two never add up (an ONNX export on first index reloads)."""
        if self._model is not None and self._image_model in (self._model, None):
            release.release_tensors(self._model)
            release.trim_heap()
        model, _, _ = load_model(self.spec, self.device)
        if weights_fingerprint(model) != self.fingerprint:  # also checks an image-tower-only build's
            raise ModelError(f"{self.spec.label}: the weights changed on disk while clipfind was using them")
        if self._image_model is self._model:
            self._image_model = model
        self._model, self._released = model, None

    # -- precision -----------------------------------------------------------------
    def _prepare_for_precision(self, precision: str) -> torch.nn.Module:
        """The model whose `encode_image` runs at `precision`.

        On a CPU, bf16 and int8 get their own copy of the image tower (bf16 weights, or
        int8 dynamically quantised Linear layers) sharing the fp32 text tower: casting
        weights on every call, as autocast does, costs more than bf16 saves on CPUs.
        """
        if self.device.type == "cpu" and precision in ("bf16", "int8"):
            # Only the image tower is copied: without its text tower (released), the model serves.
            if precision == "int8" and self._released == "text":
                # Images only from here on: the fp32 image tower goes part by part as the int8
                # copy takes its place (reloaded if fp32 is ever asked for again).
                fp32 = self._model.visual
                model = image_model_at(self._model, precision, converted=lambda path, part: self._let_go(
                    fp32.get_submodule(path), keep=part))
                self._let_go(fp32, keep=model.visual)
                self._released = "all"
                release.trim_heap()
                return model
            return image_model_at(self._image_weights(), precision)
        if precision in ONNX_MODES:
            try:
                return onnx_image_model(self, precision)
            except ImportError as exc:
                raise ModelError(f"--precision {precision} needs onnxruntime (pip install onnxruntime)") from exc
            except ExportError as exc:
                raise ModelError(f"--precision {precision}: cannot export this model to ONNX ({exc})") from exc
        return self._image_weights()

    def _image_weights(self) -> torch.nn.Module:
        """The fp32 model whose image tower a precision is built from: with only the text tower
        released it serves as it is; with the image weights released too, they are reloaded."""
        return self.model if self._released == "all" else self._model

    @property
    def precision(self) -> str:
        """The precision images are encoded at (on a CPU, reading it settles `auto`)."""
        self._settle()
        return self._precision

    @property
    def precision_report(self) -> dict | None:
        """How the precision was chosen: rates and agreement with fp32 (None on a GPU)."""
        self._settle()
        return self._precision_report

    def set_precision(self, precision: str, check: bool = True) -> None:
        """Switch precision in place (bf16/int8 build a copy of the image tower, the fp32 model stays).

        With `check`, `auto` on a CPU is settled by measurement and a forced bf16/int8 is
        checked against fp32, as when the encoder was made (on first need).
        """
        self._precision = resolve_precision(precision, self.device)
        self._image_model = self._prepare_for_precision(self._precision)
        self._unsettled = precision if check and self.device.type == "cpu" else None

    def _settle(self) -> None:
        """On a CPU, `auto` becomes the fastest mode that agrees with fp32 (measured once per
        model and machine, then cached), and a forced bf16/int8 is checked against fp32."""
        if self._unsettled is not None:
            requested, self._unsettled = self._unsettled, None
            self._precision_report = autoprecision.settle(self, requested)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Inference mode, plus autocast where the precision wants it (fp16; bf16 on a GPU)."""
        with torch.inference_mode():
            if self._precision == "fp16":
                with torch.autocast(self.device.type, dtype=torch.float16):
                    yield
            elif self._precision == "bf16" and self.device.type != "cpu":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    yield
            else:
                yield

    # -- encoding ------------------------------------------------------------------
    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        return torch.stack([self.preprocess(img) for img in images])

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode an already-preprocessed batch (N, 3, H, W); the indexer's hot path."""
        self._settle()
        return self.encode_pixels_with(self._image_model, pixels)

    def encode_pixels_with(self, image_model: torch.nn.Module, pixels: torch.Tensor) -> np.ndarray:
        """Encode with a given image model (one from `_prepare_for_precision`); precision timing uses it."""
        dtype = getattr(image_model, "input_dtype", None)
        pixels = pixels.to(self.device, dtype=dtype, non_blocking=True)
        with self.autocast():
            feats = image_model.encode_image(pixels)
        return _normalise(feats)

    def encode_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        out = [self.encode_pixels(self.preprocess_images(images[i : i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def token_count(self, text: str) -> int:
        """Tokens the text needs including start/end, to warn before silent truncation."""
        from open_clip.tokenizer import SimpleTokenizer

        if isinstance(self.tokenizer, SimpleTokenizer):
            return len(self.tokenizer.encode(text)) + 2
        hf = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if callable(hf):
            return len(hf(text)["input_ids"])
        return int((self.tokenizer([text])[0] != 0).sum())

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[i : i + batch_size]).to(self.device)
            with self.autocast():
                feats = self.model.encode_text(tokens)
            out.append(_normalise(feats))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def _probe_dim(self) -> int:
        if self._released:  # no text tower here: the image tower's output has the same size
            output_dim = getattr(self._model.visual, "output_dim", None)
            if isinstance(output_dim, int):  # open_clip's towers say it (no forward pass, no buffers kept)
                return output_dim
            with torch.inference_mode():
                size = self.image_size
                return int(self._model.encode_image(torch.zeros(1, 3, size, size, device=self.device)).shape[-1])
        return int(self.encode_texts(["a"]).shape[1])

    def describe(self) -> dict:
        """What a library records about its model, so a mismatch can be caught on open."""
        return {
            "spec": json.loads(self.spec.to_json()),
            "label": self.spec.label,
            "fingerprint": self.fingerprint,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "preprocess": repr(self.preprocess),
        }


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _normalise(feats: torch.Tensor) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy().astype(np.float32, copy=False)

