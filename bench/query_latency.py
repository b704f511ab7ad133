"""Query latency: warm queries split by stage, and a cold `clipfind search` with and without a server.

    .venv/bin/python bench/query_latency.py                       # 10k and 100k vectors, tiny model
    .venv/bin/python bench/query_latency.py --sizes 10000 --json
    .venv/bin/python bench/query_latency.py --vit                 # + ViT-B-32 encode cost (random weights)

Libraries: N rows of random unit vectors in real SQLite rows (the tiny model's
embedding size, its model record), with the FAISS index the library itself
chooses for N (Flat below 100k, IVF from 100k), cached in --work. The vectors
are synthetic; encode times are the real tiny model's.

Warm: one process, model and index loaded, like `clipfind serve`. Each text
query is new (a cache miss: the text tower runs); "cached" repeats one text;
"image" encodes a file that is not in the library. Stages: encode (prompted
text or image), sync (checking the index is caught up with the database), FAISS
(search), SQL (filters + fetching the result rows), render (the table into
memory). On a shared machine the load average matters: it is printed.

Cold: `clipfind search` as a new process, from start to the first result line
on stdout: with a new text (the model loads), a cached text (it does not), and
with `clipfind serve` running (the query is sent there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
from retrieval import config  # noqa: E402

DEFAULT_WORK = config.cache_root() / "bench" / "query"
WORDS = ["red", "green", "blue", "yellow", "purple", "small", "large", "noisy", "bright", "dark"]
SHAPES = ["circle", "square", "triangle", "star", "shape", "thing"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# -- libraries --------------------------------------------------------------------------------
def build_library(root: Path, n: int, encoder) -> Path:
    """A library with n random unit vectors as rows (reused when it already holds n)."""
    import numpy as np

    from retrieval.store.library import Library

    marker = root / "bench.json"
    if marker.exists() and json.loads(marker.read_text()).get("n") == n:
        return root
    if root.exists():
        import shutil

        shutil.rmtree(root)
    rng = np.random.default_rng(n)
    with Library.open(root) as library:
        library.bind_encoder(encoder)
        dim = encoder.embed_dim
        with library.engine.begin() as conn:
            raw = conn.connection.dbapi_connection
            for start in range(0, n, 20_000):
                count = min(20_000, n - start)
                vectors = rng.standard_normal((count, dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                raw.executemany(
                    "INSERT INTO images (path, size, mtime_ns, content_hash, width, height, format, "
                    "embedding, added_at) VALUES (?, ?, ?, ?, 640, 480, 'JPEG', ?, '2026-01-01 00:00:00')",
                    [(f"/bench/photos/{(start + i) // 1000:03d}/img_{start + i:06d}.jpg", 50_000 + i,
                      1_700_000_000_000_000_000 + i, f"{start + i:032x}", vectors[i].tobytes())
                     for i in range(count)])
        library.vectors()  # build and save the index the library would choose
    marker.write_text(json.dumps({"n": n}))
    return root


# -- warm -------------------------------------------------------------------------------------
def warm_runs(library_root: Path, encoder, queries: int, image_file: Path) -> dict[str, dict]:
    from retrieval.query.render import table
    from retrieval.query.search import Searcher
    from retrieval.query.textcache import TextCache
    from retrieval.query.types import Query
    from retrieval.store.library import Library

    rng = random.Random(1)
    out = {}
    with Library.open(library_root, create=False) as library:
        library.bind_encoder(encoder)
        searcher = Searcher(library, cache=TextCache(None))  # memory only: the disk file stays clean
        searcher.search(Query.build("warm up"), k=10)
        kinds = {
            "text (new)": lambda i: Query.build(f"a {rng.choice(WORDS)} {rng.choice(SHAPES)} no. {i}"),
            "text (cached)": lambda i: Query.build("a red circle"),
            "image (file)": lambda i: Query.build(images=[str(image_file)]),
        }
        for kind, make in kinds.items():
            rows = []
            count = queries if kind != "image (file)" else max(10, queries // 4)
            for i in range(count):
                response = searcher.search(make(i), k=10)
                started = time.perf_counter()
                table(response.results).encode()
                render_ms = (time.perf_counter() - started) * 1000
                rows.append({**response.timings, "render": render_ms,
                             "total": response.timings["total"] + render_ms})
            out[kind] = {"n": count, "factory": library.vectors(sync=False).state.factory,
                         **{f"{stage}_p50": statistics.median(r[stage] for r in rows)
                            for stage in ("encode", "sync", "faiss", "sql", "render")},
                         "p50": percentile([r["total"] for r in rows], 50),
                         "p99": percentile([r["total"] for r in rows], 99)}
    return out


def vit_encode(image_file: Path, repeats: int) -> dict[str, dict]:
    """ViT-B-32 with random weights: only what encoding costs at real model size."""
    from PIL import Image

    from retrieval.model.encoder import Encoder, ModelSpec
    from retrieval.model.runtime import torch_threads
    from retrieval.prompting.prompts import PHOTO_TEMPLATES, encode_prompted

    encoder = Encoder(ModelSpec(model="ViT-B-32", random_weights=True))
    image = Image.open(image_file).convert("RGB")
    out = {}
    for threads in (1, 2):
        with torch_threads(threads):
            for kind, run in (("text (5 prompts)", lambda i: encode_prompted(encoder, [f"a dog no. {i}"],
                                                                              PHOTO_TEMPLATES)),
                              ("image", lambda i: encoder.encode_images([image]))):
                run(-1)
                times = []
                for i in range(repeats):
                    started = time.perf_counter()
                    run(i)
                    times.append((time.perf_counter() - started) * 1000)
                out[f"{kind}, {threads} thread{'s' if threads > 1 else ''}"] = {
                    "p50": percentile(times, 50), "p99": percentile(times, 99), "n": repeats}
    return out


# -- cold -------------------------------------------------------------------------------------
def clipfind_command() -> list[str]:
    script = Path(sys.executable).parent / "clipfind"
    return [str(script)] if script.exists() else [sys.executable, "-m", "retrieval.cli"]


def first_result_seconds(args: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(clipfind_command() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=HERE.parent.parent)
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.communicate()
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"clipfind {' '.join(args)} failed: {proc.stderr}")
    return elapsed


def cold_runs(library_root: Path, repeats: int) -> dict[str, dict]:
    lib = ["-L", str(library_root), "--paths", "-k", "10"]
    runs: dict[str, list[float]] = {"no server, new text": [], "no server, cached text": [],
                                    "warm server, new text": []}
    first_result_seconds(["search", "a red circle", *lib, "--no-server"])  # puts it in the text cache
    for i in range(repeats):
        runs["no server, new text"].append(first_result_seconds(
            ["search", f"a cold query no. {i} {time.time()}", *lib, "--no-server"]))
        runs["no server, cached text"].append(first_result_seconds(["search", "a red circle", *lib, "--no-server"]))
    server = subprocess.Popen(clipfind_command() + ["serve", "-L", str(library_root), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent.parent)
    try:
        ready = server.stdout.readline()
        if not ready.startswith("clipfind serve:"):
            raise RuntimeError(f"clipfind serve did not start: {ready}{server.stderr.read()}")
        for i in range(repeats):
            runs["warm server, new text"].append(first_result_seconds(
                ["search", f"a served query no. {i} {time.time()}", *lib]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {kind: {"median_s": statistics.median(t), "max_s": max(t), "n": len(t)} for kind, t in runs.items()}


# -- report -----------------------------------------------------------------------------------
def print_report(report: dict) -> None:
    print(f"clipfind query latency: {report['model']} ({report['embed_dim']}-d), "
          f"{report['cores']} cores (load average {report['load_before']:.1f} at start), k=10, times in ms; "
          "stage columns are p50s")
    print(f"{'vectors':>8}  {'index':<14} {'query':<14} {'n':>4}  {'p50':>7} {'p99':>7}  "
          f"{'encode':>7} {'sync':>6} {'faiss':>6} {'sql':>6} {'render':>6}")
    for size, kinds in report["warm"].items():
        for kind, row in kinds.items():
            print(f"{int(size):>8}  {row['factory']:<14} {kind:<14} {row['n']:>4}  {row['p50']:>7.2f} "
                  f"{row['p99']:>7.2f}  {row['encode_p50']:>7.2f} {row['sync_p50']:>6.2f} {row['faiss_p50']:>6.2f} "
                  f"{row['sql_p50']:>6.2f} "
                  f"{row['render_p50']:>6.2f}")
    if report.get("vit"):
        print("\nViT-B-32, RANDOM weights (encode cost at real size only), ms")
        for kind, row in report["vit"].items():
            print(f"  {kind:<28} p50 {row['p50']:8.1f}  p99 {row['p99']:8.1f}  (n={row['n']})")
    if report.get("cold"):
        print(f"\ncold `clipfind search` on {report['cold_library']} vectors, process start -> first result, s")
        for kind, row in report["cold"].items():
            print(f"  {kind:<26} median {row['median_s']:6.2f}  max {row['max_s']:6.2f}  (n={row['n']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="library sizes, comma separated")
    parser.add_argument("--queries", type=int, default=200, help="warm text queries per kind and size")
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold CLI runs")
    parser.add_argument("--vit", action="store_true", help="also time ViT-B-32 (random weights) encoding")
    parser.add_argument("--model-dir", help="model to use (default: the tiny test model, trained if needed)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the libraries are kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)

    from retrieval.media.synthetic import draw
    from retrieval.model.encoder import Encoder, ModelSpec

    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from retrieval.devmodels.tiny import ensure_tiny_model

        model_dir = ensure_tiny_model()
    encoder = Encoder(ModelSpec(model_dir=str(model_dir)))
    args.work.mkdir(parents=True, exist_ok=True)
    image_file = args.work / "query.jpg"
    draw("blue star", 256, random.Random(7)).save(image_file, quality=90)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    report: dict = {"model": encoder.spec.label, "embed_dim": encoder.embed_dim,
                    "cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0], "warm": {}}
    roots = {}
    for size in sizes:
        roots[size] = build_library(args.work / f"lib-{size}-{model_dir.name}", size, encoder)
        report["warm"][str(size)] = warm_runs(roots[size], encoder, args.queries, image_file)
    if args.vit:
        report["vit"] = vit_encode(image_file, repeats=20)
    if not args.no_cold and sizes:
        report["cold_library"] = max(sizes)
        report["cold"] = cold_runs(roots[max(sizes)], args.cold_repeats)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
