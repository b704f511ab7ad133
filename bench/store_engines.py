"""PostgreSQL vs SQLite as the library's store: bulk insert, filtered search, readers under a writer.

    .venv/bin/python bench/store_engines.py            # 100k rows of 512-d vectors per engine
    .venv/bin/python bench/store_engines.py --quick    # 10k rows, shorter runs
    .venv/bin/python bench/store_engines.py --json

Each engine gets a fresh library holding N image rows with 512-d float32 vectors (2 KB each,
the size ViT-B/32 makes), written as `clipfind index` writes them: `INSERT` of a batch of rows
per transaction, through the change-log triggers. PostgreSQL is a server of our own
(tests/pg_server.py: initdb in a temp dir, loopback TCP) with its default durability (fsync
on), against SQLite in WAL mode with synchronous=FULL, as clipfind runs it.

- **bulk insert**: rows/s over all N rows, batches of --batch rows per commit.
- **filtered search**: the real `Searcher` (query vector given, so no model runs): a folder
  filter (10% of rows), a date filter (~25%), and a tag filter (1%); p50/p95 ms of the whole
  search (SQL filter, FAISS with an id selector, fetching the rows).
- **readers under a writer**: R reader processes search with the folder filter in a loop while
  one writer process inserts batches (as `index` does, under the write lock); queries/s and
  p95 over all readers, and the writer's rows/s meanwhile.

The load average is in the header: on a shared machine, figures mean little without it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

DIM = 512
FOLDERS = 10  # rows are spread over /bench/f0 .. f9: a folder filter selects 10%


def unit_rows(rng, start: int, count: int) -> list[dict]:
    import numpy as np

    from retrieval.store.schema import utcnow

    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    base = datetime(2020, 1, 1)
    now = utcnow()
    return [{"path": f"/bench/f{(start + i) % FOLDERS}/img_{start + i:08d}.jpg", "size": 50_000 + i,
             "mtime_ns": 1_700_000_000_000_000_000 + start + i, "content_hash": f"{start + i:032x}",
             "width": 640, "height": 480, "format": "JPEG",
             "taken_at": base + timedelta(hours=start + i), "embedding": vectors[i].tobytes(),
             "added_at": now} for i in range(count)]


def open_library(root: Path, url: str | None):
    from retrieval.store.library import Library

    return Library.open(root, db=url)


def insert_rows(library, n: int, batch: int, seed: int, offset: int = 0) -> float:
    """Insert n rows in batches (one transaction each); returns seconds."""
    import numpy as np
    from sqlalchemy import insert

    from retrieval.store.schema import Image

    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for start in range(0, n, batch):
        rows = unit_rows(rng, offset + start, min(batch, n - start))
        with library.session() as s, s.begin():
            s.execute(insert(Image), rows)
    return time.perf_counter() - started


def add_tags(library, every: int = 100) -> None:
    from sqlalchemy import text

    with library.engine.begin() as conn:
        run_id = conn.execute(text(
            "INSERT INTO tag_runs (name, strategy, labels, params, created_at) "
            "VALUES ('bench', 'raw', '[\"rare\"]', '{}', '2026-01-01') RETURNING id")).scalar_one()
        conn.execute(text(f"INSERT INTO tags (tag_run_id, image_id, label, score, rank) SELECT :r, id, "
                          f"'rare', 0.5, 1 FROM images WHERE id % {every} = 0"), {"r": run_id})


def make_searcher(library):
    import numpy as np

    from retrieval.query.search import Searcher
    from retrieval.query.textcache import TextCache

    searcher = Searcher(library, cache=TextCache(None))
    rng = np.random.default_rng(7)

    def query_vector(_query, _warnings):
        v = rng.standard_normal(DIM).astype(np.float32)
        return v / np.linalg.norm(v), set()

    searcher.query_vector = query_vector  # a given vector: this measures the store, not a model
    return searcher


def filtered_latency(library, n: int, queries: int) -> dict[str, dict]:
    from retrieval.query.types import Filters, Query

    searcher = make_searcher(library)
    searcher.search(Query.build("warm"), k=10)
    quarter = datetime(2020, 1, 1) + timedelta(hours=int(n * 0.75))  # the newest quarter of taken_at
    cases = {"none": Filters(), "folder (10%)": Filters(path="/bench/f3"),
             "date (~25%)": Filters(after=quarter), "tag (1%)": Filters(tags=["rare"])}
    out = {}
    for name, filters in cases.items():
        times, hits = [], 0
        for _ in range(queries):
            started = time.perf_counter()
            response = searcher.search(Query.build("q"), k=10, filters=filters)
            times.append((time.perf_counter() - started) * 1000)
            hits += len(response.results)
        times.sort()
        out[name] = {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
                     "results": hits / queries}
    return out


def _reader(root: str, url: str | None, seconds: float, queue) -> None:
    from retrieval.query.types import Filters, Query

    library = open_library(Path(root), url)
    searcher = make_searcher(library)
    searcher.search(Query.build("warm"), k=10)
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        searcher.search(Query.build("q"), k=10, filters=Filters(path="/bench/f3"))
        times.append((time.perf_counter() - started) * 1000)
    library.close()
    queue.put(times)


def _writer(root: str, url: str | None, seconds: float, batch: int, offset: int, queue) -> None:
    library = open_library(Path(root), url)
    written = 0
    end = time.monotonic() + seconds
    with library.write_lock():
        started = time.perf_counter()
        while time.monotonic() < end:
            insert_rows(library, batch, batch, seed=offset + written, offset=offset + written)
            written += batch
        elapsed = time.perf_counter() - started
    library.close()
    queue.put(written / elapsed)


def readers_under_writer(root: Path, url: str | None, n: int, readers: int, seconds: float,
                         batch: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(str(root), url, seconds, queue)) for _ in range(readers)]
    procs.append(ctx.Process(target=_writer, args=(str(root), url, seconds, batch, n + 10_000_000, queue)))
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    times = sorted(t for r in results if isinstance(r, list) for t in r)
    writer = next(r for r in results if not isinstance(r, list))
    return {"readers": readers, "queries_per_s": len(times) / seconds,
            "p50_ms": statistics.median(times) if times else None,
            "p95_ms": times[int(0.95 * (len(times) - 1))] if times else None,
            "writer_rows_per_s": writer}


def bench_engine(name: str, url: str | None, work: Path, args) -> dict:
    root = work / name
    library = open_library(root, url)
    library.set_meta("model", {"label": f"synthetic {DIM}-d vectors", "embed_dim": DIM,
                               "fingerprint": "store-bench", "spec": {}, "preprocess": ""})
    seconds = insert_rows(library, args.rows, args.batch, seed=1)
    add_tags(library)
    library.vectors()  # build and save the FAISS cache, as `index` does at its end
    result = {"engine": name, "rows": args.rows, "insert_rows_per_s": args.rows / seconds,
              "search": filtered_latency(library, args.rows, args.queries)}
    library.close()
    result["concurrent"] = readers_under_writer(root, url, args.rows, args.readers, args.seconds, args.batch)
    return result


def print_table(results: list[dict], header: str) -> None:
    print(header)
    cols = [r["engine"] for r in results]
    print(f"{'':44}" + "".join(f"{c:>14}" for c in cols))
    print(f"{'bulk insert (rows/s)':44}" + "".join(f"{r['insert_rows_per_s']:>14,.0f}" for r in results))
    for case in results[0]["search"]:
        print(f"{'search, filter ' + case + ' p50 / p95 (ms)':44}" + "".join(
            f"{r['search'][case]['p50_ms']:>7.1f} /{r['search'][case]['p95_ms']:>5.1f}" for r in results))
    c = results[0]["concurrent"]["readers"]
    print(f"{f'{c} readers + 1 writer: queries/s':44}" + "".join(
        f"{r['concurrent']['queries_per_s']:>14.1f}" for r in results))
    print(f"{'  reader p50 / p95 (ms)':44}" + "".join(
        f"{r['concurrent']['p50_ms']:>7.1f} /{r['concurrent']['p95_ms']:>5.1f}" for r in results))
    print(f"{'  writer meanwhile (rows/s)':44}" + "".join(
        f"{r['concurrent']['writer_rows_per_s']:>14,.0f}" for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k rows, 30 queries, 5 s of concurrency")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--batch", type=int, default=256, help="rows per transaction (the indexer's batch)")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.rows = args.rows or (10_000 if args.quick else 100_000)
    args.queries = args.queries or (30 if args.quick else 200)
    args.seconds = args.seconds or (5.0 if args.quick else 20.0)

    from tests.pg_server import PostgresServer

    work = Path(tempfile.mkdtemp(prefix="clipfind-store-bench-"))
    server = PostgresServer(settings="").start()  # PostgreSQL's default durability: fsync on
    try:
        results = [bench_engine("sqlite", None, work, args),
                   bench_engine("postgresql", server.database(), work, args)]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    header = (f"store engines: {args.rows:,} rows of {DIM}-d vectors, batch {args.batch}, "
              f"{os.cpu_count()} cpus, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        print(json.dumps({"header": header, "results": results}, indent=2))
    else:
        print_table(results, header)


if __name__ == "__main__":
    main()
