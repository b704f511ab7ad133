"""Which runtime encodes a query: ONNX Runtime when the library has a usable export, else torch.

`auto` and `onnx` both prefer ONNX Runtime on the CPU: a fresh process then
imports neither torch nor open_clip, and loads only the tower the query needs.
When ONNX cannot serve (onnxruntime missing, the export cannot be made or
loaded, a tokenizer or resize mode it does not reproduce) the query runs on
torch and says so in one warning line: never a silent switch, since the two
runtimes' vectors differ in the 6th decimal. `torch` skips ONNX altogether.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from retrieval.errors import InputError
from retrieval.model.spec import RUNTIMES


class QueryRuntimes:
    """Hands out the encoder for a query's text or image terms, and falls back when ONNX fails."""

    def __init__(self, library, runtime: str = "auto", device: str = "auto", threads: int | None = 1,
                 torch_encoder: Callable[[], Any] | None = None, onnx_threads: int | None = None,
                 one_shot: bool = False, onnx_options: dict | None = None) -> None:
        """`threads` for torch (None: torch's own setting); `onnx_threads` for ONNX Runtime
        sessions, `threads` unless given; `one_shot`: this process answers one query and
        exits (`clipfind search`), so its sessions load fast rather than run fast;
        `onnx_options`: more of OnnxEncoder's settings (the server's `serving_options`)."""
        if runtime not in RUNTIMES:
            raise InputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        self.library = library
        self.runtime = runtime
        self.device = device
        self.threads = threads
        self.onnx_threads = threads if onnx_threads is None else onnx_threads
        self.one_shot = one_shot
        self.onnx_options = onnx_options or {}
        self.torch_encoder = torch_encoder or (lambda: library.encoder(device=device))
        self._onnx = None
        self._onnx_failed: str | None = None
        self.used: set[str] = set()  # runtimes that encoded something, for timings and tests

    @property
    def onnx_encoder(self):
        """The ONNX encoder opened so far (None before the first query, or after a fallback)."""
        return self._onnx

    @property
    def wants_onnx(self) -> bool:
        return self.runtime != "torch" and self.device in ("auto", "cpu") and self._onnx_failed is None

    def _onnx_encoder(self, warnings: list[str]):
        if not self.wants_onnx:
            return None
        if self._onnx is None:
            from retrieval.model.onnx_session import OnnxUnavailable
            from retrieval.store.onnx_exports import ExportError, open_export

            try:
                self._onnx = open_export(self.library, threads=self.onnx_threads, notice=warnings.append,
                                         **self.onnx_options)
                self._onnx.one_shot = self.one_shot  # sessions open on first use: it applies to all
            except (ExportError, OnnxUnavailable) as exc:
                self._give_up_onnx(str(exc), warnings)
                return None
        return self._onnx

    def _give_up_onnx(self, why: str, warnings: list[str]) -> None:
        self._onnx, self._onnx_failed = None, why
        warnings.append(f"{why}; this query runs on torch instead of ONNX Runtime")

    def for_tower(self, tower: str, warnings: list[str]):
        """The encoder for `tower` ("text" or "image") terms of a query."""
        onnx = self._onnx_encoder(warnings)
        if onnx is not None:
            if onnx.has_text if tower == "text" else onnx.has_image:
                return onnx
            if self.runtime == "onnx":
                warnings.append(f"this model's {tower} preprocessing is not reproduced without torch; "
                                f"its {tower} terms run on torch")
        return self.torch_encoder()

    def warm_up(self, warnings: list[str]) -> None:
        """Load both towers now and run each session once (the server, before its first request)."""
        for tower in ("text", "image"):
            encoder = self.for_tower(tower, warnings)
            if runtime_of(encoder) == "onnx":
                try:
                    encoder.warm_up(tower)
                except Exception as exc:  # OnnxUnavailable: queries will fall back, say why now
                    self._give_up_onnx(str(exc), warnings)

    def run(self, tower: str, encoder, encode: Callable[[Any], Any], warnings: list[str]):
        """`encode(encoder)`, on torch instead if ONNX Runtime fails at it."""
        from retrieval.model.onnx_session import OnnxUnavailable

        try:
            out = encode(encoder)
        except OnnxUnavailable as exc:
            if encoder is not self._onnx:
                raise
            self._give_up_onnx(f"{exc} (`clipfind verify` checks the export)", warnings)
            encoder = self.torch_encoder()
            out = encode(encoder)
        self.used.add(runtime_of(encoder))
        return out

    @contextlib.contextmanager
    def thread_limit(self, encoder) -> Iterator[None]:
        """Torch encoders run a query on `self.threads` threads; ONNX sessions were made with them."""
        if runtime_of(encoder) != "torch":
            yield
            return
        from retrieval.model.runtime import torch_threads

        with torch_threads(self.threads):
            yield


def runtime_of(encoder) -> str:
    return getattr(encoder, "runtime", "torch")


def serving_options(threads: int | None = None) -> dict:
    """OnnxEncoder settings for a warm server: the text tower, which every new text query
    runs, pre-packed, and (unless `threads` fixes the count) a second text session on all
    cores up to the cap, for the moments they are idle; see OnnxEncoder."""
    from retrieval import config

    wide = None if threads else min(config.usable_cores(), config.QUERY_THREADS_CAP)
    return {"prepack": ("text",), "wide_threads": wide}
