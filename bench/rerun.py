"""Unchanged re-runs: `clipfind index FOLDER` on a folder the library already holds, as a fresh process.

    .venv/bin/python bench/rerun.py                  # 1,000 and 100,000 files, 5 re-runs each
    .venv/bin/python bench/rerun.py --quick          # 1,000 and 10,000 files, 3 re-runs each
    .venv/bin/python bench/rerun.py --sizes 100000 --profile   # + where one re-run spends its time
    .venv/bin/python bench/rerun.py --quick --compare          # + the same re-runs with the fast path off
    .venv/bin/python bench/rerun.py --json

Targets (issue 17, medians on 2 idle cores): 1,000 files <= 0.5 s, 100,000 files <= 10 s,
and an unchanged re-run imports no torch and loads no model.

The folder: N real JPEG photos (CIFAR-10 train, ../shared/data) copied under distinct
names, 1,000 to a sub-folder, into $CLIPFIND_CACHE/bench/rerun/files-N (made once, never
in the repository). Copies, not hard links, so each name is its own inode as in a real
collection; they repeat a few hundred photos, so the first index (the tiny dev model,
retrieval/devmodels/tiny.py) encodes only those and copies the vector for the rest.
Each re-run is `python -m retrieval.cli index FOLDER -L LIB --json` exactly as the
`clipfind` script runs it: wall time from spawn to exit (interpreter start included),
its CPU time (user + system: on a busy shared machine the figure to compare),
its peak RSS, and the heavy modules it imported (read from sys.modules at exit, by a
one-line wrapper). The first run of each size is a warm-up (page cache), not counted.

An unchanged re-run of a SQLite library is answered by `retrieval.index.rerun` (stdlib only);
`--compare` adds rows with it turned off (the wrapper replaces it by one that declines), i.e.
the full path through SQLAlchemy, the planner and the FAISS catch-up, as before it existed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
from retrieval import config  # noqa: E402

PHOTOS = 300  # distinct photos the folder repeats
PER_FOLDER = 1000
HEAVY = ("torch", "open_clip", "onnxruntime", "faiss", "numpy", "sqlalchemy", "PIL")
TARGETS = {1000: 0.5, 100_000: 10.0}

WRAPPER = ("import sys, json, atexit\n"
           f"atexit.register(lambda: print('HEAVY=' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), "
           "file=sys.stderr))\n"
           "{full}"
           "from retrieval.cli import main\n"
           "sys.argv = ['clipfind', *sys.argv[1:]]\n"
           "main()\n")
FULL_PATH = "import retrieval.index.rerun as fast; fast.unchanged_rerun = lambda *a, **kw: None\n"


def source_photos(count: int) -> list[Path]:
    """`count` CIFAR-10 train photos, spread over the classes."""
    root = config.data_root()
    # ../shared/data beside the checkout (a worktree one level deeper looks one higher)
    found = [p / "shared" / "data" for p in (REPO.parent, REPO.parent.parent) if (p / "shared" / "data").is_dir()]
    root = root or (found[0] if found else REPO.parent / "shared" / "data")
    train = root / "cifar10" / "train"
    if not train.is_dir():
        raise SystemExit(f"no CIFAR-10 photos at {train} (set $CLIPFIND_DATA)")
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    per = -(-count // len(classes))
    photos = [f for c in classes for f in sorted(c.iterdir())[:per]]
    return photos[:count]


def ensure_folder(cache: Path, n: int) -> Path:
    """`cache/files-N`: N copies of PHOTOS photos under distinct names (made once)."""
    folder = cache / f"files-{n}"
    marker = cache / f"files-{n}.done"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    photos = source_photos(PHOTOS)
    print(f"copying {n} photos into {folder} (once) ...", file=sys.stderr)
    for i in range(n):
        sub = folder / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            sub.mkdir(parents=True, exist_ok=True)
        src = photos[i % len(photos)]
        shutil.copyfile(src, sub / f"{src.parent.name}-{i:06d}.jpg")
    marker.write_text(str(n))
    return folder


def clipfind(*args: str, full: bool = False) -> dict:
    """One fresh `clipfind ARGS --json` process: wall seconds, peak RSS, heavy imports, its JSON.
    `full`: with the unchanged-re-run fast path turned off."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True)\n"
               "wall = time.perf_counter() - t\n"
               "sys.stdout.buffer.write(p.stdout); sys.stderr.buffer.write(p.stderr)\n"
               "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
               "print('RSS=' + json.dumps([u.ru_maxrss, wall, u.ru_utime + u.ru_stime]),"
               " file=sys.stderr)\n"
               "sys.exit(p.returncode)\n")
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-c",
                          WRAPPER.replace("{full}", FULL_PATH if full else ""), *args, "--json"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise SystemExit(f"clipfind {' '.join(args)} failed ({out.returncode}): {out.stderr[-1500:]}")
    lines = out.stderr.splitlines()
    rss_kb, wall, cpu = json.loads([ln for ln in lines if ln.startswith("RSS=")][-1][4:])
    heavy = json.loads([ln for ln in lines if ln.startswith("HEAVY=")][-1][6:])
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss_kb / 1024, "heavy": heavy,
            "result": json.loads(out.stdout.strip().splitlines()[-1])}


