"""Concept speed: `concept learn` on 16 positives against a 100k-vector library, and what concept search adds.

    .venv/bin/python bench/concept_speed.py                 # 100k vectors, ViT-B-32 size (512-d)
    .venv/bin/python bench/concept_speed.py --size 20000 --json

Library: N rows of random unit vectors in real SQLite rows with the FAISS index
the library chooses for N (built by bench/query_latency.py's `build_library`,
cached under --work), bound to ViT-B-32 with random weights so vectors and the
text tower are real-size. 16 of the rows are made real files (drawn PNGs), so
`concept learn` reuses their stored vectors as it would in use.

Rows (medians of --repeats, warm: model loaded, one process):
  learn, no prompt      learn_concept(): read 16 positives, sample 2,048 negatives, fit, save
  learn, with prompt    the same with --prompt (its text vector from the cache after the first)
  query: text (cached)  Searcher.search of a cached text: the baseline
  query: concept        the concept alone
  query: text + concept both; "adds" = this minus the baseline
Targets (issue 13): learn < 2 s on 2 cores; concept search adds < 5 ms to a warm query.
The machine is shared: the load average is printed, and ratios to the baseline
measured in the same run are the numbers to compare between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
DEFAULT_WORK = Path(os.environ.get("CLIPFIND_CACHE", Path.home() / ".cache" / "clipfind")) / "bench" / "concepts"
POSITIVES = 16


def make_positive_files(library, folder: Path) -> list[str]:
    """Turn the first POSITIVES rows into real files on disk (their stored vectors stay)."""
    from sqlalchemy import text

    from retrieval.media import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with library.engine.begin() as conn:
        ids = conn.execute(text("SELECT id FROM images ORDER BY id LIMIT :n"), {"n": POSITIVES}).scalars().all()
        for i, image_id in enumerate(ids):
            path = folder / f"positive_{i:02d}.png"
            if not path.exists():
                synthetic.draw("red circle", 64, random.Random(f"bench/{i}")).save(path)
            st = path.stat()
            conn.execute(text("UPDATE images SET path = :p, size = :s, mtime_ns = :m WHERE id = :id"),
                         {"p": str(path), "s": st.st_size, "m": st.st_mtime_ns, "id": image_id})
            paths.append(str(path))
    return paths


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def run(size: int, repeats: int, queries: int, work: Path) -> dict:
    from bench.query_latency import build_library
    from retrieval.learn.concepts import learn_concept
    from retrieval.model.encoder import Encoder, ModelSpec
    from retrieval.query.search import Query, Searcher
    from retrieval.query.textcache import TextCache
    from retrieval.store.library import Library

    load_before = os.getloadavg()[0]
    encoder = Encoder(ModelSpec(model="ViT-B-32", random_weights=True))
    root = build_library(work / f"lib-{size}", size, encoder)
    with Library.open(root, create=False) as library:
        library.bind_encoder(encoder)
        positives = make_positive_files(library, work / "positives")
        searcher = Searcher(library, cache=TextCache(None))
        learn_concept(library, "warm", positives, replace=True, searcher=searcher)  # warm-up (imports, caches)
        learn_plain = timed(lambda: learn_concept(library, "bench", positives, replace=True, searcher=searcher),
                            repeats)
        learn_prompt = timed(lambda: learn_concept(library, "bench-p", positives, prompt="a photo of a red circle",
                                                   replace=True, searcher=searcher), repeats)
        kinds = {"query: text (cached)": Query.build("a red circle"),
                 "query: concept": Query.build(concepts=["bench"]),
                 "query: text + concept": Query.build("a red circle", concepts=["bench"])}
        for query in kinds.values():
            searcher.search(query, k=10)
        latency, relevance_ms = {}, []
        for _ in range(queries):  # interleaved, so load changes hit every kind alike
            for name, query in kinds.items():
                response = searcher.search(query, k=10)
                latency.setdefault(name, []).append(response.timings["total"])
                relevance_ms.append(response.timings.get("relevance", 0.0))
        factory = library.vectors(sync=False).state.factory
    base = statistics.median(latency["query: text (cached)"])
    rows = [{"what": "learn, no prompt", "ms": statistics.median(learn_plain), "target_ms": 2000},
            {"what": "learn, with prompt", "ms": statistics.median(learn_prompt), "target_ms": 2000}]
    rows += [{"what": name, "ms": statistics.median(values)} for name, values in latency.items()]
    for row in rows:
        row["x_baseline_query"] = row["ms"] / base
    adds = statistics.median(latency["query: text + concept"]) - base
    return {"size": size, "dim": encoder.embed_dim, "factory": factory, "repeats": repeats, "queries": queries,
            "cores": len(os.sched_getaffinity(0)), "load_before": load_before, "load_after": os.getloadavg()[0],
            "rows": rows, "concept_adds_ms": adds, "relevance_stage_ms_p50": statistics.median(relevance_ms)}


def table(result: dict) -> str:
    lines = [f"concept speed | {result['size']:,} vectors of {result['dim']}-d ({result['factory']}) | "
             f"{result['cores']} CPUs, load average {result['load_before']:.1f} before, "
             f"{result['load_after']:.1f} after",
             f"{'what':<24}  {'median ms':>10}  {'x baseline query':>16}  target"]
    for r in result["rows"]:
        target = f"< {r['target_ms']} ms: {'met' if r['ms'] < r['target_ms'] else 'NOT met'}" if "target_ms" in r else ""
        lines.append(f"{r['what']:<24}  {r['ms']:>10.1f}  {r['x_baseline_query']:>16.2f}  {target}")
    adds = result["concept_adds_ms"]
    lines.append(f"concept search adds {adds:.2f} ms to a warm cached-text query (target < 5 ms: "
                 f"{'met' if adds < 5 else 'NOT met'}); the relevance stage (every query) p50 "
                 f"{result['relevance_stage_ms_p50']:.2f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5, help="learn runs per row")
    parser.add_argument("--queries", type=int, default=50, help="queries per kind")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.size, args.repeats, args.queries, args.work)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
