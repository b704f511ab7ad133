"""One-shot ONNX Runtime cost of a query: session load + first encode, per session setting.

    .venv/bin/python bench/onnx_session.py                       # the cold_query ViT-B-32 library's export
    .venv/bin/python bench/onnx_session.py --export DIR --quick  # any export folder, 2 processes a cell
    .venv/bin/python bench/onnx_session.py --kind image --threads 1,2

Each sample is a fresh process (what `clipfind search` pays), cells taken in turn: it imports
onnxruntime (not timed), opens the tower's session with the given options
("load"), encodes one query ("encode": a text as the 5 photo templates, or one
224x224 image already preprocessed) and a second one ("again", what a warm
server pays). "cpu" columns are the process's CPU seconds for load and encode
(all its threads): steadier than wall time on a busy machine. Peak RSS is the
child's ru_maxrss. Settings:

    threads   intra-op threads of the session
    tokens    text only: "cut" to the longest template (a dynamic-length export) or "full" context
    opt       graph optimisation level: none, basic, extended, all
    prepack   pre-packed weights (faster runs, slower load, copies the memory-mapped weights)
    spin      whether idle pool threads spin (ONNX Runtime's default) or sleep

Compare the ratios of one run: on a shared machine absolute times move with the load
average printed in the header.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

CHILD = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
from retrieval.model.onnx_export import read_manifest
from retrieval.model.onnx_text import trim
from retrieval.model.tokenizer import BpeTokenizer
from retrieval.prompting.templates import PHOTO_TEMPLATES
folder, kind, threads, tokens_mode, opt, prepack, spin, text = sys.argv[1:9]
manifest = read_manifest(folder)
levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
if kind == "text":
    tok = BpeTokenizer(f"{folder}/bpe_simple_vocab_16e6.txt.gz", manifest["tokenizer"]["context_length"])
    def batch(t):
        out = tok([template.format(t) for template in PHOTO_TEMPLATES])
        return trim(out, tok.eot) if tokens_mode == "cut" else out
    inputs = [batch(text), batch(text + " again")]
else:
    size = manifest["preprocess"]["size"]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 3, *size), dtype=np.float32) for _ in range(2)]
t0, c0 = time.perf_counter(), time.process_time()
options = ort.SessionOptions()
options.intra_op_num_threads = int(threads)
options.inter_op_num_threads = 1
options.graph_optimization_level = levels[opt]
options.log_severity_level = 3
options.enable_mem_pattern = False
if prepack == "off":
    options.add_session_config_entry("session.disable_prepacking", "1")
options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin == "on" else "0")
name = "tokens" if kind == "text" else "pixels"
session = ort.InferenceSession(f"{folder}/{manifest['files'][kind]['name']}", options,
                               providers=["CPUExecutionProvider"])
t1, c1 = time.perf_counter(), time.process_time()
session.run(None, {name: inputs[0]})
t2, c2 = time.perf_counter(), time.process_time()
session.run(None, {name: inputs[1]})
t3 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "encode": t2 - t1, "again": t3 - t2, "load_cpu": c1 - c0,
                  "encode_cpu": c2 - c1, "length": int(inputs[0].shape[-1]),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

DEFAULT_EXPORT_GLOB = "bench/cold/ViT-B-32-random-1000/onnx/*/fp32"


def default_export() -> Path:
    cache = Path(os.environ.get("CLIPFIND_CACHE", Path.home() / ".cache" / "clipfind"))
    found = sorted(cache.glob(DEFAULT_EXPORT_GLOB))
    if not found:
        raise SystemExit(f"no export under {cache}/{DEFAULT_EXPORT_GLOB}: run bench/cold_query.py --quick "
                         "first, or pass --export DIR")
    return found[0]


def run_once(folder: Path, kind: str, setting: dict, i: int) -> dict:
    args = [str(folder), kind, str(setting["threads"]), setting["tokens"], setting["opt"],
            setting["prepack"], setting["spin"], f"a photo of a striped dog number {i} {os.getpid()}"]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-800:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(samples: list[dict]) -> dict:
    row = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    row["one_shot"] = statistics.median(s["load"] + s["encode"] for s in samples)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, help="an export folder (default: the cold_query library's)")
    parser.add_argument("--kind", default="text,image")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", default="full,cut")
    parser.add_argument("--opt", default="basic,extended,all")
    parser.add_argument("--prepack", default="off,on")
    parser.add_argument("--spin", default="on", help="thread pool spinning while waiting: on (default), off")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 processes a cell, threads 1 and all, opt all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if args.quick:
        args.repeats, args.opt = 2, "all"
        args.threads = ",".join(dict.fromkeys(["1", str(cores)]))
    folder = args.export or default_export()
    load_before = os.getloadavg()[0]
    cells = []
    for kind in args.kind.split(","):
        tokens = args.tokens.split(",") if kind == "text" else ["-"]
        for threads, tok, opt, prepack, spin in itertools.product(
                args.threads.split(","), tokens, args.opt.split(","), args.prepack.split(","), args.spin.split(",")):
            cells.append({"kind": kind, "threads": int(threads), "tokens": tok, "opt": opt, "prepack": prepack,
                          "spin": spin})
    samples: list[list[dict]] = [[] for _ in cells]
    for i in range(args.repeats):  # round-robin: every cell sees the same spread of machine load
        for cell, got in zip(cells, samples):
            got.append(run_once(folder, cell["kind"], cell, i))
    rows = [{**cell, **summarise(got)} for cell, got in zip(cells, samples)]
    report = {"export": str(folder), "cores": cores, "load_before": load_before,
              "load_after": os.getloadavg()[0], "repeats": args.repeats, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"# onnx_session: {folder}; {cores} cores, load average {load_before:.2f} at start, "
          f"{report['load_after']:.2f} at end; medians of {args.repeats} fresh processes; seconds")
    print(f"{'kind':<6} {'threads':>7} {'tokens':<6} {'opt':<9} {'prepack':<7} {'spin':<4} {'length':>6} {'load':>7} "
          f"{'encode':>7} {'one-shot':>8} {'again':>7} {'load cpu':>8} {'enc cpu':>7} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['kind']:<6} {r['threads']:>7} {r['tokens']:<6} {r['opt']:<9} {r['prepack']:<7} {r['spin']:<4} "
              f"{r['length']:>6.0f} {r['load']:7.3f} {r['encode']:7.3f} {r['one_shot']:8.3f} {r['again']:7.3f} "
              f"{r['load_cpu']:8.3f} {r['encode_cpu']:7.3f} "
              f"{r['rss_mb']:11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
