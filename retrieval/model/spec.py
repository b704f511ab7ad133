"""What names a model, as plain data: importable without torch, so the CLI starts fast."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from retrieval.errors import ModelError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "onnx-fp32", "onnx-int8")  # onnx-*: CPU image tower on ONNX Runtime
# Who runs the model: torch (trains, exports, GPU) or ONNX Runtime (fast fresh-process queries).
RUNTIMES = ("auto", "onnx", "torch")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from. Exactly one source: pretrained tag, checkpoint, model_dir or random."""

    model: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    model_dir: str | None = None
    random_weights: bool = False

    def __post_init__(self) -> None:
        sources = [bool(self.pretrained), bool(self.checkpoint), bool(self.model_dir), self.random_weights]
        if sum(sources) != 1:
            raise ModelError(
                "give exactly one model source: --pretrained TAG, --checkpoint FILE, "
                "--model-dir DIR or --random-weights"
            )
        if not self.model_dir and not self.model:
            raise ModelError("--model NAME is needed with --pretrained, --checkpoint or --random-weights")

    @property
    def label(self) -> str:
        """A short human name, used in every message about this model."""
        if self.model_dir:
            return f"model dir {self.model_dir}"
        if self.checkpoint:
            return f"{self.model} from checkpoint {self.checkpoint}"
        if self.random_weights:
            return f"{self.model} with RANDOM weights (plumbing only, no real retrieval)"
        return f"{self.model} / {self.pretrained}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))
