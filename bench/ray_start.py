"""What a Ray worker process pays before its first batch: the encoder actor's and a decode task's start-up.

    .venv/bin/python bench/ray_start.py            # ViT-B-32 random weights, 3 fresh processes per row
    .venv/bin/python bench/ray_start.py --quick    # 1 process per row
    .venv/bin/python bench/ray_start.py --json

Each row runs, in a fresh interpreter, what the worker does (no cluster: Ray's own
process start, ~1.5 s of `import ray`, comes on top of every row), and reports the
median CPU and wall seconds of each step:
  * actor, lean: `ImageEncoder(...)` as the engine builds it today (imports without
    transformers/timm when the model needs neither), then its first batch of 32;
  * actor, full imports: the same with a plain `import open_clip` first (as before);
  * decode task, numpy: unpickle the Pillow+numpy config, decode 32 CIFAR photos;
  * decode task, torch: unpickle open_clip's transform (imports torch, torchvision,
    open_clip), decode the same 32 photos (as before).
CPU seconds are steadier than wall seconds on a shared machine; quote wall only when quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

ACTOR = """
import json, sys, time
marks = [("start", time.process_time(), time.perf_counter())]
def mark(name): marks.append((name, time.process_time(), time.perf_counter()))
import numpy as np
from retrieval.index.ray_pipeline import ImageEncoder
mark("import ray_pipeline")
import torch
mark("import torch")
if {full}:
    import open_clip
else:
    from retrieval.model.lean_import import import_open_clip
    from retrieval.model.spec import ModelSpec
    import_open_clip(ModelSpec.from_json({spec!r}))
mark("import open_clip")
encoder = ImageEncoder({spec!r}, "cpu", "fp32", 0, {threads}, embed_dim=512)
mark("build model")
rng = np.random.default_rng(0)
encoder({{"key": np.arange(32), "ok": np.ones(32, bool), "pixels": rng.random((32, 3, 224, 224), np.float32)}})
mark("first batch of 32")
print(json.dumps([(b[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks, marks[1:])]))
"""

DECODE = """
import json, pickle, sys, time
marks = [("start", time.process_time(), time.perf_counter())]
def mark(name): marks.append((name, time.process_time(), time.perf_counter()))
import numpy as np
from retrieval.index.ray_pipeline import decode_files
mark("import ray_pipeline")
preprocess = pickle.loads(open({pickled!r}, "rb").read())
mark("unpickle the transform")
batch = {{"key": np.arange(32), "path": np.asarray([p.encode() for p in {files!r}], object)}}
decode_files(batch, preprocess, 224)
mark("decode 32 photos")
marks.append(("torch imported: " + str("torch" in sys.modules), marks[-1][1], marks[-1][2]))
print(json.dumps([(b[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks, marks[1:])]))
"""


def fresh(code: str) -> list:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_steps(runs: list[list]) -> list[dict]:
    return [{"step": steps[0][0], "cpu_s": round(statistics.median(s[1] for s in steps), 2),
             "wall_s": round(statistics.median(s[2] for s in steps), 2)} for steps in zip(*runs)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one process per row")
    parser.add_argument("--model", default="ViT-B-32", help="architecture with random weights")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    import open_clip

    from bench.ray_engine import photos
    from retrieval.index.ray_pipeline import pixel_transform
    from retrieval.model.spec import ModelSpec

    spec = ModelSpec(model=args.model, random_weights=True).to_json()
    _, _, transform = open_clip.create_model_and_transforms(args.model)
    files = photos(32)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, preprocess in (("numpy", pixel_transform(transform)), ("torch", transform)):
            pickled = str(Path(tmp) / f"{name}.pkl")
            Path(pickled).write_bytes(pickle.dumps(preprocess))
            rows[f"decode task, {name}"] = median_steps(
                [fresh(DECODE.format(pickled=pickled, files=files)) for _ in range(repeats)])
        for name, full in (("lean", False), ("full imports", True)):
            rows[f"actor, {name}"] = median_steps(
                [fresh(ACTOR.format(full=full, spec=spec, threads=os.cpu_count() or 1)) for _ in range(repeats)])
    load = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps({"model": args.model, "repeats": repeats, "load_average": load, "rows": rows}))
        return 0
    print(f"model: {args.model} random weights | {os.cpu_count()} CPUs | medians of {repeats} fresh "
          f"process(es) | load average {load[0]} (1 min), {load[1]} (5 min)")
    print(f"{'row':<22} {'step':<26} {'CPU s':>6} {'wall s':>7}")
    for row, steps in rows.items():
        for step in steps:
            if step["step"].startswith("torch imported"):
                print(f"{row:<22} {step['step']:<26}")
                continue
            print(f"{row:<22} {step['step']:<26} {step['cpu_s']:>6.2f} {step['wall_s']:>7.2f}")
        print(f"{row:<22} {'total':<26} {sum(s['cpu_s'] for s in steps):>6.2f} {sum(s['wall_s'] for s in steps):>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
