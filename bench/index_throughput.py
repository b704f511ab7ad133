"""Indexing throughput: does the pipeline overlap decoding and encoding, or add them?

    .venv/bin/python bench/index_throughput.py                 # 2,000 photos, ViT-B-32 random weights
    .venv/bin/python bench/index_throughput.py --count 300 --json
    .venv/bin/python bench/index_throughput.py --model-dir DIR --workers 2
    .venv/bin/python bench/index_throughput.py --runtimes          # + runtime axis, default vs best explicit
    .venv/bin/python bench/index_throughput.py --runtimes --quick  # the same, small (a smoke run)
    .venv/bin/python bench/index_throughput.py --memory --quick    # memory of a run per precision

Measures, on the same model, workers and batch size:
  (a) decode + preprocess alone, through the indexer's own DataLoader;
  (b) the encoder's forward pass alone, on preprocessed tensors;
  (c) a whole `clipfind index` run through the library API (scan, hash, DataLoader,
      encoder, one SQLite transaction per batch, FAISS build and atomic save),
      including the model load, and (c)/min(a, b): 1.0 is perfect overlap;
  then a re-index of the unchanged collection (time and ratio to (c)).
With --runtimes: the encoder alone on torch and ONNX Runtime at fp32 and int8, and the
"default flags vs best explicit flags" row: the default run (threads, workers and
precision all measured by clipfind) against every explicit --threads x --workers
setting, each a first run into its own library, after one warm-up run that fills
the per-machine caches (precision choice, ONNX exports) so no run pays for them.
With --memory: one first run per precision (torch fp32, bf16 where the CPU has it, int8;
ONNX Runtime fp32 and int8), each into its own library, with the memory columns.
Each phase runs in its own process, sampled from outside (bench/memory.py): "main MB"
is its peak RSS, "workers MB" the largest sum of its children's unique memory (a
forked decode worker's RSS counts the model pages it shares with the main process, its
unique memory does not), "sum MB" both: issue 17's target is <= 1200 MB. Photos (1024x768 JPEG, quality 90, drawn:
gradients, noise, shapes) are generated once into --cache-dir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
from bench.memory import run_sampled  # noqa: E402
from bench.subset import symlinked_subset  # noqa: E402
from retrieval import config  # noqa: E402

DEFAULT_CACHE = config.cache_root() / "bench" / "photos"


# -- photos ---------------------------------------------------------------------------------
def draw_photo(args: tuple[Path, int]) -> None:
    """A 1024x768 picture with a photo's statistics: smooth light, texture, objects, grain."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = 1024, 768
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    corners = rng.uniform(0, 255, size=(3, 3))
    img = corners[0] + (corners[1] - corners[0]) * (x / w)[..., None] + (corners[2] - corners[0]) * (y / h)[..., None]
    low = Image.fromarray(rng.uniform(-40, 40, size=(6, 8, 3)).astype(np.float32).mean(axis=2))
    img += np.asarray(low.resize((w, h), Image.BICUBIC))[..., None]
    picture = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    overlay = Image.new("RGBA", (w, h))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(6, 16))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(90, 255)),)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 260)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=colour)
        else:
            pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.sort(rng.uniform(0, 6.28, 5))]
            draw.polygon(pts, fill=colour)
    picture = Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB")
    picture = picture.filter(ImageFilter.BoxBlur(float(rng.uniform(0.5, 2.0))))
    grain = rng.integers(-10, 11, size=(h, w, 3), dtype=np.int16)
    out = np.clip(np.asarray(picture, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(out).save(tmp, "JPEG", quality=90)
    os.replace(tmp, path)


def ensure_photos(cache: Path, count: int) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    todo = [(cache / f"photo_{i:05d}.jpg", i) for i in range(count) if not (cache / f"photo_{i:05d}.jpg").exists()]
    if todo:
        print(f"drawing {len(todo)} photos into {cache} (once) ...", file=sys.stderr)
        with Pool(os.cpu_count()) as pool:
            pool.map(draw_photo, todo, chunksize=16)
    return cache


# -- phases (each in its own process) -------------------------------------------------------
def _spec(args):
    from retrieval.model.spec import ModelSpec

    if args.model_dir:
        return ModelSpec(model_dir=args.model_dir)
    if args.pretrained:
        return ModelSpec(model=args.model, pretrained=args.pretrained)
    return ModelSpec(model=args.model, random_weights=True)


def _loader(args, encoder, paths):
    from retrieval.media.pipeline import default_batch_size, make_loader

    workers = config.decode_workers() if args.workers is None else args.workers
    return make_loader(paths, encoder.preprocess, encoder.image_size,
                       batch_size=args.batch_size or default_batch_size(encoder.device),
                       workers=workers, pin_memory=encoder.device.type == "cuda")


def phase_decode(args, folder: Path) -> dict:
    from retrieval.model.encoder import Encoder

    encoder = Encoder(_spec(args), device=args.device, precision=args.precision)
    paths = sorted(str(p) for p in folder.iterdir())
    start = time.perf_counter()
    n = sum(len(batch.decoded) for batch in _loader(args, encoder, paths))
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "per_s": n / seconds}


def phase_encode(args, folder: Path) -> dict:
    import torch

    from retrieval.model.encoder import Encoder

    encoder = Encoder(_spec(args), device=args.device, precision=args.precision)
    if encoder.device.type == "cpu":  # the indexer's own choice, so (b) and (c) compare
        torch.set_num_threads(args.threads or config.encoder_threads())
    paths = sorted(str(p) for p in folder.iterdir())
    batch = next(iter(_loader(args, encoder, paths[: args.batch_size or 32])))
    pixels = batch.pixels
    if encoder.device.type == "cuda":
        pixels = pixels.pin_memory()
    encoder.encode_pixels(pixels)  # warm-up
    n = min(args.encode_images, len(paths))
    start = time.perf_counter()
    done = 0
    while done < n:
        encoder.encode_pixels(pixels)
        done += len(pixels)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images": done, "seconds": seconds, "per_s": done / seconds, "precision": encoder.precision,
            "threads": torch.get_num_threads(),
            "device": str(encoder.device), "model": encoder.spec.label}