def ensure_library(cache: Path, n: int, folder: Path) -> Path:
    """A library holding `folder`, indexed once with the tiny dev model."""
    from retrieval.devmodels.tiny import ensure_tiny_model

    lib = cache / f"lib-{n}"
    marker = cache / f"lib-{n}.done"
    if not marker.exists():
        shutil.rmtree(lib, ignore_errors=True)
        print(f"indexing {n} files once into {lib} ...", file=sys.stderr)
        first = clipfind("index", str(folder), "-L", str(lib), "--model-dir", str(ensure_tiny_model()))
        print(f"  first index: {first['wall_s']:.1f} s, {first['result'].get('encoded')} encoded", file=sys.stderr)
        marker.write_text(str(n))
    return lib


def profile(folder: Path, lib: Path, top: int) -> str:
    """One re-run under cProfile (in-process, the CLI's own entry): the top functions by cumulative time."""
    code = ("import cProfile, pstats, io, sys\n"
            "from retrieval.cli import main\n"
            f"sys.argv = ['clipfind', 'index', {str(folder)!r}, '-L', {str(lib)!r}, '--json']\n"
            "p = cProfile.Profile(); p.enable()\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "p.disable(); s = io.StringIO()\n"
            f"pstats.Stats(p, stream=s).sort_stats('cumulative').print_stats({top}); print(s.getvalue(), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.stderr


def measure(cache: Path, n: int, repeats: int, full: bool = False) -> dict:
    folder = ensure_folder(cache, n)
    lib = ensure_library(cache, n, folder)
    clipfind("index", str(folder), "-L", str(lib), full=full)  # warm-up: page cache, .pyc files
    runs = [clipfind("index", str(folder), "-L", str(lib), full=full) for _ in range(repeats)]
    stats = runs[-1]["result"]
    walls = [r["wall_s"] for r in runs]
    cpus = [r["cpu_s"] for r in runs]
    return {"files": n, "path": "full" if full else "fast", "runs": repeats, "median_s": statistics.median(walls), "min_s": min(walls),
            "max_s": max(walls), "cpu_median_s": statistics.median(cpus), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "heavy": sorted({m for r in runs for m in r["heavy"]}), "scanned": stats.get("scanned"),
            "unchanged": stats.get("unchanged"), "encoded": stats.get("encoded"),
            "target_s": TARGETS.get(n), "folder": str(folder), "library": str(lib)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma-separated file counts (default 1000,100000)")
    p.add_argument("--repeats", type=int, default=None, help="timed re-runs per size (default 5; --quick 3)")
    p.add_argument("--quick", action="store_true", help="1,000 and 10,000 files, 3 re-runs (a smoke run)")
    p.add_argument("--profile", action="store_true", help="also profile one re-run of the largest size")
    p.add_argument("--compare", action="store_true", help="also time each size with the fast path off")
    p.add_argument("--cache-dir", type=Path, default=config.cache_root() / "bench" / "rerun")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1000,10000" if args.quick else "1000,100000")).split(",")]
    repeats = args.repeats or (3 if args.quick else 5)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    rows = [measure(args.cache_dir, n, repeats, full) for n in sizes for full in ((False, True) if args.compare else (False,))]
    if args.json:
        print(json.dumps({"rows": rows, "load_average": os.getloadavg()}))
    else:
        print(f"unchanged re-run, fresh process (`clipfind index FOLDER`), tiny dev model | "
              f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"{'files':>8} {'path':>5} {'median s':>9} {'min s':>7} {'max s':>7} {'target s':>9} {'CPU s':>6} {'peak RSS MB':>12}  "
              f"{'unchanged/scanned':>18}  heavy modules imported")
        for r in rows:
            target = f"{r['target_s']:.1f}" if r["target_s"] else "-"
            print(f"{r['files']:>8} {r['path']:>5} {r['median_s']:>9.2f} {r['min_s']:>7.2f} {r['max_s']:>7.2f} {target:>9} "
                  f"{r['cpu_median_s']:>6.2f} {r['peak_rss_mb']:>12.0f}  {r['unchanged']:>8}/{r['scanned']:<9}  {', '.join(r['heavy']) or '-'}")
        print(f"{repeats} timed re-runs per size after one warm-up; encoded in re-runs: "
              f"{sum(r['encoded'] or 0 for r in rows)} (must be 0); torch/open_clip must not be imported; "
              "path fast: index/rerun.py answered, full: the fast path turned off (--compare)")
    if args.profile:
        print(profile(Path(rows[-1]["folder"]), Path(rows[-1]["library"]), 25), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
