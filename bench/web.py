"""The web app under load: search page and JSON search at 100k vectors, thumbnails, 50 clients.

    .venv/bin/python bench/web.py                          # 100k vectors, 10 s of 50 clients
    .venv/bin/python bench/web.py --duration 30 --json     # the issue's 30 s

The library: N random unit vectors as real SQLite rows with the tiny model's
record (synthetic vectors, built by bench/query_latency.py's builder and cached
in --work), plus one real 12-megapixel JPEG indexed by the tiny model for the
thumbnail rows. The server is a real `clipfind serve` process on 127.0.0.1;
clients use keep-alive connections (httpx).

Rows:
- in-process `Searcher.search` (no HTTP): the baseline the HTTP rows are divided by;
- JSON `POST /search` and the search page `GET /?q=`, each with a new text (the
  text tower runs), k=60, timed at the client; "server" is the app's own
  `Server-Timing` (the one to judge the server by: on the shared 2-core machine
  the httpx client alone added ~50 ms per request);
- thumbnail of the 12-MP JPEG: miss (cache file deleted first) and hit; the
  baseline is decoding that JPEG in full with Pillow in this process;
- 50 concurrent clients mixing the three for --duration seconds: requests,
  errors, and the server's RSS before and after (growth must stay under 10%).
Targets (issue 16): text p50 < 100 ms, thumbnail hit < 5 ms, miss < 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))
DEFAULT_WORK = Path(os.environ.get("CLIPFIND_CACHE", Path.home() / ".cache" / "clipfind")) / "bench" / "web"
WORDS = ["red", "green", "blue", "yellow", "purple", "small", "large", "noisy", "bright", "dark"]
SHAPES = ["circle", "square", "triangle", "star", "shape", "thing"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def twelve_megapixels(path: Path) -> Path:
    """A 4000x3000 JPEG with photo-like detail (gradients + sensor-like noise; ~4 MB, like a
    camera's), made once. Noise costs decode time: pure noise at quality 90 doubles the file."""
    if path.exists():
        return path
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(12)
    y, x = np.mgrid[0:3000, 0:4000].astype(np.float32)
    base = np.stack([x / 4000 * 255, y / 3000 * 255, (x + y) / 7000 * 255], axis=-1)
    noise = rng.normal(0, 6, (3000, 4000, 3)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return path


def prepare(work: Path, n: int) -> tuple[Path, Path]:
    from query_latency import build_library

    from retrieval import Library
    from retrieval.devmodels.tiny import ensure_tiny_model
    from retrieval.model.encoder import Encoder, ModelSpec

    encoder = Encoder(ModelSpec(model_dir=str(ensure_tiny_model())))
    root = build_library(work / f"lib-{n}", n, encoder)
    photo = twelve_megapixels(work / "photo12" / "big.jpg")
    with Library.open(root, create=False) as library:
        library.bind_encoder(encoder)
        library.index([photo.parent], workers=0)
    return root, photo


def in_process(root: Path, texts: list[str]) -> list[float]:
    from retrieval import Library
    from retrieval.query.search import Searcher
    from retrieval.query.textcache import TextCache
    from retrieval.query.types import Query

    with Library.open(root, create=False) as library:
        searcher = Searcher(library, cache=TextCache(None))
        searcher.search(Query.build("warm up"), k=60)
        out = []
        for text in texts:
            started = time.perf_counter()
            searcher.search(Query.build(text), k=60)
            out.append((time.perf_counter() - started) * 1000)
    return out


def start_server(root: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "-L", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("clipfind serve:"):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    proc.stdout.readline()
    return proc, json.loads((root / "serve.json").read_text())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(client, method: str, url: str, **kwargs) -> tuple[float, float, int]:
    started = time.perf_counter()
    reply = client.request(method, url, **kwargs)
    took = (time.perf_counter() - started) * 1000
    server = reply.headers.get("server-timing", "app;dur=nan").split("dur=")[-1]
    return took, float(server), reply.status_code


def run(args) -> dict:
    import httpx

    root, photo = prepare(args.work, args.n)
    rng = random.Random(7)
    texts = [f"a {rng.choice(WORDS)} {rng.choice(SHAPES)} no. {i} {time.time_ns()}" for i in range(3 * args.queries)]
    baseline = in_process(root, texts[:args.queries])
    proc, info = start_server(root)
    results: dict = {"n": args.n, "baseline_ms_p50": statistics.median(baseline),
                     "baseline_ms_p99": pct(baseline, 99)}
    try:
        headers = {"Authorization": f"Bearer {info['token']}"}
        with httpx.Client(base_url=info["url"], headers=headers, timeout=60) as client:
            client.post("/search", json={"text": "warm up", "k": 60})
            rows = {}
            json_runs = [timed(client, "POST", "/search", json={"text": t, "k": 60})
                         for t in texts[args.queries:2 * args.queries]]
            page_runs = [timed(client, "GET", "/", params={"q": t}) for t in texts[2 * args.queries:]]
            rows["JSON POST /search (new text)"] = json_runs
            rows["search page GET /?q= (new text)"] = page_runs
            import sqlite3

            with sqlite3.connect(root / "clipfind.db") as db:
                image_id, digest = db.execute("SELECT id, content_hash FROM images WHERE path = ?",
                                              (str(photo),)).fetchone()
            cache = root / "thumbs" / "small" / digest[:2] / f"{digest}.webp"
            misses = []
            for _ in range(args.misses):
                cache.unlink(missing_ok=True)
                misses.append(timed(client, "GET", f"/thumb/{image_id}", params={"size": "small"}))
            hits = [timed(client, "GET", f"/thumb/{image_id}", params={"size": "small"}) for _ in range(50)]
            rows["thumbnail 12 MP, miss (small)"] = misses
            rows["thumbnail 12 MP, hit (small)"] = hits
            results["rows"] = {name: {"n": len(r), "p50": pct([x[0] for x in r], 50),
                                      "p99": pct([x[0] for x in r], 99),
                                      "server_p50": pct([x[1] for x in r], 50),
                                      "errors": sum(x[2] != 200 for x in r)} for name, r in rows.items()}
            from PIL import Image

            decode = []
            for _ in range(3):
                started = time.perf_counter()
                with Image.open(photo) as image:
                    image.load()
                decode.append((time.perf_counter() - started) * 1000)
            results["full_decode_ms"] = statistics.median(decode)
            results["photo_mb"] = photo.stat().st_size / 1e6
        results["load"] = load(args, info, image_id, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return results


def load(args, info: dict, image_id: int, pid: int) -> dict:
    """`clients` threads, each its own keep-alive connection, for `duration` seconds."""
    import httpx

    texts = [f"a {w} {s}" for w in WORDS[:4] for s in SHAPES[:3]]
    before = rss_mb(pid)
    stop = time.monotonic() + args.duration
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    latencies: list[float] = []

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=info["url"], headers={"Authorization": f"Bearer {info['token']}"},
                          timeout=120) as client:
            while time.monotonic() < stop:
                kind = rng.random()
                try:
                    if kind < 0.4:
                        took, _, status = timed(client, "POST", "/search", json={"text": rng.choice(texts), "k": 20})
                    elif kind < 0.7:
                        took, _, status = timed(client, "GET", "/", params={"q": rng.choice(texts)})
                    else:
                        took, _, status = timed(client, "GET", f"/thumb/{image_id}")
                    ok = status == 200
                except httpx.HTTPError:
                    took, ok = float("nan"), False
                with lock:
                    counts["requests"] += 1
                    counts["errors"] += not ok
                    latencies.append(took)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = rss_mb(pid)
    good = [x for x in latencies if x == x]
    return {"clients": args.clients, "seconds": args.duration, **counts,
            "p50": pct(good, 50) if good else None, "p99": pct(good, 99) if good else None,
            "rss_before_mb": before, "rss_after_mb": after, "rss_growth": after / before - 1}


def report(r: dict) -> None:
    load1 = os.getloadavg()
    print(f"web app at {r['n']:,} synthetic vectors (tiny model, k=60) | {os.cpu_count()} CPUs, "
          f"load average {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}")
    print(f"{'request':38} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'server p50':>10} {'err':>4}  ratio")
    print(f"{'in-process Searcher.search (baseline)':38} {'':>4} {r['baseline_ms_p50']:8.1f} "
          f"{r['baseline_ms_p99']:8.1f} {'':>10} {'':>4}  1.00")
    for name, row in r["rows"].items():
        base = r["full_decode_ms"] if name.startswith("thumbnail") else r["baseline_ms_p50"]
        print(f"{name:38} {row['n']:4d} {row['p50']:8.1f} {row['p99']:8.1f} {row['server_p50']:10.1f} "
              f"{row['errors']:4d}  {row['p50'] / base:.2f}")
    print(f"{'(thumbnail baseline) full Pillow decode':38} {'':>4} {r['full_decode_ms']:8.1f}"
          f"   ({r['photo_mb']:.1f} MB, 4000x3000)")
    x = r["load"]
    print(f"{x['clients']} clients for {x['seconds']} s: {x['requests']} requests, {x['errors']} errors, "
          f"p50 {x['p50']:.0f} ms, p99 {x['p99']:.0f} ms; server RSS {x['rss_before_mb']:.0f} -> "
          f"{x['rss_after_mb']:.0f} MB ({x['rss_growth']:+.1%}; target < +10%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="stored vectors")
    parser.add_argument("--queries", type=int, default=40, help="texts per latency row")
    parser.add_argument("--misses", type=int, default=5, help="thumbnail misses to time")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of concurrent load")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args)
    if args.json:
        print(json.dumps({**results, "loadavg": os.getloadavg()}, indent=2))
    else:
        report(results)


if __name__ == "__main__":
    main()