def phase_runtimes(args, folder: Path) -> dict:
    """The encoder alone on each runtime x precision, same batch, same threads, interleaved;
    agreement (mean cosine) with torch fp32 on that batch."""
    import numpy as np
    import torch

    from retrieval.model.encoder import Encoder
    from retrieval.model.onnx_export import export_towers
    from retrieval.model.onnx_session import OnnxEncoder
    from retrieval.model.runtime import image_model_at

    encoder = Encoder(_spec(args), device="cpu", precision="fp32")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    paths = sorted(str(p) for p in folder.iterdir())
    pixels = next(iter(_loader(args, encoder, paths[: args.batch_size or 32]))).pixels
    runners = {"torch fp32": lambda x: encoder.encode_pixels_with(encoder.model, x)}
    int8 = image_model_at(encoder.model, "int8")
    runners["torch int8"] = lambda x: encoder.encode_pixels_with(int8, x)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        export_started = time.perf_counter()
        for precision in ("fp32", "int8"):
            export_towers(encoder, Path(tmp) / precision, precision)
        export_seconds = time.perf_counter() - export_started
        for precision in ("fp32", "int8"):
            session = OnnxEncoder(Path(tmp) / precision, threads=threads)
            runners[f"onnx {precision}"] = session.encode_pixels
        reference = runners["torch fp32"](pixels)
        seconds: dict[str, float] = {}
        agreement: dict[str, float] = {}
        for name, run in runners.items():  # warm-up, and the agreement on the same batch
            agreement[name] = float(np.sum(reference * run(pixels), axis=1).mean())
        rounds = max(1, args.encode_images // len(pixels))
        for r in range(rounds):
            order = list(runners)[r % len(runners):] + list(runners)[:r % len(runners)]
            for name in order:
                started = time.perf_counter()
                runners[name](pixels)
                elapsed = time.perf_counter() - started
                seconds[name] = min(seconds.get(name, elapsed), elapsed)
    rates = {name: len(pixels) / s for name, s in seconds.items()}
    return {"rates": rates, "cosine_to_torch_fp32": agreement, "threads": threads,
            "export_seconds": export_seconds, "batch": len(pixels), "rounds": rounds}


def phase_index(args, folder: Path) -> dict:
    from retrieval.index.indexer import IndexOptions, export_onnx, index_paths
    from retrieval.model import release
    from retrieval.store.library import Library

    lib_dir = Path(args.library)
    options = IndexOptions(workers=args.workers, batch_size=args.batch_size, threads=args.threads)
    start = time.perf_counter()
    with Library.open(lib_dir) as lib:
        loaded = start
        if lib.model_record is None:  # the first run loads the model: timed apart as well
            # As `clipfind index` loads it into a new library (index_paths, then IndexStages.encode):
            # image tower only, the ONNX export for queries, auto settled (cached).
            release.fix_mmap_threshold()
            encoder = lib.encoder(_spec(args), args.device, args.precision, images_only=True)
            export_onnx(lib, encoder)  # as index_paths does for a new library (a copy when the machine has one)
            encoder.keep_image_tower_only()
            loaded = time.perf_counter()
        result = index_paths(lib, [str(folder)], _spec(args), args.device, args.precision, options)
    seconds = time.perf_counter() - start
    stats = result.stats
    n = stats["indexed"] or stats["unchanged"]
    size = sum(f.stat().st_size for f in lib_dir.iterdir() if f.is_file())
    return {"images": n, "encoded": stats["encoded"], "seconds": seconds, "per_s": n / seconds,
            "model_load_s": loaded - start, "per_s_after_load": n / (seconds - (loaded - start)),
            "skipped": stats["skipped"], "library_bytes": size, "threads": stats.get("threads"),
            "workers": stats.get("workers"), "precision_used": stats.get("precision"),
            "runtime": stats.get("runtime"), "thread_rates": stats.get("thread_rates"),
            "worker_waits": stats.get("worker_waits")}


def _without(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value (either `--flag V` or `--flag=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def run_phase(name: str, argv: list[str]) -> dict:
    """One phase in its own process, its memory sampled from outside (bench/memory.py)."""
    out, memory = run_sampled([sys.executable, str(HERE), "--phase", name, *argv])
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"phase {name} failed ({out.returncode})")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "memory": memory}


def _peak_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_child_rss_mb": round(child, 1)}


# -- driver ---------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=2000, help="photos in the collection (default 2000)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", help="open_clip pretrained tag (default: random weights)")
    p.add_argument("--model-dir", help="an open_clip model folder instead of --model")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: as the indexer, measured)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="encoder threads (default: as the indexer)")
    p.add_argument("--encode-images", type=int, default=320, help="images for (b) (default 320)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--json", action="store_true")
    p.add_argument("--runtimes", action="store_true",
                   help="also time the encoder on torch and ONNX Runtime, fp32 and int8, and index "
                        "with each explicit --threads to compare with the default (measured) choice")
    p.add_argument("--memory", action="store_true",
                   help="also index once per precision (fp32, bf16, int8, onnx-fp32, onnx-int8), "
                        "each into its own library, to compare their memory")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 96 photos, 64 images for (b) (numbers mean little)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--library", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.quick:
        args.count, args.encode_images = min(args.count, 96), min(args.encode_images, 64)
        argv = [*(argv if argv is not None else sys.argv[1:]), "--count", str(args.count),
                "--encode-images", str(args.encode_images)]
    if args.phase:
        folder = symlinked_subset(args.cache_dir, args.count)
        phase = {"decode": phase_decode, "encode": phase_encode, "index": phase_index,
                 "runtimes": phase_runtimes}[args.phase]
        print(json.dumps({**phase(args, folder), **_peak_mb()}))
        return 0
    ensure_photos(args.cache_dir, args.count)
    folder = symlinked_subset(args.cache_dir, args.count)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])
                   if a not in ("--json", "--quick", "--memory", "--runtimes")]
    with tempfile.TemporaryDirectory(prefix="clipfind-bench-") as tmp:
        lib = ["--library", str(Path(tmp) / "lib")]
        if args.runtimes:  # fills the per-machine caches, so the timed first runs all find them
            warm = ["--library", str(Path(tmp) / "lib-warm")]
            run_phase("index", _without(passthrough, "--count") + ["--count", "64"] + warm)
        results = {"a_decode": run_phase("decode", passthrough),
                   "b_encode": run_phase("encode", passthrough),
                   "c_index": run_phase("index", passthrough + lib),
                   "reindex": run_phase("index", passthrough + lib)}
        if args.memory:
            from retrieval.model.autoprecision import candidates

            for mode in candidates("cpu"):
                own = ["--library", str(Path(tmp) / f"lib-{mode}")]
                results[f"memory_{mode}"] = run_phase("index", _without(passthrough, "--precision") + own
                                                      + ["--precision", mode])
        if args.runtimes:
            results["runtimes"] = run_phase("runtimes", passthrough)
            explicit = _without(_without(passthrough, "--threads"), "--workers")
            cores = len(os.sched_getaffinity(0))
            for threads in range(1, cores + 1):
                for workers in range(1, cores + 1):
                    own = ["--library", str(Path(tmp) / f"lib-t{threads}-w{workers}")]
                    results[f"index_threads_{threads}_workers_{workers}"] = run_phase(
                        "index", explicit + own + ["--threads", str(threads), "--workers", str(workers)])
    a, b, c, r = (results[k] for k in ("a_decode", "b_encode", "c_index", "reindex"))
    summary = {"count": args.count, "model": b["model"], "device": b["device"], "precision": b["precision"],
               "workers": c.get("workers") if args.workers is None else args.workers, "batch_size": args.batch_size or "default", "cpus": os.cpu_count(),
               "overlap_ratio": c["per_s"] / min(a["per_s"], b["per_s"]),
               "overlap_ratio_after_load": c["per_s_after_load"] / min(a["per_s"], b["per_s"]),
               "reindex_ratio": r["seconds"] / c["seconds"], **results}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"model: {summary['model']} | device {summary['device']} {summary['precision']} | "
          f"{args.count} photos 1024x768 | workers {summary['workers']} | batch {summary['batch_size']} | "
          f"encoder threads {b['threads']} | {summary['cpus']} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'phase':<44} {'images':>7} {'seconds':>8} {'img/s':>8} {'main MB':>8} {'workers MB':>11} "
          f"{'sum MB':>7}")
    rows = [("(a) decode + preprocess (DataLoader)", a), ("(b) encoder forward only", b),
            ("(c) clipfind index, whole run", c), ("re-index, unchanged collection", r)]
    for label, row in rows:
        print(f"{label:<44} {row['images']:>7} {row['seconds']:>8.2f} {row['per_s']:>8.1f} {_memory(row)}")
    print(f"(c) / min(a, b) = {summary['overlap_ratio']:.2f}   (target >= 0.8); without the "
          f"{c['model_load_s']:.1f} s model load: {summary['overlap_ratio_after_load']:.2f}")
    print(f"re-index / first run = {100 * summary['reindex_ratio']:.2f} %   (target < 2 %)")
    print("memory: main = the phase process's peak RSS (VmHWM); workers = the largest sum of its "
          "children's unique memory (Private_Clean+Private_Dirty, sampled every 50 ms); sum = the "
          "largest main RSS + workers' unique in one sample, at least main (target for (c) with "
          "ViT-B-32: <= 1200 MB)")
    if args.memory:
        print(f"{'first index run, one precision each':<44} {'img/s':>8} {'main MB':>8} {'workers MB':>11} {'sum MB':>7}")
        for name, run in (kv for kv in results.items() if kv[0].startswith("memory_")):
            print(f"  {name[len('memory_'):]:<42} {run['per_s_after_load']:8.1f} {_memory(run)}")
    if args.runtimes:
        print_runtimes(results, c)
    return 0


def _memory(row: dict) -> str:
    m = row["memory"]
    return f"{m['main_peak_mb']:>8.0f} {m['workers_peak_mb']:>11.0f} {m['total_mb']:>7.0f}"


def print_runtimes(results: dict, default_run: dict) -> None:
    """The runtime axis and the default-vs-best-explicit row (same run, so ratios compare)."""
    rt = results["runtimes"]
    base = rt["rates"]["torch fp32"]
    print(f"encoder alone, batch {rt['batch']}, {rt['threads']} threads, best of {rt['rounds']} "
          f"(export of both ONNX precisions: {rt['export_seconds']:.1f} s):")
    print(f"  {'runtime':<12} {'img/s':>8} {'x torch fp32':>13} {'cosine to torch fp32':>21}")
    for name, rate in rt["rates"].items():
        print(f"  {name:<12} {rate:8.1f} {rate / base:13.2f} {rt['cosine_to_torch_fp32'][name]:21.6f}")
    explicit = {k: v for k, v in results.items() if k.startswith("index_threads_")}
    # Rates after the model load; every run is a first run into its own library, after the
    # warm-up run filled the machine's caches. Minutes apart: on a busy machine, re-run.
    rate = "per_s_after_load"
    best_name, best = max(explicit.items(), key=lambda kv: kv[1][rate])
    print(f"{'index run (first run, own library)':<44} {'img/s':>8} {'main MB':>8} {'workers MB':>11} "
          f"{'sum MB':>7}  precision (runtime), threads, workers")

    def row(label: str, run: dict) -> None:
        print(f"  {label:<42} {run[rate]:8.1f} {_memory(run)}  {run.get('precision_used')} ({run.get('runtime')}), "
              f"{run.get('threads')} threads, {run.get('workers')} workers")

    row("default flags (all measured)", default_run)
    for name, run in explicit.items():
        _, _, threads, _, workers = name.split("_")
        row(f"--threads {threads} --workers {workers}" + ("  (best explicit)" if name == best_name else ""), run)
    print(f"default flags vs best explicit flags: {default_run[rate] / best[rate]:.2f} "
          f"(target >= 0.9; img/s after the model load)")


if __name__ == "__main__":
    raise SystemExit(main())
