"""Auto-tagging throughput and memory over stored vectors: 1M images x 1,000 labels by default.

    .venv/bin/python bench/tagging.py                      # 1,000,000 vectors, 512-d, 1,000 labels
    .venv/bin/python bench/tagging.py --count 200000 --json
    .venv/bin/python bench/tagging.py --db-dir /tmp/tagbench --keep   # build once, re-run fast

Builds (once, reusable with --keep) a real library whose `images` rows hold
random unit vectors, then runs each phase in its own process so "peak RSS"
is that phase's own high-water mark:
  read    stream every blob out of SQLite into numpy chunks, nothing else;
  matmul  the floor: the bare (chunk x dim) @ (dim x labels) product alone,
          repeated to cover --count rows (no normaliser, no top-k);
  compute the scoring alone (matmul, softmax normaliser, top-k) on one
          in-memory chunk repeated to cover --count rows;
  score   read + compute: `tagging.select_tags` over `tagging.iter_vectors`;
  tag     the real thing: `tagging.tag_library` — read, score, and write every
          tag row in one transaction (replacing the previous run).
The target is >= 50,000 images/s for `tag` and peak memory below 1.5x the
vectors' size (tagging streams, so it should be far below).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))


def build(root: Path, count: int, dim: int, batch: int = 50_000) -> float:
    """A library with `count` random unit vectors; returns the seconds it took."""
    import numpy as np

    from retrieval.store.library import Library

    started = time.perf_counter()
    with Library.open(root) as library:
        library.set_meta("model", {"spec": {"model": "bench", "random_weights": True}, "label": "bench vectors",
                                   "fingerprint": "bench", "embed_dim": dim, "image_size": 224, "preprocess": ""})
        raw = library.engine.raw_connection()
        try:
            rng = np.random.default_rng(0)
            for start in range(0, count, batch):
                n = min(batch, count - start)
                x = rng.standard_normal((n, dim), dtype=np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                rows = ((f"/bench/{i:08d}.jpg", 1000, 0, f"{i:016x}", x[j].tobytes())
                        for j, i in enumerate(range(start, start + n)))
                raw.executemany("INSERT INTO images (path, size, mtime_ns, content_hash, embedding, added_at) "
                                "VALUES (?, ?, ?, ?, ?, datetime('now'))", rows)
                raw.commit()
        finally:
            raw.close()
    return time.perf_counter() - started


def _scorer(dim: int, n_labels: int):
    import numpy as np

    from retrieval.tagging.autotag import Scorer

    rng = np.random.default_rng(1)
    classes = rng.standard_normal((n_labels, dim), dtype=np.float32)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    return Scorer([f"label {i:04d}" for i in range(n_labels)], classes, 100.0)


def run_phase(phase: str, root: Path, count: int, dim: int, n_labels: int, chunk: int, top_k: int) -> dict:
    """One phase in this process; returns seconds, rows and peak RSS."""
    import numpy as np
    import torch

    from retrieval.store.library import Library
    from retrieval.tagging import autotag as tagging

    scorer = _scorer(dim, n_labels)
    options = tagging.TagOptions(top_k=top_k, chunk=chunk)
    baseline = _peak_rss()
    rows = tags = 0
    read_s = compute_s = 0.0
    started = time.perf_counter()
    with Library.open(root, create=False) as library:
        if phase == "tag":
            result = tagging.tag_library(library, scorer, "bench", "template", options, progress=False)
            rows, tags = result.images, result.tags
        elif phase in ("compute", "matmul"):
            x = np.random.default_rng(2).standard_normal((chunk, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            while rows < count:
                n = min(chunk, count - rows)
                if phase == "matmul":
                    scorer.cosines(torch.from_numpy(x[:n]))
                else:
                    tags += len(tagging.select_tags(scorer, x[:n], options)[0])
                rows += n
        else:
            with library.engine.connect() as conn:
                stream = tagging.iter_vectors(conn.connection.dbapi_connection, dim, chunk)
                while True:
                    t0 = time.perf_counter()
                    item = next(stream, None)
                    read_s += time.perf_counter() - t0
                    if item is None:
                        break
                    rows += len(item[0])
                    if phase == "score":
                        t0 = time.perf_counter()
                        tags += len(tagging.select_tags(scorer, item[1], options)[0])
                        compute_s += time.perf_counter() - t0
    seconds = time.perf_counter() - started
    out = {"phase": phase, "rows": rows, "tags": tags, "seconds": round(seconds, 2),
           "images_per_s": round(rows / seconds), "peak_rss_mb": round(_peak_rss() / 2**20),
           "baseline_rss_mb": round(baseline / 2**20), "torch_threads": torch.get_num_threads()}
    if phase == "score":
        out.update(read_seconds=round(read_s, 2), compute_seconds=round(compute_s, 2))
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _count_rows(root: Path) -> int:
    import sqlite3

    db = root / "clipfind.db"
    if not db.exists():
        return -1
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
        except sqlite3.Error:
            return -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="stored vectors (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=None, help="vectors per matrix product (default: tagging.CHUNK)")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--phases", default="read,matmul,compute,score,tag")
    parser.add_argument("--db-dir", type=Path, help="where to build the library (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the library for the next run (reused if the size fits)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk is None:
        from retrieval.tagging.autotag import CHUNK

        args.chunk = CHUNK
    root = args.db_dir or Path(tempfile.mkdtemp(prefix="clipfind-tagbench-"))
    if args._phase:
        print(json.dumps(run_phase(args._phase, root, args.count, args.dim, args.labels, args.chunk, args.top_k)))
        return 0

    build_s = None
    if _count_rows(root) != args.count:
        shutil.rmtree(root, ignore_errors=True)
        build_s = build(root, args.count, args.dim)
    results = []
    try:
        for phase in args.phases.split(","):
            cmd = [sys.executable, str(HERE), "--_phase", phase, "--db-dir", str(root), "--count", str(args.count),
                   "--dim", str(args.dim), "--labels", str(args.labels), "--chunk", str(args.chunk),
                   "--top-k", str(args.top_k)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        if not args.keep and not args.db_dir:
            shutil.rmtree(root, ignore_errors=True)
    vectors_mb = args.count * args.dim * 4 / 2**20
    report = {"count": args.count, "dim": args.dim, "labels": args.labels, "chunk": args.chunk, "top_k": args.top_k,
              "vectors_mb": round(vectors_mb), "build_seconds": None if build_s is None else round(build_s, 1),
              "cpus": len(os.sched_getaffinity(0)), "load_avg_1min": round(os.getloadavg()[0], 2),
              "phases": results}
    if args.json:
        print(json.dumps(report))
        return 0
    built = f"built in {build_s:.0f} s" if build_s is not None else "reused"
    print(f"{args.count:,} stored vectors x {args.dim}-d ({vectors_mb:,.0f} MB), {args.labels:,} labels, "
          f"top-{args.top_k}, chunk {args.chunk:,}; library {built}; {report['cpus']} cpus, "
          f"load {report['load_avg_1min']}")
    print(f"{'phase':<8} {'seconds':>8} {'images/s':>10} {'peak RSS':>9} {'vs vectors':>10}  notes "
          f"(RSS after imports: {results[0]['baseline_rss_mb']} MB)")
    for r in results:
        notes = ""
        if r["phase"] == "score":
            notes = f"blob read {r['read_seconds']:.1f} s, matmul+top-k {r['compute_seconds']:.1f} s"
        if r["phase"] == "tag":
            notes = f"{r['tags']:,} tag rows written in one transaction"
        print(f"{r['phase']:<8} {r['seconds']:>8.1f} {r['images_per_s']:>10,} {r['peak_rss_mb']:>6,} MB "
              f"{r['peak_rss_mb'] / vectors_mb:>9.2f}x  {notes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
