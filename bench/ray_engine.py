"""The Ray engine's overhead: the same index run on Ray Data vs the single-process indexer.

    .venv/bin/python bench/ray_engine.py              # 2,000 CIFAR-10 test photos, ViT-B-32 random weights
    .venv/bin/python bench/ray_engine.py --quick      # 300 photos
    .venv/bin/python bench/ray_engine.py --model-dir DIR --precision fp32 --json

Each row is one whole `index` run into a fresh library through the library API
(scan, hash, decode, encode, one transaction per batch or block, FAISS build), model
loads included, on the same photos (read in place from $CLIPFIND_DATA/cifar10/test, else
../shared/data/cifar10/test; N/10 per class), the same model and the same precision:
  * single process: DataLoader decode workers + the encoder in this process (the default engine);
  * Ray, 1 encoder actor: decode tasks + one actor, on a local cluster of this machine's cores;
  * Ray, 2 encoder actors: the same with two actor processes sharing the cores.
The local cluster is started before the Ray rows (its start time is its own line,
since a real cluster is started once, not per run), so a Ray row's ratio to the single
process is the engine's overhead on one machine (target >= 0.85).

`--rounds N` repeats the three rows N times, alternating, each Ray row's ratio taken
against the single-process row of its own round (the cluster is stopped while the
single process runs): this machine's speed drifts between runs minutes apart by more
than the margin being measured, so only ratios from neighbouring runs are fair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
from retrieval import config  # noqa: E402


def cifar_test_dir() -> Path:
    root = config.data_root()
    return (root / "cifar10" / "test") if root else HERE.parents[2] / "shared" / "data" / "cifar10" / "test"


def photos(count: int) -> list[str]:
    """count/10 photos of each class of the test split, in file order: read in place."""
    folder = cifar_test_dir()
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"no CIFAR-10 test split at {folder} (set CLIPFIND_DATA)")
    per = -(-count // len(classes))
    picked = [str(f) for c in classes for f in sorted(c.iterdir())[:per]]
    return picked[:count]


def spec(args):
    from retrieval.model.spec import ModelSpec

    if args.model_dir:
        return ModelSpec(model_dir=args.model_dir)
    return ModelSpec(model=args.model, random_weights=True)


def one_run(args, paths: list[str], workdir: Path, name: str, make_stages=None) -> dict:
    from retrieval.index.indexer import IndexOptions, index_paths
    from retrieval.store.library import Library

    load = os.getloadavg()[0]
    with Library.open(workdir / name) as lib:
        started = time.perf_counter()
        result = index_paths(lib, paths, spec(args), "cpu", args.precision,
                             IndexOptions(batch_size=args.batch_size), make_stages)
        seconds = time.perf_counter() - started
    stats = result.stats
    assert stats["encoded"] == len(paths), stats
    return {"run": name, "images": len(paths), "seconds": round(seconds, 2),
            "img_s": round(len(paths) / seconds, 2), "threads": stats.get("threads"),
            "actors": stats.get("actors"), "blocks": stats.get("blocks"),
            "first_block_s": stats.get("first_block_s"),
            "load_before": round(load, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="photos (default 2,000)")
    parser.add_argument("--quick", action="store_true", help="300 photos")
    parser.add_argument("--model", default="ViT-B-32", help="architecture with random weights (default ViT-B-32)")
    parser.add_argument("--model-dir", help="an open_clip model folder instead (e.g. the CIFAR test model)")
    parser.add_argument("--precision", default="fp32", help="one precision for every row (default fp32)")
    parser.add_argument("--batch-size", type=int, default=None, help="encoder batch (default 32 on CPU)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the three rows, alternating; ratios within each round (default 1)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    count = 300 if args.quick else args.count
    paths = photos(count)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows: list[dict] = []
    starts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cf-ray-bench-") as tmp:
        work = Path(tmp)
        # the model's first load (file cache, torch import) is paid here, not by the first row
        one_run(args, paths[:16], work, "warm-up")
        for round_no in range(1, args.rounds + 1):
            cpus = run_round(args, paths, work, round_no, rows, starts)
    start = statistics.median(starts)
    header = {"model": spec(args).label, "precision": args.precision, "photos": count, "rounds": args.rounds,
              "cpus": config.usable_cores(), "ray_cpus": cpus, "ray_cluster_start_s": start,
              "median_ratio": median_ratios(rows),
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps({**header, "rows": rows}))
        return 0
    print(f"model: {header['model']} | {args.precision} | {count} CIFAR-10 test photos | "
          f"{header['cpus']} CPUs (Ray: {cpus}) | load average {os.getloadavg()[0]:.1f} (1 min), "
          f"{os.getloadavg()[1]:.1f} (5 min)")
    print(f"{'run':<32} {'images':>6} {'seconds':>8} {'img/s':>8} {'ratio':>6} {'actors':>6} "
          f"{'threads':>8} {'1st block s':>11} {'load':>5}")
    for r in rows:
        print(f"{r['run']:<32} {r['images']:>6} {r['seconds']:>8.2f} {r['img_s']:>8.2f} {r['ratio']:>6.3f} "
              f"{r['actors'] or '-':>6} {str(r['threads']):>8} {r['first_block_s'] or '-':>11} "
              f"{r['load_before']:>5.1f}")
    print(f"ratio = img/s / single process's (target >= 0.85); 1st block s = from the start of the "
          f"encode stage to the first block back (Ray workers start, import torch, load the model); "
          f"the local Ray cluster took {start:.1f} s to start (median), before each round's Ray rows")
    if args.rounds > 1:
        print("median ratio over rounds: " + ", ".join(f"{name} {value:.3f}"
                                                       for name, value in median_ratios(rows).items()))
    return 0


def run_round(args, paths: list[str], work: Path, round_no: int, rows: list[dict], starts: list[float]) -> int:
    """One single-process row, then the Ray rows on a freshly started local cluster; ratios within the round."""
    import ray

    from retrieval.index.ray_engine import ray_stages
    from retrieval.index.ray_pipeline import RayOptions, connected

    suffix = f" (round {round_no})" if args.rounds > 1 else ""
    single = one_run(args, paths, work, f"single process{suffix}")
    single["ratio"] = 1.0
    rows.append(single)
    started = time.perf_counter()
    with connected(None):
        starts.append(round(time.perf_counter() - started, 2))
        for actors in (1, 2):
            name = f"ray, {actors} encoder actor" + "s" * (actors > 1)
            row = one_run(args, paths, work, name + suffix, ray_stages(RayOptions(actors=actors)))
            row["kind"], row["ratio"] = name, round(row["img_s"] / single["img_s"], 3)
            rows.append(row)
        cpus = int(ray.cluster_resources().get("CPU", 0))
    return cpus


def median_ratios(rows: list[dict]) -> dict[str, float]:
    """Each Ray row kind's median ratio to its own round's single process."""
    kinds = sorted({r["kind"] for r in rows if "kind" in r})
    return {k: round(statistics.median(r["ratio"] for r in rows if r.get("kind") == k), 3) for k in kinds}


if __name__ == "__main__":
    sys.exit(main())
