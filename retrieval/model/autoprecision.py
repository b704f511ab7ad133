"""CPU precision as a measured choice: fp32, bf16 or int8, whichever is fastest here and agrees.

Which mode is fastest depends on the processor (bf16 wins on Intel with AMX, can
lose on AMD without it; dynamic int8 usually wins where bf16 is not native), so
`--precision auto` on a CPU measures instead of guessing. The first time a model
encodes an image on a machine (text-only work never waits for it), `choose`
times each candidate on a few batches of drawn
pictures at the model's input size, checks that each agrees with fp32 on the
same inputs, and picks the fastest candidate that agrees (it must beat fp32 by
`MIN_SPEEDUP`, or fp32 stays). The choice, the rates and the agreement are cached
in `<cache root>/precision.json` per (weights fingerprint, CPU model, cores,
torch version): another CPU or another torch measures again.

Agreement with fp32 means both
  * mean cosine between a mode's image embeddings and fp32's >= MIN_COSINE, and
  * mean overlap of the top-10 images that text queries ("a photo of a red
    circle.") retrieve among the drawn pictures >= MIN_OVERLAP. It means most
    for an aligned model (the tiny test model knows these drawings); for other
    weights it still checks that rankings are stable under the new precision.

A forced `--precision bf16|int8` is checked the same way (from the cache when it
can be) and logs a warning with the measured agreement when it fails. GPUs keep
fp16 and are not measured.

Nothing here imports torch at module level, so `status` can read the cached
choice (`retrieval.model.precision_cache.cached_choice`) without it. The image towers themselves are built by
`retrieval.model.runtime`; which precisions made a library's vectors is the
store's business (`retrieval.store.runs`); re-encoding a library at one
precision is `retrieval.index.reembed`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

from retrieval import config
from retrieval.model.onnx_tower import ONNX_MODES, onnx_image_model
from retrieval.model.precision_cache import (
    cached_entry,
    machine_key,
    onnxruntime_version,
    store_entry,
)
from retrieval.model.runtime import image_model_at

if TYPE_CHECKING:  # torch is imported inside the functions that encode, so `status` stays light
    import numpy as np
    import torch

log = logging.getLogger("clipfind.precision")

MIN_COSINE = 0.995  # mean cosine of a mode's image embeddings to fp32's
MIN_OVERLAP = 0.9  # mean top-k text->image overlap with fp32
OVERLAP_K = 10
MIN_SPEEDUP = 1.1  # a lower-precision mode must beat fp32 by this much to be worth it
NEAR_TIE = 0.05  # agreeing modes this close to the fastest count as equally fast
FAST_ENOUGH = 500.0  # img/s: above this fp32 outruns decoding (~220 img/s per core), so stay exact
BATCH_SIZE = 16  # pictures per timed batch
BATCHES = 3  # distinct batches per mode, judged for agreement; the fastest batch counts
MAX_ROUNDS = 24  # a cheap model is timed on repeats of those batches, until TIME_BUDGET
TIME_BUDGET = 3.0  # seconds of timing beyond the first BATCHES rounds are not spent
PROBE_TEMPLATES = ("a photo of a {}.", "a {}.")


class Measurable(Protocol):
    """What measuring needs of an encoder (`retrieval.model.encoder.Encoder` is one)."""

    model: Any
    device: torch.device
    fingerprint: str
    image_size: int
    spec: Any

    @property
    def precision(self) -> str: ...

    def preprocess_images(self, images: Sequence) -> torch.Tensor: ...

    def encode_pixels_with(self, image_model: Any, pixels: torch.Tensor) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def set_precision(self, precision: str, check: bool = True) -> None: ...


# -- agreement ---------------------------------------------------------------------------


def cosine_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Mean and minimum cosine between matching rows of two sets of unit vectors."""
    import numpy as np

    cos = np.sum(reference * candidate, axis=1)
    return {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6)}


def topk_overlap(reference: np.ndarray, candidate: np.ndarray, queries: np.ndarray, k: int = OVERLAP_K) -> float:
    """Mean fraction of each query's top-k images (by `reference`) that `candidate` also ranks top-k."""
    import numpy as np

    k = min(k, len(reference))
    if k == 0 or len(queries) == 0:
        return 1.0
    ref_top = np.argsort(-(queries @ reference.T), axis=1, kind="stable")[:, :k]
    cand_top = np.argsort(-(queries @ candidate.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top.tolist(), cand_top.tolist())]))


