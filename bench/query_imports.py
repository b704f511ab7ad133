"""What a fresh `clipfind search --no-server` spends importing, by package, for one or more checkouts.

    .venv/bin/python bench/query_imports.py                          # this checkout, 7 processes
    .venv/bin/python bench/query_imports.py --before ../main          # ... against another checkout
    .venv/bin/python bench/query_imports.py --image --quick --json    # an image query, 3 processes

Each run is a real `python -X importtime -m retrieval.cli search TEXT -L LIB --no-server`
(a text never asked before, so the text tower runs; `--image`: a drawn JPEG that is
not in the library) with PYTHONPATH set to the checkout. Every import the process
makes counts, wherever it happens (at start-up, or lazily while opening the
library and the ONNX session): `total` is the sum of all modules' own times,
`by package` the same sum per top-level package (exclusive, so the columns add
up to the total); `wall` is the whole process (importtime itself adds a little).
The library is bench/cold_query.py's (ViT-B-32, random weights, 1,000 synthetic
vectors, built there if missing). Medians; the load average is printed: on a
shared machine compare the checkouts of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
SHOWN = ("sqlalchemy", "alembic", "numpy", "faiss", "onnxruntime", "click", "PIL", "torch", "retrieval")
_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(stderr: str) -> dict[str, float]:
    """Seconds of own import time per top-level package, and "total", from -X importtime output."""
    by_package: dict[str, float] = defaultdict(float)
    for match in _LINE.finditer(stderr):
        by_package[match.group(4).split(".")[0]] += int(match.group(1)) / 1e6
    by_package["total"] = sum(by_package.values())
    return dict(by_package)


def one_query(checkout: Path, library: Path, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "retrieval.cli", "search", *args,
                          "-L", str(library), "--no-server", "-k", "10"],
                         capture_output=True, text=True, cwd=checkout, env=env)
    wall = time.perf_counter() - started
    if out.returncode != 0 or "rank" not in out.stdout:
        raise RuntimeError(f"search in {checkout} failed: {out.stderr[-600:]}")
    return {**parse_importtime(out.stderr), "wall": wall}


def measure(checkout: Path, library: Path, repeats: int, image: Path | None) -> dict:
    runs = []
    for i in range(repeats):
        rng = random.Random(time.time_ns() + i)
        args = ["--image", str(image)] if image else [f"a photo of a {rng.choice(['red', 'old', 'tiny'])} "
                                                      f"{rng.choice(['dog', 'car', 'boat'])} {rng.randrange(10**9)}"]
        runs.append(one_query(checkout, library, args))
    keys = sorted({k for run in runs for k in run})
    return {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys} | {"n": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, action="append", default=[],
                        help="another checkout to measure first (repeatable), e.g. ../main")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image", action="store_true", help="an image query instead of a text one")
    parser.add_argument("--quick", action="store_true", help="3 processes per checkout")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    from cold_query import DEFAULT_WORK, build, query_images

    from retrieval.model.spec import ModelSpec

    library = build(DEFAULT_WORK, 1000, ModelSpec(model="ViT-B-32", random_weights=True))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="query-imports-") as tmp:
        image = query_images(Path(tmp), 1)[0] if args.image else None
        rows = [{"checkout": str(c.resolve()), **measure(c.resolve(), library, repeats, image)}
                for c in [*args.before, REPO]]
    report = {"query": "image" if args.image else "text", "load_before": load_before,
              "load_after": os.getloadavg()[0], "cores": len(os.sched_getaffinity(0)), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"# query_imports: fresh `clipfind search --no-server` ({report['query']} query), ViT-B-32 random "
          f"weights, 1,000 vectors; medians of {repeats}; seconds; {report['cores']} cores, load average "
          f"{load_before:.2f} at start, {report['load_after']:.2f} at end")
    print(f"{'checkout':<28} {'wall':>6} {'imports':>8} " + " ".join(f"{p:>11}" for p in SHOWN) + f" {'other':>7}")
    for row in rows:
        other = row["total"] - sum(row.get(p, 0.0) for p in SHOWN)
        print(f"{Path(row['checkout']).name[:28]:<28} {row['wall']:6.2f} {row['total']:8.3f} "
              + " ".join(f"{row.get(p, 0.0):11.3f}" for p in SHOWN) + f" {other:7.3f}")
    print("# by package: each module's own import time, summed per top-level package (the columns add up "
          "to 'imports'); 'other' is the standard library and the rest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
