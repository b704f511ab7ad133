"""Fresh-process queries: torch vs ONNX Runtime, text and image, 1k and 100k vectors, with the server.

    .venv/bin/python bench/cold_query.py                        # ViT-B-32, random weights, 1k + 100k
    .venv/bin/python bench/cold_query.py --sizes 1000 --repeats 3 --json
    .venv/bin/python bench/cold_query.py --model-dir DIR        # any open_clip model folder
    .venv/bin/python bench/cold_query.py --quick                # 1k vectors, 2 processes a cell
    .venv/bin/python bench/cold_query.py --paths onnx --server-threads auto,1 --repeats 5   # issue 17's rows

Libraries: N rows of SYNTHETIC random unit vectors (bench/query_latency.py's
`build_library`) bound to the model, so the FAISS and SQL phases see N real
rows; the model is real (ViT-B-32 with random weights by default: random
weights prove speed, not quality) and its ONNX export is made once, as the
first `clipfind index` makes it.

Each query is a new process with a text never asked before (no cache helps),
or an image file that is not in the library. "direct" rows run a small driver
that does what `clipfind search --no-server` does, timing each phase: imports
(the CLI and query modules), session/model load (ONNX sessions or torch model:
only the tower the query needs), encode, FAISS (sync + search), SQL (result
rows), print (the table to stdout); "wall" is the parent's clock from spawn to
exit, so it includes interpreter start-up. "server" rows run the real
`clipfind search` CLI against a running `clipfind serve` (threads: its --threads; auto
is 1, or every core up to 4 while they are idle). Peak RSS is the
child's ru_maxrss (from wait4). The load average is printed in the header:
on a shared machine, compare the torch/ONNX ratio of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_WORK = Path(os.environ.get("CLIPFIND_CACHE", Path.home() / ".cache" / "clipfind")) / "bench" / "cold"

DRIVER = r"""
import sys, time, json
t0 = time.perf_counter()
import retrieval.cli.group  # what `clipfind` imports before running a command (not `quick` via a server)
from retrieval.query.search import Query, Searcher
from retrieval.store.fast_read import open_for_query  # as search_cmds._answer opens the library
from retrieval.query.render import write_output
t_imports = time.perf_counter()
library_root, runtime, kind, value, threads = sys.argv[1:6]
library = open_for_query(library_root)
from retrieval import config
searcher = Searcher(library, runtime=runtime, one_shot=True,  # as `clipfind search --no-server` makes it
                    onnx_threads=int(threads) if threads != "auto" else config.query_threads())
notes = []
encoder = searcher.runtimes.for_tower(kind, notes)
if getattr(encoder, "runtime", "torch") == "onnx":
    encoder.session(kind)
t_load = time.perf_counter()
query = Query.build(value) if kind == "text" else Query.build((), value)
response = searcher.search(query, k=10)
t_search = time.perf_counter()
write_output(response, "table", sys.stdout.buffer)
sys.stdout.flush()
t_print = time.perf_counter()
timings = response.timings
heavy = [m for m in ("torch", "open_clip", "onnxruntime", "faiss", "sqlalchemy", "PIL") if m in sys.modules]
print(json.dumps({"imports": t_imports - t0, "load": t_load - t_imports,
                  "encode": timings["encode"] / 1000, "faiss": (timings["faiss"] + timings["sync"]) / 1000,
                  "sql": timings["sql"] / 1000, "print": t_print - t_search,
                  "in_process": t_print - t0, "used": sorted(searcher.runtimes.used), "heavy": heavy,
                  "warnings": response.warnings + notes}), file=sys.stderr)
searcher.cache.close()
library.close()
sys.stderr.flush()
import os
os._exit(0)  # as `clipfind search` leaves (retrieval.cli.main): no interpreter teardown
"""


def spawn_measured(args: list[str]) -> tuple[float, int, str, str]:
    """Run a child to completion: (wall seconds, its own peak RSS in bytes, stdout, stderr).

    It runs under a fresh intermediate process whose RUSAGE_CHILDREN holds only it
    (ours is a maximum over every child so far)."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True)\n"
               "wall = time.perf_counter() - t\n"
               "sys.stdout.buffer.write(p.stdout); sys.stderr.buffer.write(p.stderr)\n"
               "print('RSS=' + json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, wall]),"
               " file=sys.stderr)\n"
               "sys.exit(p.returncode)\n")
    child = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    err = child.stderr.decode(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])}... failed: {err[-800:]}")
    line = [ln for ln in err.splitlines() if ln.startswith("RSS=")][-1]
    rss, wall = json.loads(line[4:])
    return wall, rss, child.stdout.decode(errors="replace"), err