def judge(reference: np.ndarray, candidate: np.ndarray, queries: np.ndarray | None,
          use_overlap: bool = True) -> dict:
    """Agreement figures of `candidate` image embeddings with fp32's, and whether they pass."""
    figures = cosine_agreement(reference, candidate)
    ok = figures["cosine_mean"] >= MIN_COSINE
    if queries is not None and len(queries):
        figures["top10_overlap"] = round(topk_overlap(reference, candidate, queries), 4)
        if use_overlap:
            ok = ok and figures["top10_overlap"] >= MIN_OVERLAP
    figures["ok"] = bool(ok)
    return figures


def agreement_with_fp32(encoder: Measurable, precision: str, images: Sequence, queries: Sequence[str],
                        batch_size: int = 32) -> dict:
    """Encode `images` (PIL) at fp32 and at `precision` and judge them on the `queries`' top-10.

    For tests and the benchmark: use an aligned model (the tiny or CIFAR test
    model) and real or drawn pictures, or the overlap says little.
    """
    import numpy as np

    pixels = encoder.preprocess_images(images)
    models = {"fp32": encoder.model, precision: candidate_model(encoder, precision)}
    out = {}
    for mode, model in models.items():
        out[mode] = np.concatenate([encoder.encode_pixels_with(model, pixels[i:i + batch_size])
                                    for i in range(0, len(pixels), batch_size)])
    text = encoder.encode_texts(list(queries)) if queries else None
    return judge(out["fp32"], out[precision], text)


# -- measuring and choosing --------------------------------------------------------------


def candidates(device_type: str = "cpu") -> list[str]:
    """The CPU modes worth timing here: fp32, bf16 where the CPU has it natively, int8, and
    ONNX Runtime's fp32 and int8 where onnxruntime is installed. A GPU keeps torch fp16."""
    if device_type != "cpu":
        return []
    onnx = ["onnx-fp32", "onnx-int8"] if onnxruntime_version() else []
    return ["fp32", *(["bf16"] if config.cpu_has_native_bf16() else []), "int8", *onnx]


def candidate_model(encoder: Measurable, mode: str) -> Any:
    """The image model that runs `mode`: a torch copy (bf16, int8) or an ONNX Runtime tower."""
    if mode in ONNX_MODES:
        return onnx_image_model(encoder, mode)
    return image_model_at(encoder.model, mode)


def probe_pictures(size: int, count: int, seed: int = 20261124) -> tuple[list, list[str]]:
    """Drawn pictures at the model's input size, and text queries about them."""
    from retrieval.media import synthetic

    rng = random.Random(seed)
    labels = [synthetic.LABELS[i % len(synthetic.LABELS)] for i in range(count)]
    images = [synthetic.draw(label, size, rng) for label in labels]
    queries = [template.format(label) for template in PROBE_TEMPLATES for label in synthetic.LABELS]
    return images, queries


