"""Export a loaded model's text and image towers to ONNX, with a manifest that says what they are.

Why: ONNX Runtime answers a query in a fresh process without importing torch
(a second, not seven) and runs the image tower faster than torch eager on
some CPUs. torch stays the exporter. One export is a folder:

    manifest.json      fingerprint, precision, sizes and hashes of the files, tokenizer and
                       preprocessing settings, versions
    text.onnx          tokens (N, context) int64 -> features (N, dim), not normalised
    image.onnx         pixels (N, 3, H, W) float32 -> features (N, dim), not normalised
    *.onnx.data        their weights, page-aligned so ONNX Runtime memory-maps them
    bpe_simple_vocab_16e6.txt.gz   the tokenizer's merges, so queries need no open_clip

The folder is built under a temporary name and renamed into place, so a
Ctrl-C or a kill leaves either the old folder or the new one, never half a
file; leftovers of a killed export (`.tmp-*`) are removed by the next export.
int8 folders hold the image tower only, quantised by ONNX Runtime's dynamic
quantisation (weights int8, activations quantised per batch): an indexing
runtime, not a query one.

The exporter is torch's TorchScript-based one (`dynamo=False`): on the tiny test
model it took 4 s against 17 s for the dynamo exporter, and it needs no onnxscript.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from retrieval.model.preprocess import PreprocessConfig
from retrieval.model.tokenizer import VOCAB_FILE, load_tables, packaged_vocab

EXPORT_VERSION = 3  # bumped when the graphs or the manifest change: older exports are rebuilt
OPSET = 17
MANIFEST = "manifest.json"
TOWER_FILES = {"text": "text.onnx", "image": "image.onnx"}
ONNX_PRECISIONS = ("fp32", "int8")
QUANTISATION = "dynamic-u8u8"  # how int8 exports are made: an int8 export made otherwise is stale


class ExportError(Exception):
    """The model could not be exported (an unsupported layer, no space, no onnx package)."""


def tokenizer_settings(tokenizer) -> dict | None:
    """How to rebuild `tokenizer` without torch, or None when it is not CLIP's plain BPE tokenizer.

    Hugging Face tokenizers (text towers from transformers) and SigLIP-style
    reduction masks are left to torch: their text queries keep the torch runtime.
    """
    from open_clip.tokenizer import SimpleTokenizer

    if type(tokenizer) is not SimpleTokenizer or getattr(tokenizer, "reduction_fn", None) is not None:
        return None
    if tokenizer.vocab_size != 49408:  # extra special tokens: not the packaged vocabulary
        return None
    modes = {"_clean_lower": "lower", "_clean_whitespace": "whitespace",
             "_clean_canonicalize": "canonicalize"}
    mode = modes.get(getattr(tokenizer.clean_fn, "__name__", ""))
    if mode is None:
        return None
    return {"kind": "clip-bpe", "clean": mode, "context_length": int(tokenizer.context_length)}


def _hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _towers(model):
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model.encode_text(tokens)

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return self.model.encode_image(pixels)

    return TextTower().eval(), ImageTower().eval()


def export_graph(module, example, path: Path, input_name: str, dynamic_length: bool = False) -> None:
    """Trace one tower into `path` with a dynamic batch dimension (input `input_name`, output
    `features`), and a dynamic second dimension too with `dynamic_length` (a text tower's tokens)."""
    import torch

    # nn.MultiheadAttention's fused fast path (taken under no_grad) has no ONNX form: trace the
    # plain maths instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
            torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                              output_names=["features"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={input_name: {0: "batch", **({1: "length"} if dynamic_length else {})},
                                            "features": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def externalise(path: Path, alignment: int = 1 << 16) -> str:
    """Move the graph's weights into `<name>.data` beside it, each at an `alignment`-byte offset.

    ONNX Runtime memory-maps external data at aligned offsets instead of copying it,
    so a query process pays only for the weights it touches (the text tower's 100 MB
    token table is read a few rows at a time): measured on ViT-B-32's text tower, peak
    RSS of loading and running one text 231 MB instead of 409 MB. Returns the data file's name.
    """
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(path))
    data_name = path.name + ".data"
    with open(path.with_name(data_name), "wb") as fh:
        for tensor in model.graph.initializer:
            if len(tensor.raw_data) < 4096:
                continue
            fh.write(b"\0" * (-fh.tell() % alignment))
            offset = fh.tell()
            fh.write(tensor.raw_data)
            set_external_data(tensor, data_name, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, str(path))
    return data_name


# Texts the variable-length export is checked on: lengths from 2 tokens to the full context.
CHECK_TEXTS = ("", "a", "a photo of a dog.", "RED!!", "🐶 on a beach at night, très jolie",
               "a photo of a 12345 striped & spotted cat_dog", "a very long query " * 20)


def export_text(encoder: Any, model, fixed_tower, path: Path) -> bool:
    """Export the text tower to `path`: with a dynamic token length when the tower allows it and
    the exported graph, run on each text's own length, agrees with torch on the full context.
    Returns whether it did (else the graph is the fixed-length one, as before)."""
    import torch

    from retrieval.model.onnx_text import AGREEMENT_TOLERANCE, variable_length_tower

    tokens = encoder.tokenize(list(CHECK_TEXTS)).cpu()
    tower = variable_length_tower(model)
    if tower is not None:
        end_token = int(tokens[0].max())  # "" is [start, end]: the end token is the row's largest id
        example = tokens[:2, :max(2, int((tokens[:2] == end_token).int().argmax(dim=1).max()) + 1)]
        export_graph(tower, example, path, "tokens", dynamic_length=True)
        with torch.no_grad():
            reference = model.encode_text(tokens).float().numpy()
        error = _onnx_length_error(path, reference, tokens.numpy(), end_token)
        if error is not None and error <= AGREEMENT_TOLERANCE:
            return True
        logging.getLogger(__name__).info("variable-length text export disagrees (%s); exporting "
                                         "the fixed-length one", error)
    export_graph(fixed_tower, tokens[:2], path, "tokens")
    return False


def _onnx_length_error(path: Path, reference, tokens, end_token: int) -> float | None:
    """`length_error` of the graph at `path` on ONNX Runtime (None if it cannot run it)."""
    from retrieval.model.onnx_text import length_error

    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return length_error(reference, lambda t: session.run(None, {"tokens": t})[0], tokens, end_token)
    except Exception:  # noqa: BLE001 - no onnxruntime, or it rejects the graph: not dynamic then
        return None


def _quantize(source: Path, target: Path) -> None:
    """Dynamic int8 with unsigned weights as well as activations (U8U8).

    ONNX Runtime's default, signed weights (U8S8), lands on x86 kernels that can
    saturate on CPUs without VNNI: on the 2-core AMD EPYC here ViT-B-32's image tower
    agreed with fp32 at cosine 0.985 with it (per-channel MatMul-only: 0.983), and at
    0.9998 with U8U8, the same as torch's dynamic int8. Whatever it gives, the auto
    choice only takes it when it agrees with fp32 (`retrieval.model.autoprecision`).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # its "consider pre-processing" advice goes to the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8)
    finally:
        logging.disable(logging.NOTSET)


def export_towers(encoder: Any, dest: str | os.PathLike, precision: str = "fp32") -> dict:
    """Write an export of `encoder`'s model into the folder `dest` (replacing it); returns the manifest.

    fp32: both towers (the text tower only when the tokenizer can run without torch).
    int8: the image tower, dynamically quantised.
    """
    import open_clip
    import torch

    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"no ONNX export at precision {precision!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = tokenizer_settings(encoder.tokenizer)
    pre = PreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(encoder.model))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from other users of the library
    try:
        model = encoder.model if encoder.device.type == "cpu" else copy.deepcopy(encoder.model).float().cpu()
        text_tower, image_tower = _towers(model)
        files: dict[str, str] = {}
        dynamic_length = False
        if precision == "fp32" and tokenizer is not None:
            dynamic_length = export_text(encoder, model, text_tower, tmp / TOWER_FILES["text"])
            shutil.copyfile(packaged_vocab(), tmp / VOCAB_FILE)
            load_tables(tmp / VOCAB_FILE)  # the tokenizer's tables, cached now, not by the first query
            files.update(text=TOWER_FILES["text"], text_data=externalise(tmp / TOWER_FILES["text"]),
                         vocab=VOCAB_FILE)
        pixels = torch.zeros(2, 3, *pre.size)
        if precision == "fp32":
            export_graph(image_tower, pixels, tmp / TOWER_FILES["image"], "pixels")
            files["image_data"] = externalise(tmp / TOWER_FILES["image"])
        else:
            export_graph(image_tower, pixels, tmp / "image-fp32.onnx", "pixels")
            _quantize(tmp / "image-fp32.onnx", tmp / TOWER_FILES["image"])
            (tmp / "image-fp32.onnx").unlink()
        files["image"] = TOWER_FILES["image"]
        manifest = {
            "version": EXPORT_VERSION, "fingerprint": encoder.fingerprint, "precision": precision,
            "embed_dim": encoder.embed_dim, "opset": OPSET, "tokenizer": tokenizer,
            "dynamic_length": dynamic_length,
            "quantisation": QUANTISATION if precision == "int8" else None,
            "preprocess": pre.to_dict(), "preprocess_supported": pre.supported,
            "files": {role: {"name": name, "bytes": (tmp / name).stat().st_size,
                             "blake2b": _hash_file(tmp / name)} for role, name in files.items()},
            "torch": torch.__version__, "open_clip": open_clip.__version__,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "export_seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for name in os.listdir(tmp):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        swap_into_place(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write the ONNX export to {dest.parent}: {exc.strerror or exc}") from exc
        raise ExportError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]) from exc
    return manifest


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished folder to `dest`; an old `dest` is moved aside first, then removed."""
    old = None
    if dest.exists():
        old = dest.with_name(f".tmp-old-{dest.name}-{os.getpid()}")
        os.rename(dest, old)
    os.rename(tmp, dest)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(parent: str | os.PathLike) -> None:
    """Delete temporary folders a killed export left in `parent`."""
    with contextlib.suppress(OSError):
        for entry in Path(parent).iterdir():
            if entry.name.startswith(".tmp-") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when there is none or it is not one of ours."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "files" in manifest else None


def problems(folder: str | os.PathLike, fingerprint: str, precision: str, full: bool = False) -> list[str]:
    """What is wrong with the export in `folder` for these weights: missing, stale, truncated, altered.

    Sizes are checked always (cheap: a truncated file shows), content hashes only
    with `full` (`clipfind verify`), since hashing a ViT-B-32 takes a second.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"no ONNX export in {folder}"]
    if manifest.get("version") != EXPORT_VERSION:
        return [f"the ONNX export in {folder} is from an older clipfind (format {manifest.get('version')})"]
    if manifest.get("fingerprint") != fingerprint or manifest.get("precision") != precision:
        return [f"the ONNX export in {folder} is of other weights or another precision (stale)"]
    if precision == "int8" and manifest.get("quantisation") != QUANTISATION:
        return [f"the ONNX export in {folder} was quantised another way (stale)"]
    found = []
    for role, info in manifest["files"].items():
        path = folder / info["name"]
        try:
            size = path.stat().st_size
        except OSError:
            found.append(f"{path} is missing")
            continue
        if size != info["bytes"]:
            found.append(f"{path} is {size} bytes, not the {info['bytes']} exported (truncated?)")
        elif full and _hash_file(path) != info["blake2b"]:
            found.append(f"{path} has changed since it was exported ({role} tower)")
    return found