def build(work: Path, n: int, spec) -> Path:
    """A library of n synthetic vectors bound to `spec`'s model, with its ONNX export."""
    from query_latency import build_library

    from retrieval.model.encoder import Encoder
    from retrieval.store.library import Library
    from retrieval.store.onnx_exports import ensure_export

    root = work / f"{_slug(spec)}-{n}"
    marker = root / "bench.json"
    if not (marker.exists() and json.loads(marker.read_text()).get("n") == n):
        encoder = Encoder(spec, device="cpu", precision="fp32")
        build_library(root, n, encoder)
    from retrieval.model.precision_cache import cached_choice

    with Library.open(root, create=False) as library:
        ensure_export(library, "fp32")
        if cached_choice(library.model_record["fingerprint"]) is None:
            # Measured once per machine (with ONNX Runtime's int8 export, a minute for a
            # ViT-B-32): done here, or the first torch image query would time it.
            _ = library.encoder(device="cpu").precision
    return root


def _slug(spec) -> str:
    name = spec.model or Path(spec.model_dir).name
    return f"{name}{'-random' if spec.random_weights else ''}".replace("/", "_")


def query_images(folder: Path, count: int, size: int = 320) -> list[Path]:
    """Drawn pictures saved as JPEG files that no library holds."""
    from retrieval.media import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(time.time_ns())
    paths = []
    for i in range(count):
        path = folder / f"query-{i}-{rng.randrange(10**9)}.jpg"
        synthetic.draw(rng.choice(synthetic.LABELS), size, rng).save(path, quality=90)
        paths.append(path)
    return paths


def unique_text(i: int) -> str:
    rng = random.Random(time.time_ns() + i)
    words = ["red", "green", "blue", "tiny", "huge", "noisy", "bright", "striped", "old", "shiny"]
    things = ["circle", "square", "dog", "car", "beach", "house", "tree", "boat", "cat", "lamp"]
    return f"a photo of a {rng.choice(words)} {rng.choice(things)} no. {i} {rng.randrange(10**9)}"


def direct_runs(library: Path, runtime: str, kind: str, values: list[str], threads: str = "auto") -> dict:
    samples = []
    for value in values:
        wall, rss, _, err = spawn_measured([sys.executable, "-c", DRIVER, str(library), runtime, kind, value,
                                            threads])
        phases = json.loads([ln for ln in err.splitlines() if ln.startswith("{")][-1])
        samples.append({**phases, "wall": wall, "rss_mb": rss / 2**20})
    return summarise(samples)


def server_runs(library: Path, values: list[str], threads: str = "auto") -> dict:
    """`clipfind search` (a fresh client) against `clipfind serve` (`--threads`, unless auto)."""
    flags = [] if threads == "auto" else ["--threads", threads]
    server = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "-L", str(library), "--port", "0",
                               *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        ready = server.stdout.readline()
        if not ready.startswith("clipfind serve:"):
            raise RuntimeError(f"clipfind serve did not start: {ready}{server.stderr.read()[-800:]}")
        samples = []
        for value in values:
            wall, rss, out, _ = spawn_measured([sys.executable, "-m", "retrieval.cli", "search", value,
                                                "-L", str(library)])
            samples.append({"wall": wall, "rss_mb": rss / 2**20})
        return summarise(samples)
    finally:
        server.terminate()
        server.wait(timeout=60)


def summarise(samples: list[dict]) -> dict:
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
    out = {k: statistics.median(s[k] for s in samples) for k in keys}
    out["n"] = len(samples)
    for extra in ("used", "heavy"):
        if extra in samples[0]:
            out[extra] = samples[0][extra]
    warnings = sorted({w for s in samples for w in s.get("warnings", [])})
    if warnings:
        out["warnings"] = warnings
    return out


