"""Where a cold 10M query's time goes: the index search, then fetching its re-rank rows.

    .venv/bin/python bench/scale_split.py                      # inside a 1 GB cgroup, cold page cache
    .venv/bin/python bench/scale_split.py --one-by-one         # re-rank rows read one by one
    .venv/bin/python bench/scale_split.py --code /tmp/before   # the index search of another checkout

Runs on the index and vectors a `bench/scale.py --full --memory-budget 4G` run left in
its work folder. Root: the page cache is dropped first, then the queries run one at a time
on one thread in a child process inside a cgroup limited to --cap bytes (bench/memory_cap.py).
`--code DIR` imports `retrieval` from another checkout (e.g. a `git worktree` of an older
commit) for an A/B of the index search; the fetch is always this checkout's FileSource.
Prints p50 of each part and of their sum.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

from bench.memory_cap import CapUnavailable, MemoryCap, drop_page_cache  # noqa: E402
from bench.scale import DEFAULT_WORK, FileSource  # noqa: E402


def measure(args) -> str:
    """In the child: time each part of each query."""
    sys.path.insert(0, args.code)
    import faiss
    import numpy as np

    from retrieval.store import tuning
    from retrieval.store.index_files import open_index

    work = Path(args.work)
    tuned = json.loads((work / "setting.json").read_text())["tuned"]
    setting = tuning.SearchSetting(nprobe=tuned["nprobe"], efsearch=tuned["efsearch"], refine=tuned["refine"])
    queries = np.load(work / "queries.npy")[:args.queries]
    source = FileSource(work / "vectors.f32", args.n, args.dim, ask_first=not args.one_by_one)
    faiss.omp_set_num_threads(1)
    index = open_index(work / "index" / "index.faiss", on_disk=True)
    search = getattr(tuning, "search_index", None)  # absent before mapped lists: FAISS's own search
    index_ms, fetch_ms = [], []
    for q in queries:
        started = time.perf_counter()
        if search is not None:
            _, ids = search(index, q[None, :], args.k * setting.refine, setting)
        else:
            _, ids = index.search(q[None, :], args.k * setting.refine, params=tuning.search_params(index, setting))
        searched = time.perf_counter()
        tuning.rerank(q[None, :], ids, source.fetch, args.k)
        index_ms.append((searched - started) * 1000)
        fetch_ms.append((time.perf_counter() - searched) * 1000)
    total = statistics.median(i + f for i, f in zip(index_ms, fetch_ms))
    return (f"index p50 {statistics.median(index_ms):.1f} ms, fetch p50 {statistics.median(fetch_ms):.1f} ms "
            f"({'one by one' if args.one_by_one else 'asked first'}), total p50 {total:.1f} ms")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--cap", type=int, default=10**9, help="cgroup limit in bytes (default 10^9)")
    p.add_argument("--one-by-one", action="store_true", help="read re-rank rows one by one, not asked for first")
    p.add_argument("--code", default=str(HERE.parent.parent), help="the checkout whose `retrieval` searches")
    p.add_argument("--work", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work or str(DEFAULT_WORK / f"{args.n}x{args.dim}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(measure(args))
        return
    if not (Path(args.work) / "setting.json").exists():
        raise SystemExit(f"no 10M build in {args.work}: run bench/scale.py --full --memory-budget 4G first")
    try:
        drop_page_cache()
        with MemoryCap(args.cap) as cap:
            done = subprocess.run([sys.executable, str(HERE), *sys.argv[1:], "--child"], preexec_fn=cap.preexec)
            print(f"  {args.code}: OOM kills {cap.oom_kills()}, group peak {cap.peak() / 1e9:.2f} GB", flush=True)
    except CapUnavailable as err:
        raise SystemExit(f"scale_split: {err}") from None
    if done.returncode:
        raise SystemExit(f"the measuring process failed ({done.returncode})")


if __name__ == "__main__":
    main()
