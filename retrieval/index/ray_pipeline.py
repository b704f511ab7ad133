"""Decode + encode as a Ray Data pipeline: file paths in, blocks of vectors out, in any order.

Why Ray Data: a collection too big for one machine's encoder needs many encoders,
and Ray Data already streams blocks between CPU tasks and GPU actors with
back-pressure, retries failed tasks and restarts dead actors. The pipeline is
blocks of paths -> `map_batches(decode_files)` (CPU tasks: the same
`media.decode.decode_file` the single-process indexer runs, with the model's
transform or its bit-identical Pillow+numpy copy, so pixels are identical and a
decode worker need not import torch) -> `map_batches(ImageEncoder)` (an actor
pool; each actor loads the model once, one GPU per actor where there are GPUs;
it imports open_clip without transformers/timm when the model needs neither).
Each output block carries its rows' keys (indexes into the plan), vectors or
failure kinds, and the fingerprint and precision of the weights that made them;
the driver writes each block as it arrives (`retrieval.index.ray_engine`).

Ray is imported only in here, and only by the functions that need it, so
`clipfind --help` and a plain `index` never pay for it (tests/test_light_imports.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from retrieval import config
from retrieval.errors import EngineError, UsageError
from retrieval.media.decode import Decoded, Failed, decode_file
from retrieval.media.images import DEFAULT_MAX_PIXELS
from retrieval.model.preprocess import PreprocessConfig, config_of_transform
from retrieval.model.preprocess import preprocess as preprocess_pixels

INSTALL_HINT = "Ray is not installed: pip install 'clipfind[ray]'"
DECODE_MEMORY = 256 * 2**20  # bytes a decode task reserves (logical, for Ray's scheduler)
CONNECT_TIMEOUT = 3.0  # seconds: a head node that does not answer a TCP connect in 3 s is down


@dataclass
class RayOptions:
    """How to run on Ray. Defaults fit one machine: a local cluster, one encoder actor per GPU
    (one in all on a CPU-only cluster), decode tasks on the CPUs the actors leave."""

    address: str | None = None  # None: start a local cluster; else host:port, ray://host:port, auto
    actors: int | None = None  # encoder actors (None: one per GPU, else 1)
    actor_cpus: float | None = None  # CPUs reserved per actor (None: 1 with a GPU, else shared, see plan)
    decode_cpus: float | None = None  # CPUs per decode task (None: see plan)
    threads: int | None = None  # torch threads per CPU actor (None: measured, see ImageEncoder)


# -- connecting --------------------------------------------------------------------------
def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def check_address(address: str | None) -> None:
    """Fail in one line, before anything is written, when Ray is missing or the address is dead.

    `ray.init` against a head that does not answer retries for a minute or more; a plain TCP
    connect to its port tells the same in seconds. `auto` is left to Ray to resolve.
    """
    if not ray_available():
        raise EngineError(INSTALL_HINT)
    if address in (None, "", "auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        raise EngineError(f"the Ray cluster at {address} does not answer "
                          f"({exc.strerror or exc}); start it with `ray start --head`, or leave out "
                          "--ray-address to run a local one") from None


@contextlib.contextmanager
def connected(address: str | None, progress: bool = False) -> Iterator[None]:
    """A Ray session for one job: joins `address`, or starts a local cluster on this machine's cores.

    A session this process already has (a test's or a notebook's `ray.init`) is used as it is
    and left running.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network here, and no phoning home
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # its C++ warnings are not one line
    check_address(address)
    import ray

    if ray.is_initialized():
        _quiet_data(progress)
        yield
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    if not address or address == "local":
        kwargs["num_cpus"] = config.usable_cores()
    else:
        kwargs["address"] = address
    try:
        with _stderr_silenced():
            ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        cause = exc.__cause__ or exc  # e.g. an AuthenticationError behind "Failed to connect"
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise EngineError(f"cannot join the Ray cluster at {address or 'this machine'}: {first[:300]}") from None
    try:
        _quiet_data(progress)
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Ray's C++ core announces its log level on file descriptor 2 as it starts, whatever Python's
    logging says; that line is not ours to print. Only the start is silenced: our errors come after."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet_data(progress: bool) -> None:
    """Ray Data prints plans and progress bars on stderr; clipfind keeps stderr to its own lines."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    with contextlib.suppress(AttributeError):
        ctx.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- the plan of resources ---------------------------------------------------------------
@dataclass
class Layout:
    """What the pipeline asks Ray for, decided from the cluster's resources."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float
    threads: int  # 0: each CPU actor times its own batches (index/threads.py), up to max_threads
    max_threads: int
    device: str
    batch_size: int


