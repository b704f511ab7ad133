"""Encode texts and images through ONNX Runtime, from an export folder (`onnx_export`), without torch.

Each tower's session is created on first use, so a text query never loads
the image tower (nor an image query the text tower). Outputs are L2-normalised
float32 rows, as `Encoder` gives, so the two runtimes are interchangeable
wherever a query needs vectors.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval import config
from retrieval.model.onnx_export import TOWER_FILES, read_manifest
from retrieval.model.onnx_text import trim
from retrieval.model.preprocess import PreprocessConfig, preprocess_batch
from retrieval.model.tokenizer import VOCAB_FILE, BpeTokenizer


class OnnxUnavailable(Exception):
    """ONNX Runtime is not installed, or it cannot load or run this export."""


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401  (imported anyway by the first session)
    except ImportError:
        return False
    return True


def normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


class OnnxEncoder:
    """The query side of `Encoder` (encode_texts, encode_images, token_count) on ONNX Runtime.

    `low_memory` (queries) keeps the memory-mapped weights shared with the page cache;
    indexing passes False so that ONNX Runtime may pre-pack them for speed. `one_shot`
    (a process that answers one query and exits) skips the graph optimisations too:
    measured on ViT-B-32 (bench/onnx_session.py, CPU seconds of load + first encode, 1
    thread), they cost more to apply than they save on one run: text 0.35 -> 0.29 s,
    image 0.75 -> 0.46 s.

    A warm server (`clipfind serve`) answers many text queries, so it passes
    `prepack=("text",)`: ViT-B-32's text tower, 5 templates, ran 1.5x faster pre-packed
    (146 -> 94 ms median, 1 thread, 2 busy cores) for ~150 MB of anonymous memory.
    `wide_threads` gives the text tower a second session with that many threads, used for
    a run only when that many cores are idle at that moment (`config.query_threads`): a
    thread sharing its core with a busy process stalls the others at every barrier."""

    runtime = "onnx"

    def __init__(self, folder: str | Path, threads: int | None = 1, low_memory: bool = True,
                 one_shot: bool = False, prepack: Sequence[str] = (), wide_threads: int | None = None) -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise OnnxUnavailable(f"no ONNX export in {self.folder}")
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        self.precision = manifest["precision"]
        self.embed_dim = int(manifest["embed_dim"])
        self.threads = threads
        self.low_memory = low_memory
        self.one_shot = one_shot
        self.prepack = frozenset(prepack)
        self.wide_threads = wide_threads if wide_threads and threads and wide_threads > threads else None
        self.preprocess_cfg = PreprocessConfig.from_dict(manifest["preprocess"])
        self.image_size = self.preprocess_cfg.size[0]
        tokenizer = manifest.get("tokenizer") or {}
        self.context_length = int(tokenizer.get("context_length", 77))
        # Without the flag (format 2 exports, or a tower that is not causal) the text tower
        # takes the full context only.
        self.dynamic_length = bool(manifest.get("dynamic_length"))
        self._tokenizer: BpeTokenizer | None = None
        self._sessions: dict[tuple[str, int | None], object] = {}
        self._lock = threading.Lock()

    # -- what this export can do ----------------------------------------------------
    @property
    def has_text(self) -> bool:
        return "text" in self.manifest["files"] and bool(self.manifest.get("tokenizer"))

    @property
    def has_image(self) -> bool:
        return "image" in self.manifest["files"] and self.preprocess_cfg.supported

    @property
    def loaded_towers(self) -> list[str]:
        return sorted({tower for tower, _ in self._sessions})

    @property
    def loaded_sessions(self) -> list[tuple[str, int | None]]:
        """(tower, threads) of every session opened so far."""
        return sorted(self._sessions, key=str)

    # -- sessions -------------------------------------------------------------------
    def session_threads(self, tower: str) -> list[int | None]:
        """The thread counts this tower has sessions for: `threads`, and `wide_threads` for text."""
        return [self.threads] + ([self.wide_threads] if tower == "text" and self.wide_threads else [])

    def threads_now(self, tower: str) -> int | None:
        """The session a run of `tower` takes now: the wide one while its cores are idle."""
        if tower == "text" and self.wide_threads and config.query_threads() >= self.wide_threads:
            return self.wide_threads
        return self.threads

    def session(self, tower: str, threads: int | None = None):
        """The tower's InferenceSession with `threads` (default: `self.threads`), created once
        (thread-safe: the server shares one encoder)."""
        key = (tower, self.threads if threads is None else threads)
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = self._open(*key)
            return self._sessions[key]

    def warm_up(self, tower: str) -> None:
        """Open every session of `tower`; run each text session once, since ONNX Runtime's first
        run is slow (the image tower is only opened: running it would page in all its weights,
        ~350 MB of RSS for ViT-B-32, for queries that mostly reuse stored vectors)."""
        for threads in self.session_threads(tower):
            if tower == "text":
                self._run(tower, "tokens", self.text_batch(["a photo"]), threads)
            else:
                self.session(tower, threads)

    def _open(self, tower: str, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise OnnxUnavailable("onnxruntime is not installed") from exc
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
        if self.one_shot:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.low_memory:
            # A query encodes a few texts or one image. Weight pre-packing would copy the
            # memory-mapped weights, and the memory pattern pre-plans one block for every
            # intermediate at once; the arena stays on (without it glibc's malloc kept
            # 60-80 MB more after one run, varying from run to run). Measured on ViT-B-32's
            # text tower, 5 texts: anonymous memory 116 MB -> 41 MB, peak RSS 295 -> 220 MB.
            options.enable_mem_pattern = False
            if tower not in self.prepack:
                options.add_session_config_entry("session.disable_prepacking", "1")
        path = self.folder / self.manifest["files"][tower]["name"] if tower in self.manifest["files"] \
            else self.folder / TOWER_FILES[tower]
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/NoSuchFile types
            raise OnnxUnavailable(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:200]}") from exc

    def _run(self, tower: str, name: str, batch: np.ndarray, threads: int | None = None) -> np.ndarray:
        session = self.session(tower, self.threads_now(tower) if threads is None else threads)
        try:
            return session.run(None, {name: batch})[0]
        except Exception as exc:
            raise OnnxUnavailable(f"ONNX Runtime failed on the {tower} tower: "
                                  f"{str(exc).splitlines()[0][:200]}") from exc

    # -- encoding -------------------------------------------------------------------
    @property
    def tokenizer(self) -> BpeTokenizer:
        if self._tokenizer is None:
            settings = self.manifest.get("tokenizer") or {}
            self._tokenizer = BpeTokenizer(self.folder / VOCAB_FILE, self.context_length,
                                           settings.get("clean", "lower"))
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(list(texts))

    def token_count(self, text: str) -> int:
        return self.tokenizer.token_count(text)

    def text_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens for the text tower: cut to the longest text when the export takes any length."""
        tokens = self.tokenize(texts)
        return trim(tokens, self.tokenizer.eot) if self.dynamic_length else tokens

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = [normalise(self._run("text", "tokens", self.text_batch(texts[i:i + batch_size])))
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def encode_pixels(self, pixels) -> np.ndarray:
        """A preprocessed batch (N, 3, H, W), numpy or a CPU tensor (the indexer's loader gives tensors)."""
        batch = np.ascontiguousarray(np.asarray(pixels, dtype=np.float32))
        return normalise(self._run("image", "pixels", batch))

    def preprocess_images(self, images: Sequence) -> np.ndarray:
        return preprocess_batch(images, self.preprocess_cfg)

    def encode_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        out = [self.encode_pixels(self.preprocess_images(images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)