def measure(encoder: Measurable, modes: Sequence[str] | None = None, batch_size: int = BATCH_SIZE,
            batches: int = BATCHES, extra_models: dict | None = None) -> dict:
    """Time each mode on the same drawn batches (interleaved) and judge it against fp32.

    `extra_models` maps a mode name to a ready image model (tests inject a broken one).
    Returns a cache entry without its key: rates (img/s, fastest batch), agreement, errors.
    Timed with the torch threads indexing would use now (`config.encoder_threads`): on a
    busy machine a 2-thread forward pass stalls at every barrier and times mostly noise.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(config.encoder_threads())
    try:
        return _measure(encoder, modes, batch_size, batches, extra_models)
    finally:
        torch.set_num_threads(previous)


def _measure(encoder: Measurable, modes: Sequence[str] | None, batch_size: int, batches: int,
             extra_models: dict | None) -> dict:
    import numpy as np
    import torch

    started = time.perf_counter()
    modes = list(modes or candidates(encoder.device.type))
    images, queries = probe_pictures(encoder.image_size, batch_size * batches)
    pixels = encoder.preprocess_images(images).split(batch_size)
    models: dict[str, Any] = {"fp32": encoder.model}
    errors: dict[str, str] = {}
    for mode in modes:
        if mode == "fp32":
            continue
        try:
            models[mode] = candidate_model(encoder, mode)
        except Exception as exc:  # e.g. no quantised engine on this CPU: auto falls back
            errors[mode] = f"{type(exc).__name__}: {exc}"[:200]
    models.update(extra_models or {})
    seconds: dict[str, list[float]] = {mode: [] for mode in models}
    vectors: dict[str, list] = {mode: [] for mode in models}
    order = list(models)
    deadline = time.perf_counter() + TIME_BUDGET
    for r in range(MAX_ROUNDS):
        # Every batch once (their vectors are judged), then repeats while time allows: the
        # fastest batch counts, so a busy machine or a first-call warm-up weighs less.
        if r >= len(pixels) and (time.perf_counter() > deadline
                                 or batch_size / min(seconds["fp32"], default=1e9) >= FAST_ENOUGH):
            break
        batch = pixels[r % len(pixels)]
        for mode in order[r % len(order):] + order[:r % len(order)]:  # rotate: no mode always first
            if mode in errors:
                continue
            try:
                t0 = time.perf_counter()
                out = encoder.encode_pixels_with(models[mode], batch)
                seconds[mode].append(time.perf_counter() - t0)
            except Exception as exc:
                errors[mode] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            if r < len(pixels):
                vectors[mode].append(out)
    rates, agreement = {}, {}
    reference = np.concatenate(vectors["fp32"])
    text = encoder.encode_texts(queries)
    for mode in models:
        if mode in errors or len(vectors[mode]) != len(pixels):
            continue
        rates[mode] = round(batch_size / min(seconds[mode]), 2)
        if mode != "fp32":
            agreement[mode] = judge(reference, np.concatenate(vectors[mode]), text)
    entry = {
        "rates": rates,
        "agreement": agreement,
        "errors": {m: e for m, e in errors.items() if m not in rates},
        "batch_size": batch_size,
        "images": batch_size * batches,
        "timed_batches": len(seconds["fp32"]),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 2),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    entry["chosen"], entry["why"] = pick(rates, agreement)
    return entry


def pick(rates: dict[str, float], agreement: dict[str, dict], min_speedup: float = MIN_SPEEDUP) -> tuple[str, str]:
    """(mode, why): the fastest mode that agrees with fp32, if it beats fp32 by `min_speedup`.

    Modes within NEAR_TIE of the fastest are a tie; the one closer to fp32 (cosine) wins.

    A model that encodes faster in fp32 than files can be decoded (`FAST_ENOUGH`)
    stays fp32: a lower precision could not speed indexing up, only blur it.
    """
    base = rates.get("fp32", 0.0)
    if base >= FAST_ENOUGH:
        return "fp32", f"fp32 already encodes {base:.0f} img/s, faster than decoding"
    agreeing = {m: r for m, r in rates.items() if m != "fp32" and agreement.get(m, {}).get("ok")}
    rejected = sorted(m for m in agreement if m in rates and m not in agreeing)
    note = f" ({', '.join(rejected)} disagreed with fp32)" if rejected else ""
    if not agreeing:
        return "fp32", "no other mode agrees with fp32" + note if rejected else "no other mode to try"
    fastest = max(agreeing.values())
    # Rates within NEAR_TIE of the fastest are a tie on a timing this short: the closer to fp32 wins.
    close = [m for m, r in agreeing.items() if r >= fastest * (1 - NEAR_TIE)]
    best = max(close, key=lambda m: (agreement[m].get("cosine_mean", 0.0), agreeing[m]))
    speedup = agreeing[best] / base if base else float("inf")
    if speedup >= min_speedup:
        return best, f"{best} is {speedup:.2f}x fp32 and agrees with it" + note
    return "fp32", f"the fastest agreeing mode ({best}) is only {speedup:.2f}x fp32" + note


# -- the encoder's hook ------------------------------------------------------------------


def choose(encoder: Measurable, refresh: bool = False) -> dict:
    """The cached or freshly measured entry for this encoder's model on this machine."""
    key = machine_key(encoder.fingerprint)
    entry = None if refresh else cached_entry(key)
    source = "cached"
    if entry is None or entry["chosen"] not in candidates(encoder.device.type):
        log.info("measuring CPU precision modes for %s (once per model and machine)", encoder.spec.label)
        entry = store_entry(key, measure(encoder))
        source = "measured"
    return {**entry, "source": source}


