"""Every environment variable, default path and core count clipfind reads, in one place.

Why one place: the same rules (where a library lives, where caches go, how many
cores this process may use) were written out in several modules, and a copy
that drifts is a bug nobody sees. Stdlib only, so the lightest module can ask.

Environment variables (all optional):

    CLIPFIND_HOME       the default library directory
    CLIPFIND_LIBRARY    --library for every command (read by click)
    CLIPFIND_DB         --db for every command: a PostgreSQL URL holding the library's metadata
    CLIPFIND_CACHE      cache root: test models, the demo, precision choices (~/.cache/clipfind)
    CLIPFIND_MODEL_DIR  the model `clipfind demo` uses instead of looking for one
    CLIPFIND_LLM_MODEL  --model of `clipfind prompts generate` (read by click)
    CLIPFIND_DATA       tests and benchmarks: the folder holding cifar10/
    CLIPFIND_CIFAR_MODEL_DIR  tests: an already-trained CIFAR-10 test model
    CLIPFIND_REQUIRE_BROWSER  tests: 1 makes a missing Chromium a failure, not a skip
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ENV_HOME = "CLIPFIND_HOME"
ENV_LIBRARY = "CLIPFIND_LIBRARY"
ENV_CACHE = "CLIPFIND_CACHE"
ENV_MODEL_DIR = "CLIPFIND_MODEL_DIR"
ENV_LLM_MODEL = "CLIPFIND_LLM_MODEL"
ENV_DATA = "CLIPFIND_DATA"
ENV_DB = "CLIPFIND_DB"

_db_override: str | None = None  # --db of the command being run (set by the CLI, then cleared)


# -- paths ---------------------------------------------------------------------------------
def library_home() -> Path:
    """$CLIPFIND_HOME, else $XDG_DATA_HOME/clipfind, else ~/.local/share/clipfind."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(data_home).expanduser() / "clipfind"


def library_path(given: str | os.PathLike | None) -> Path:
    """The library directory a command means: the one given (`~` expanded), else `library_home()`."""
    return Path(given).expanduser() if given else library_home()


def use_database(url: str | None) -> None:
    """Make `url` the database for libraries this process opens (the CLI's --db; None clears it)."""
    global _db_override
    _db_override = url or None


def database_url(explicit: str | None = None) -> str | None:
    """The PostgreSQL URL a library should use: the one given, else --db, else $CLIPFIND_DB.

    None means the library folder's own SQLite file (the default)."""
    return explicit or _db_override or os.environ.get(ENV_DB) or None


def cache_root() -> Path:
    """$CLIPFIND_CACHE, else ~/.cache/clipfind: test models, the demo, the precision cache."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clipfind"


def model_dir_override() -> str | None:
    """$CLIPFIND_MODEL_DIR: a model folder the user named for `clipfind demo`, if any."""
    return os.environ.get(ENV_MODEL_DIR) or None


def data_root() -> Path | None:
    """$CLIPFIND_DATA (tests and benchmarks): the folder holding cifar10/, if set."""
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else None


# -- the processor -------------------------------------------------------------------------
def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def encoder_threads() -> int:
    """Torch threads for the encoder in the main process: the cores nobody else is using.

    An intra-op parallel forward pass waits at every barrier for its slowest thread,
    so a thread that shares its core with another busy process stalls all of them:
    measured on 2 cores with the 1-minute load average near 9, ViT-B-32 indexed at
    7 img/s with 1 thread and 5 with 2; on an idle machine 2 threads are the faster.
    """
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


QUERY_THREADS_CAP = 4  # one query's ops are small: past a few threads, hand-offs cost more than they save


def running_elsewhere(samples: int = 3) -> int:
    """Threads other than the caller running or waiting for a core right now (`procs_running`
    of /proc/stat, the fewest of a few reads 1 ms apart), 0 where the kernel does not say.

    Unlike the load average this is not a minute old: a machine that was busy a minute ago
    but is idle now reads 0."""
    import time

    seen = []
    for i in range(samples):
        try:
            with open("/proc/stat", "rb") as fh:
                line = next((ln for ln in fh if ln.startswith(b"procs_running ")), None)
        except OSError:
            return 0
        if line is None:
            return 0
        seen.append(int(line.split()[1]) - 1)  # the caller is running: it counts itself
        if i + 1 < samples:
            time.sleep(0.001)
    return max(0, min(seen))


def query_threads() -> int:
    """ONNX Runtime threads for a one-shot query (`clipfind search` in a fresh process).

    The cores nobody else is running on right now, at least one and at most
    QUERY_THREADS_CAP. A fresh process answers one query and exits, so it cannot time
    settings first. Why not every core always: a thread sharing its core with a busy process
    stalls the others at each barrier; measured on 2 cores at load average 8-10, a text
    query's encode took 0.58 s on one thread and 1.13 s on two (bench/onnx_session.py).
    ONNX Runtime's thread pool does not fight FAISS's OpenMP threads (one for a single
    query vector, `query.search`).
    """
    return max(1, min(usable_cores() - running_elsewhere(), QUERY_THREADS_CAP))


def decode_workers() -> int:
    """Decode workers: one per core beyond the first, at least one, at most eight.

    On 2 cores one worker keeps up with any CLIP encoder (a 1024x768 JPEG
    decodes in ~5 ms in draft mode) and leaves the other core to the encoder.
    """
    return max(1, min(8, usable_cores() - 1))


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU can do bf16 maths natively (it may still be slower)."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model_name() -> str:
    """The processor's model name from /proc/cpuinfo (or what the platform says)."""
    import platform

    for line in _cpuinfo().splitlines():
        field_name, _, value = line.partition(":")
        if field_name.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"