PHASES = ("imports", "load", "encode", "faiss", "sql", "print", "in_process")


def print_report(report: dict) -> None:
    print(f"# cold_query: {report['model']}; {report['cores']} cores, load average "
          f"{report['load_before']:.2f} at start, {report['load_after']:.2f} at end; medians of "
          f"{report['repeats']} fresh processes; seconds; vectors are synthetic")
    header = f"{'vectors':>8} {'query':<6} {'path':<7} {'threads':>7} {'wall':>6} " \
        + " ".join(f"{p:>10}" for p in PHASES) + f" {'peak RSS MB':>11}  runtime"
    print(header)
    for row in report["rows"]:
        phases = " ".join(f"{row[p]:10.3f}" if p in row else f"{'-':>10}" for p in PHASES)
        print(f"{row['vectors']:>8} {row['kind']:<6} {row['path']:<7} {row.get('threads', '-'):>7} "
              f"{row['wall']:6.2f} {phases} "
              f"{row['rss_mb']:11.0f}  {','.join(row.get('used', [])) or '-'}")
    print("# targets (2 idle cores): onnx text <= 0.4 s at 1k and <= 0.6 s at 100k vectors, image <= 0.6 s, "
          "server <= 0.25 s; text peak RSS <= 300 MB")
    print("# ratios (torch / onnx, same run):")
    by = {(r["vectors"], r["kind"], r["path"]): r for r in report["rows"] if r.get("threads") in (None, "auto")}
    for (n, kind, path), row in by.items():
        if path == "onnx" and (n, kind, "torch") in by:
            torch_row = by[(n, kind, "torch")]
            print(f"#   {n} vectors, {kind}: wall {torch_row['wall'] / row['wall']:.2f}x, "
                  f"peak RSS {torch_row['rss_mb'] / row['rss_mb']:.2f}x")
    for row in report["rows"]:
        for warning in row.get("warnings", []):
            print(f"# note ({row['vectors']} {row['kind']} {row['path']}): {warning}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,100000", help="stored vector counts")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cell")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--model-dir", help="an open_clip model folder instead of random weights")
    parser.add_argument("--no-server", action="store_true", help="skip the rows with `clipfind serve`")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1k vectors only, 2 processes per cell")
    parser.add_argument("--paths", default="torch,onnx", help="runtimes of the direct rows (torch, onnx; empty: none)")
    parser.add_argument("--threads", default="auto",
                        help="ONNX Runtime threads of the onnx rows, e.g. 1,2 (auto: what clipfind search uses)")
    parser.add_argument("--server-threads", default="auto",
                        help="`clipfind serve --threads` of the server rows, e.g. auto,1 (auto: its default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "1000", min(args.repeats, 2)
    from retrieval.model.spec import ModelSpec

    spec = ModelSpec(model_dir=args.model_dir) if args.model_dir else ModelSpec(model=args.model,
                                                                                random_weights=True)
    report = {"model": spec.label, "cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0],
              "repeats": args.repeats, "rows": []}
    with tempfile.TemporaryDirectory(prefix="cold-query-") as tmp:
        images = [str(p) for p in query_images(Path(tmp), args.repeats * 2)]
        for n in [int(s) for s in args.sizes.split(",")]:
            library = build(args.work, n, spec)
            for kind in ("text", "image"):
                for path in [p for p in args.paths.split(",") if p]:
                    for threads in args.threads.split(",") if path == "onnx" else ["-"]:
                        values = [unique_text(i) for i in range(args.repeats)] if kind == "text" else \
                            images[(path == "onnx") * args.repeats:][:args.repeats]  # files no library holds
                        row = direct_runs(library, path, kind, values, threads)
                        report["rows"].append({"vectors": n, "kind": kind, "path": path, **row,
                                               **({"threads": threads} if path == "onnx" else {})})
            if not args.no_server:
                for threads in args.server_threads.split(","):
                    row = server_runs(library, [unique_text(100 + i) for i in range(args.repeats)], threads)
                    report["rows"].append({"vectors": n, "kind": "text", "path": "server", "threads": threads,
                                           **row})
    report["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