def plan_layout(options: RayOptions, device: str, batch_size: int | None, items: int | None = None) -> Layout:
    """GPUs: one actor per GPU, each with one CPU. CPUs only: the actors and decoding share the
    cores, so the actors together reserve all but one decode task's share (on 2 cores, one actor
    gets 1 CPU and decoding 1; two actors get 0.75 each and decoding 0.5).

    Never more actors than `items` makes encoder batches: an actor with no block to take still
    loads the model, and Ray Data warns that the pool cannot be filled."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if device.startswith("cuda") and not gpus:
        raise EngineError(f"--device {device} asked for, but the Ray cluster has no GPUs")
    if gpus and (device == "auto" or device.startswith("cuda")):
        batch_size = batch_size or 256
        actors = _at_most_one_per_batch(options.actors or max(1, gpus), items, batch_size)
        return Layout(actors, options.actor_cpus or 1.0, 1.0, options.decode_cpus or 1.0,
                      options.threads or 1, 1, "cuda", batch_size)
    batch_size = batch_size or 32
    actors = _at_most_one_per_batch(options.actors or 1, items, batch_size)
    decode = options.decode_cpus or (1.0 if actors == 1 else 0.5)
    actor_cpus = options.actor_cpus or max(0.25, (cpus - decode) / actors)
    # Reservations are Ray's bookkeeping; threads are what runs. Like the single-process
    # indexer, an actor may use the cores decoding leaves idle: it times 1..max_threads.
    max_threads = max(1, round(cpus / actors))
    return Layout(actors, actor_cpus, 0.0, decode, options.threads or 0, max_threads, "cpu", batch_size)


def _at_most_one_per_batch(actors: int, items: int | None, batch_size: int) -> int:
    return actors if items is None else max(1, min(actors, -(-items // batch_size)))


# -- the stages --------------------------------------------------------------------------
def decode_files(batch: dict[str, np.ndarray], preprocess: PreprocessConfig | Callable, image_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """A CPU task: decode and preprocess each file exactly as the single-process indexer does.

    `preprocess` is the encoder's transform, or the `PreprocessConfig` whose Pillow+numpy copy
    gives the same pixels bit for bit (`pixel_transform`): then this worker never imports torch.
    """
    if isinstance(preprocess, PreprocessConfig):
        transform: Callable = functools.partial(preprocess_pixels, cfg=preprocess)
    else:
        import torch

        torch.set_num_threads(1)  # Pillow work; the encoder actors want the cores
        transform = preprocess
    paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
    items = [decode_file(path, i, transform, (image_size, image_size), max_pixels) for i, path in enumerate(paths)]
    shape = next((tuple(it.pixels.shape) for it in items if isinstance(it, Decoded)), (3, image_size, image_size))
    pixels = np.zeros((len(items), *shape), np.float32)
    for i, item in enumerate(items):
        if isinstance(item, Decoded):
            pixels[i] = np.asarray(item.pixels)
    good = [isinstance(it, Decoded) for it in items]
    return {
        "key": np.asarray(batch["key"], np.int64),
        "ok": np.asarray(good, bool),
        "pixels": pixels,
        "width": np.asarray([it.width if g else -1 for it, g in zip(items, good)], np.int64),
        "height": np.asarray([it.height if g else -1 for it, g in zip(items, good)], np.int64),
        "format": np.asarray([(it.format or "") if g else "" for it, g in zip(items, good)], object),
        "taken_at": np.asarray([it.taken_at.isoformat() if g and it.taken_at else "" for it, g in
                                zip(items, good)], object),
        "kind": np.asarray(["" if g else it.kind for it, g in zip(items, good)], object),
        # bytes: a message may quote a file name that is not valid UTF-8
        "message": np.asarray([b"" if g else os.fsencode(it.message) for it, g in zip(items, good)], object),
    }


class ImageEncoder:
    """An actor of the pool: loads the model once, then turns decoded blocks into unit vectors."""

    def __init__(self, spec_json: str, device: str, precision: str, threads: int, max_threads: int = 1,
                 embed_dim: int | None = None) -> None:
        import torch

        from retrieval.index.threads import ThreadTuner
        from retrieval.model.encoder import Encoder
        from retrieval.model.lean_import import import_open_clip
        from retrieval.model.spec import ModelSpec

        spec = ModelSpec.from_json(spec_json)
        import_open_clip(spec)  # without transformers/timm when this model needs neither
        self.tuner = ThreadTuner(max_threads) if device == "cpu" and not threads else None
        if device == "cpu":
            torch.set_num_threads(threads or max_threads)
        # the dimension is the driver's (its own model, whose fingerprint each block is checked
        # against), so the actor skips probing it: less work before the first block; it encodes
        # images only, so it builds only the image tower where it can (retrieval.model.towers)
        self.encoder = Encoder(spec, device=device, precision=precision,
                               embed_dim=embed_dim, images_only=True)
        self.info = (self.encoder.fingerprint, self.encoder.precision, str(self.encoder.device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        import torch

        ok = np.asarray(batch["ok"], bool)
        n = len(ok)
        vectors = np.zeros((n, self.encoder.embed_dim), np.float32)
        if ok.any():
            if self.tuner is not None:
                torch.set_num_threads(self.tuner.next_threads())
            started = time.perf_counter()
            vectors[ok] = self.encoder.encode_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
            if self.tuner is not None:
                self.tuner.record(torch.get_num_threads(), int(ok.sum()), time.perf_counter() - started)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        for name, value in zip(("fingerprint", "precision", "device"), self.info):
            out[name] = np.asarray([value] * n, object)
        return out


def embed(paths: Sequence[str], spec_json: str, preprocess: Callable, image_size: int,
          layout: Layout, precision: str, max_pixels: int = DEFAULT_MAX_PIXELS,
          embed_dim: int | None = None) -> Iterator[dict]:
    """Blocks of encoded rows (numpy columns) as the cluster finishes them; call inside `connected`.

    One input block per encoder batch, so a block is what one transaction commits and what a
    killed driver can lose.
    """
    import pyarrow as pa
    import ray.data

    preprocess = pixel_transform(preprocess)
    # Blocks of exactly one batch (the last one shorter): `from_items` splits evenly, and
    # blocks of 29 rows for batches of 32 made every task take two blocks as 32 + 26 rows.
    size = layout.batch_size
    ds = ray.data.from_arrow([pa.table({"key": pa.array(range(start, min(start + size, len(paths))), pa.int64()),
                                        "path": pa.array([os.fsencode(p) for p in paths[start:start + size]],
                                                         pa.binary())})
                              for start in range(0, len(paths), size)])
    ds = ds.map_batches(decode_files, batch_size=layout.batch_size, batch_format="numpy",
                        num_cpus=layout.decode_cpus,
                        # a batch of decoded images; asking for memory (the actors do not) also keeps
                        # Ray Data from fusing decoding into the actors, where it would run in turn
                        # with encoding instead of beside it
                        memory=DECODE_MEMORY,
                        fn_kwargs={"preprocess": preprocess, "image_size": image_size, "max_pixels": max_pixels})
    ds = ds.map_batches(ImageEncoder, batch_size=layout.batch_size, batch_format="numpy",
                        concurrency=layout.actors, num_cpus=layout.actor_cpus, num_gpus=layout.actor_gpus,
                        fn_constructor_kwargs={"spec_json": spec_json, "device": layout.device,
                                               "precision": precision, "threads": layout.threads,
                                               "max_threads": layout.max_threads, "embed_dim": embed_dim})
    # no prefetching: Ray Data hands over a prefetched block only once the one after it exists,
    # so each block would wait for the next batch to be encoded before it could be committed
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)


def pixel_transform(transform: Callable) -> PreprocessConfig | Callable:
    """What decode tasks run: the torch-free copy of `transform` when it gives the same pixels
    bit for bit (open_clip's usual eval transforms), else `transform` itself."""
    return config_of_transform(transform) or transform


def split_block(block: dict) -> tuple[list[Decoded], np.ndarray, list[Failed]]:
    """(decoded items without pixels, their vectors in the same order, failures) of one block."""
    decoded, failed, rows = [], [], []
    for i, key in enumerate(block["key"].tolist()):
        if block["ok"][i]:
            taken = block["taken_at"][i]
            decoded.append(Decoded(key, None, int(block["width"][i]), int(block["height"][i]),  # type: ignore[arg-type]
                                   block["format"][i] or None,
                                   datetime.fromisoformat(taken) if taken else None))
            rows.append(i)
        else:
            failed.append(Failed(key, str(block["kind"][i]), os.fsdecode(bytes(block["message"][i]))))
    return decoded, np.asarray(block["vector"])[rows], failed
