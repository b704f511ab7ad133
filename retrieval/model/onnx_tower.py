"""ONNX Runtime image towers for indexing: the precisions `onnx-fp32` and `onnx-int8`.

Why: at equal threads torch ran ViT-B-32's image tower at 0.84x ONNX Runtime's
speed on a 2-core AMD EPYC (issue 17), so the runtime is one more thing the
auto choice measures (`retrieval.model.autoprecision`), judged by the same
agreement with torch fp32 as bf16 and int8. The exports live in the machine's
cache (`$CLIPFIND_CACHE/onnx/<fingerprint>/<fp32|int8>`, the same folders the
library exports are copied from), made once per weights under a lock.
`OnnxImageModel` has open_clip's `encode_image`, so `Encoder.encode_pixels_with`
runs it like any torch image model.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval import config
from retrieval.model.onnx_export import export_towers, problems

if TYPE_CHECKING:
    import torch


ONNX_MODES = {"onnx-fp32": "fp32", "onnx-int8": "int8"}


def machine_folder(fingerprint: str, precision: str) -> Path:
    """The machine-wide export of these weights at `precision` (fp32 or int8)."""
    return config.cache_root() / "onnx" / fingerprint / precision


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class OnnxImageModel:
    """An image tower on ONNX Runtime with open_clip's `encode_image(pixels)`.

    One session per thread count, made on first use: the indexer's thread tuner
    changes torch's thread count between batches, and an ONNX Runtime session's
    count is fixed when it is made. Sessions pre-pack weights (speed over memory)."""

    runtime = "onnx"
    input_dtype = None

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._encoders: dict[int, object] = {}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        from retrieval.model.onnx_session import OnnxEncoder

        threads = torch.get_num_threads()
        encoder = self._encoders.get(threads)
        if encoder is None:
            encoder = self._encoders[threads] = OnnxEncoder(self.folder, threads=threads, low_memory=False)
        return torch.from_numpy(encoder.encode_pixels(pixels.detach().float().cpu()))

    def eval(self) -> OnnxImageModel:
        return self


def onnx_image_model(encoder: Any, mode: str) -> OnnxImageModel:
    """The image tower of `encoder`'s weights at `mode` (onnx-fp32 or onnx-int8), exported first
    if the machine has no sound export of it. Raises ImportError without onnxruntime,
    ExportError when the model cannot be exported."""
    import onnxruntime  # noqa: F401  (fail here, before exporting, when it is missing)

    precision = ONNX_MODES[mode]
    folder = machine_folder(encoder.fingerprint, precision)
    if problems(folder, encoder.fingerprint, precision):
        with _lock(folder):
            if problems(folder, encoder.fingerprint, precision):
                export_towers(encoder, folder, precision)
    return OnnxImageModel(folder)