def will_measure(encoder: Measurable, requested: str) -> bool:
    """Whether `settle(encoder, requested)` would time the modes now (not answer from the cache).

    Measuring needs the whole fp32 model (text queries judge the top-10 overlap), so a caller
    about to free part of it settles first when this says so."""
    if encoder.device.type != "cpu" or requested not in ("auto", "bf16", "int8", *ONNX_MODES):
        return False
    entry = cached_entry(machine_key(encoder.fingerprint))
    if entry is None or entry["chosen"] not in candidates(encoder.device.type):
        return True
    return requested != "auto" and requested not in entry.get("agreement", {}) \
        and requested not in entry.get("errors", {})


def settle(encoder: Measurable, requested: str) -> dict:
    """Called by Encoder on a CPU: make `auto` concrete, check a forced mode; returns the report."""
    report: dict[str, Any] = {"requested": requested}
    if requested == "auto":
        entry = choose(encoder)
        if entry["chosen"] != encoder.precision:
            encoder.set_precision(entry["chosen"], check=False)
    elif requested in ("bf16", "int8", *ONNX_MODES):
        entry = choose(encoder)
        if requested not in entry.get("agreement", {}) and requested not in entry.get("errors", {}):
            entry = choose(encoder, refresh=True)  # cached before this mode was a candidate
        figures = entry.get("agreement", {}).get(requested)
        if figures is not None and not figures.get("ok"):
            log.warning("--precision %s disagrees with fp32 for %s on this machine (%s); "
                        "its vectors may rank images differently. Use --precision auto or fp32.",
                        requested, encoder.spec.label, describe_agreement(figures))
    else:  # fp32: the reference itself, nothing to check
        entry = cached_entry(machine_key(encoder.fingerprint)) or {}
        entry = {**entry, "source": "cached"} if entry else {"source": "not measured"}
    report.update(entry)
    report["precision"] = encoder.precision
    return report


def describe_agreement(figures: dict) -> str:
    parts = [f"cosine to fp32 {figures['cosine_mean']:.4f} (min {figures['cosine_min']:.4f}, "
             f"needs >= {MIN_COSINE})"]
    if "top10_overlap" in figures:
        parts.append(f"top-10 overlap {figures['top10_overlap']:.2f} (needs >= {MIN_OVERLAP})")
    return ", ".join(parts)


def describe(report: dict | None) -> str:
    """One line for --verbose and status: the mode, why, and the measured rates/agreement."""
    if not report:
        return "precision: not measured (GPU or fp32 forced)"
    precision = report.get("precision") or report.get("chosen")
    head = f"precision: {precision}"
    if report.get("requested") == "auto":
        head += f" (auto, {report.get('source', 'cached')})"
    elif report.get("requested"):
        head += f" (forced; auto would choose {report['chosen']})" if report.get("chosen") else " (forced)"
    rates = report.get("rates") or {}
    if rates:
        head += "; img/s " + ", ".join(f"{m} {r:g}" for m, r in rates.items())
    for mode, figures in (report.get("agreement") or {}).items():
        verdict = "agrees" if figures.get("ok") else "DISAGREES"
        overlap = f", top-10 {figures['top10_overlap']:.2f}" if "top10_overlap" in figures else ""
        head += f"; {mode} {verdict} (cos {figures['cosine_mean']:.4f}{overlap})"
    key = report.get("key")
    if key:
        head += (f"; measured {str(report.get('measured_at', ''))[:10]} on {key['cpu']} x{key['cores']}, "
                 f"torch {key['torch']}, onnxruntime {key.get('onnxruntime') or 'absent'}")
    return head


def status_line(auto: dict | None) -> str:
    """One line about `precision_cache.cached_choice` for `clipfind status`."""
    if not auto:
        return "auto not measured on this machine yet (the first encoding measures it, a few seconds)"
    key = auto.get("key") or {}
    rates = ", ".join(f"{m} {r:g}" for m, r in (auto.get("rates") or {}).items())
    agree = ", ".join(f"{m} cos {f['cosine_mean']:.4f}" + ("" if f.get("ok") else " DISAGREES")
                      for m, f in (auto.get("agreement") or {}).items())
    return (f"auto here = {auto['chosen']} ({rates} img/s; {agree}; measured "
            f"{str(auto.get('measured_at', ''))[:10]} on {key.get('cpu')} x{key.get('cores')}, "
            f"torch {key.get('torch')})")
