"""The per-machine cache of precision choices: `<cache root>/precision.json`.

Why its own module: `clipfind status` shows the cached choice for a library's
model, and must not import numpy or torch to do it. An entry is keyed by the
weights fingerprint, the CPU model, the usable cores and the torch version, so
another processor or torch measures again; the file is rewritten atomically
(temp file + rename) under a lock, and a read-only home only costs a re-measure.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from retrieval import config

log = logging.getLogger("clipfind.precision")

CACHE_FILE = "precision.json"
CACHE_VERSION = 3  # bumped when the way of measuring changes: old choices are re-measured
MAX_CACHE_ENTRIES = 200


def cache_path() -> Path:
    return config.cache_root() / CACHE_FILE


@functools.cache
def torch_version() -> str:
    """The installed torch's full version (build tag included, e.g. 2.14.1+cu130), without importing it."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    with contextlib.suppress(Exception):
        spec = importlib.util.find_spec("torch")
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if found:
            return found.group(1)
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - torch from source
        import torch

        return torch.__version__


@functools.cache
def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, without importing it (None when absent)."""
    for name in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


def machine_key(fingerprint: str) -> dict:
    """What a measurement is valid for: these weights, on this CPU and core count, with these
    torch and onnxruntime versions (either one's upgrade measures again)."""
    return {"fingerprint": fingerprint, "cpu": config.cpu_model_name(), "cores": config.usable_cores(),
            "torch": torch_version(), "onnxruntime": onnxruntime_version()}


def key_id(key: dict) -> str:
    return "|".join(str(key.get(f)) for f in ("fingerprint", "cpu", "cores", "torch", "onnxruntime"))


def _read_cache(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"version": CACHE_VERSION, "entries": {}}
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION or not isinstance(doc.get("entries"), dict):
        return {"version": CACHE_VERSION, "entries": {}}
    return doc


def cached_entry(key: dict) -> dict | None:
    """The cached measurement for exactly this key (another CPU or torch counts as none)."""
    entry = _read_cache(cache_path())["entries"].get(key_id(key))
    if not isinstance(entry, dict) or entry.get("key") != key or "chosen" not in entry:
        return None
    return entry


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def store_entry(key: dict, entry: dict) -> dict:
    """Add or replace the entry for `key`, atomically (temp file + rename, under a lock)."""
    path = cache_path()
    entry = {**entry, "key": key}
    try:
        with _cache_lock(path):
            doc = _read_cache(path)
            entries = doc["entries"]
            entries[key_id(key)] = entry
            while len(entries) > MAX_CACHE_ENTRIES:  # oldest measurements go first
                entries.pop(min(entries, key=lambda k: str(entries[k].get("measured_at", ""))))
            fd, tmp = tempfile.mkstemp(prefix=".precision-", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(doc, fh, indent=1, sort_keys=True)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as exc:  # a read-only home must not stop indexing: measure again next time
        log.warning("could not save the precision choice to %s: %s", path, exc)
    return entry


def cached_choice(fingerprint: str) -> dict | None:
    """For `clipfind status`: the cached auto choice for these weights on this machine, if any."""
    entry = cached_entry(machine_key(fingerprint))
    if not entry:
        return None
    return {k: entry.get(k) for k in ("chosen", "why", "rates", "agreement", "measured_at", "key")}
