"""Scale: the `--index-type auto` index on millions of synthetic CLIP-sized vectors.

    .venv/bin/python bench/scale.py --quick          # 1M x 512-d (the default)
    .venv/bin/python bench/scale.py --full           # 10M x 512-d (needs ~25 GB disk, a quiet machine)
    .venv/bin/python bench/scale.py --n 200000 --memory-budget 64M --json
    .venv/bin/python bench/scale.py --full --memory-budget 4G --search-only --search-cap 1000000000

Vectors: unit-normalised, drawn around `--clusters` random centres (so nearest
neighbours mean something and recall is measurable), written in chunks to a
float32 file on disk, never all in RAM. Queries are drawn the same way with
another seed, so none is in the collection.

Phases run as separate processes so each one's peak memory is its own:
`build` (plan from --memory-budget, train, add in shards, merge on disk, tune
to --recall on 500 held-out stored vectors), then `search` (open memory-mapped,
one query at a time on one thread like `clipfind search`, re-ranking from the
raw file when the plan uses PQ codes). The baseline is exact search, streamed
over the same file in the same run: "speed-up" is exact p50 / index p50.

Peak RSS is the kernel's high-water mark (VmHWM, includes memory-mapped file
pages the kernel may drop); "anon" is the sampled peak of private memory
(RssAnon), what the process really owns. Targets (issue 12): index <= 1/8 of
raw float32, build <= 4 GB, search <= 1 GB, recall@10 >= 0.95, p50 < 20 ms.

Mapped index pages are clean page cache: uncapped, the search's RSS grows with the share of
the index its queries visit. `--search-cap BYTES` (root) drops the page cache and runs the
search phase in a cgroup limited to BYTES (bench/memory_cap.py): if it finishes, with its
recall and p50, the search needed no more than that.
"""

from __future__ import annotations

import os

# FAISS and its BLAS spin-wait in OpenMP barriers; on a shared machine that costs
# 7x (PQ training measured here: 16.4 s -> 2.4 s with a passive wait policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
DEFAULT_WORK = Path(os.environ.get("CLIPFIND_CACHE", Path.home() / ".cache" / "clipfind")) / "bench" / "scale"
GEN_CHUNK = 100_000
SPREAD = 0.9  # noise norm relative to a centre's: clusters overlap, neighbours are not trivial


# -- data -----------------------------------------------------------------------------------------
def centres(dim: int, clusters: int) -> np.ndarray:
    c = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def draw(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = centres(dim, clusters)
    x = c[rng.integers(0, clusters, n)] + (SPREAD / np.sqrt(dim)) * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generate(path: Path, n: int, dim: int, clusters: int) -> float:
    """Write n vectors chunk by chunk (memory: one chunk); reuse the file when it matches.

    Written with plain writes, not through a memmap, whose dirty pages all counted in this
    driver's RSS (18.7 GB of maximum RSS for the 10M run's 20.5 GB file)."""
    meta = path.with_suffix(".json")
    want = {"n": n, "dim": dim, "clusters": clusters, "spread": SPREAD}
    if path.exists() and meta.exists() and json.loads(meta.read_text()) == want:
        return 0.0
    started = time.perf_counter()
    with open(path, "wb") as out:
        for start in range(0, n, GEN_CHUNK):
            stop = min(n, start + GEN_CHUNK)
            out.write(draw(stop - start, dim, clusters, seed=start).tobytes())
    meta.write_text(json.dumps(want))
    return time.perf_counter() - started


class FileSource:
    """The vector file as an index_builder.VectorSource: chunks and rows read into private memory.

    Never through a memmap: its fault-around maps ~64 KB of file around every row touched, so a
    300k-row training sample of a 20 GB file put 13 GB of file pages in the build's RSS (VmHWM
    14 GB, private memory 0.7 GB, in the first 10M run), a cost of this file, not of the index.
    """

    def __init__(self, path: Path, n: int, dim: int, ask_first: bool = True) -> None:
        self.path, self.n, self.dim = path, n, dim
        self.ask_first = ask_first and hasattr(os, "posix_fadvise")

    def count(self) -> int:
        return self.n

    def chunks(self, size: int = 50_000):
        with open(self.path, "rb") as fh:
            for start in range(0, self.n, size):
                m = min(size, self.n - start)
                x = np.fromfile(fh, dtype=np.float32, count=m * self.dim).reshape(m, self.dim)
                yield np.arange(start, start + m, dtype=np.int64), x

    def sample(self, n: int, seed: int = 0):
        rows = np.sort(np.random.default_rng(seed).choice(self.n, size=min(n, self.n), replace=False))
        return rows.astype(np.int64), self.fetch(rows)

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """Rows by positioned reads straight into the result, in file order, as a store hands
        rows back. (A mapping per call was slower: 25 ms for 1,280 cached rows against 15 ms
        for a loop of `os.pread` + copy, and this one's ~6 ms.) Every row is asked for first
        (POSIX_FADV_WILLNEED), so a cold fetch waits for its reads together, not one by one:
        160 cold rows took 13.6 ms one by one (p50, inside a 1 GB cap)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        row_bytes = self.dim * 4
        views = memoryview(out).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            order = np.argsort(ids, kind="stable").tolist()
            for i in order if self.ask_first else ():
                os.posix_fadvise(fd, int(ids[i]) * row_bytes, row_bytes, os.POSIX_FADV_WILLNEED)
            for i in order:
                os.preadv(fd, [views[i * row_bytes:(i + 1) * row_bytes]], int(ids[i]) * row_bytes)
        finally:
            os.close(fd)
        return out


# -- memory ---------------------------------------------------------------------------------------
class PeakMemory:
    """Samples RssAnon every 50 ms; reads VmHWM at the end."""

    def __init__(self) -> None:
        self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.anon = max(self.anon, status_kb("RssAnon"))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.anon = max(self.anon, status_kb("RssAnon"))

    @staticmethod
    def hwm() -> int:
        return status_kb("VmHWM")


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- phases (each in its own process) -----------------------------------------------------------
def phase_build(args) -> dict:
    import faiss

    from retrieval.store.index_builder import build_index
    from retrieval.store.index_files import open_index
    from retrieval.store.index_plan import plan_index
    from retrieval.store.tuning import exact_neighbours, tune

    work = Path(args.work)
    source = FileSource(work / "vectors.f32", args.n, args.dim)
    out = work / "index"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir()
    with PeakMemory() as peak:
        plan = plan_index(args.n, args.dim, args.memory_budget)
        started = time.perf_counter()
        built = build_index(source, plan, out)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        setting = tune(open_index(built.index_file, plan.on_disk), source, args.recall, args.k,
                       uses_codes=plan.kind == "ivf-pq")
        tune_s = time.perf_counter() - started
    for path in (built.index_file,) + ((built.data_file,) if built.data_file else ()):
        os.replace(path, out / path.name)
    queries = draw(args.queries, args.dim, args.clusters, seed=10**9)
    started = time.perf_counter()
    truth = exact_neighbours(source, queries, args.k)
    truth_s = time.perf_counter() - started
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", truth)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    result = {"plan": plan.to_dict(), "tuned": setting.to_dict(), "build_s": build_s, "tune_s": tune_s,
              "truth_s": truth_s, "index_bytes": size, "build_hwm_kb": peak.hwm(), "build_anon_kb": peak.anon,
              "threads": faiss.omp_get_max_threads()}
    (work / "setting.json").write_text(json.dumps({"plan": plan.to_dict(), "tuned": setting.to_dict(),
                                                   "build": result}))
    return result


def phase_tune(args) -> dict:
    """--retune: tune the index the last build left (a new tuning rule) without rebuilding it."""
    from retrieval.store.index_files import open_index
    from retrieval.store.tuning import tune

    work = Path(args.work)
    recorded = json.loads((work / "setting.json").read_text())
    plan = recorded["plan"]
    source = FileSource(work / "vectors.f32", args.n, args.dim)
    with PeakMemory() as peak:
        started = time.perf_counter()
        setting = tune(open_index(work / "index" / "index.faiss", plan["kind"] in ("ivf-flat", "ivf-pq")),
                       source, args.recall, args.k, uses_codes=plan["kind"] == "ivf-pq")
        tune_s = time.perf_counter() - started
    (work / "setting.json").write_text(json.dumps({**recorded, "tuned": setting.to_dict()}))
    size = sum(p.stat().st_size for p in (work / "index").iterdir() if p.is_file())
    build = recorded.get("build") or {"build_s": None, "build_hwm_kb": None, "build_anon_kb": None}
    return {**build, "plan": plan, "index_bytes": size, "tuned": setting.to_dict(), "tune_s": tune_s,
            "retuned": True, "tune_hwm_kb": peak.hwm(), "tune_anon_kb": peak.anon}


def phase_search(args) -> dict:
    import faiss

    from retrieval.store.index_files import open_index
    from retrieval.store.tuning import SearchSetting, recall_at_k, run_search

    work = Path(args.work)
    recorded = json.loads((work / "setting.json").read_text())
    tuned = recorded["tuned"]
    setting = SearchSetting(nprobe=tuned["nprobe"], efsearch=tuned["efsearch"], refine=tuned["refine"])
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    source = FileSource(work / "vectors.f32", args.n, args.dim)
    faiss.omp_set_num_threads(1)  # one query at a time, like clipfind search (see query/search.py)
    before_anon = status_kb("RssAnon")
    with PeakMemory() as peak:
        index = open_index(work / "index" / "index.faiss", recorded["plan"]["kind"] in ("ivf-flat", "ivf-pq"))
        opened_anon = status_kb("RssAnon")
        found, times = [], []
        fetch = source.fetch if setting.refine > 1 else None
        for q in queries if args.warm_up else ():  # a long-running server's state: these pages were read once
            run_search(index, q[None, :], args.k, setting, fetch)
        for q in queries:
            started = time.perf_counter()
            found.append(run_search(index, q[None, :], args.k, setting, fetch)[0])
            times.append((time.perf_counter() - started) * 1000)
    search_hwm_kb = peak.hwm()  # before the exact baseline below, whose chunks are not the search's
    exact_ms = []
    for q in queries[:args.exact_queries]:
        started = time.perf_counter()
        best = np.full(args.k, -np.inf, np.float32)
        for _, x in source.chunks(50_000):  # 100 MB at a time: a --search-cap must hold this too
            best = np.sort(np.concatenate([best, x @ q]))[-args.k:]
        exact_ms.append((time.perf_counter() - started) * 1000)
    return {"recall": recall_at_k(np.array(found), truth, args.k), "p50_ms": statistics.median(times),
            "p95_ms": float(np.percentile(times, 95)), "exact_p50_ms": statistics.median(exact_ms),
            "search_hwm_kb": search_hwm_kb, "search_anon_kb": peak.anon,
            "open_anon_kb": opened_anon - before_anon}


# -- driver ---------------------------------------------------------------------------------------
def run_phase(name: str, args, cap=None) -> dict:
    cmd = [sys.executable, str(HERE), "--phase", name, "--n", str(args.n), "--dim", str(args.dim),
           "--clusters", str(args.clusters), "--memory-budget", str(args.memory_budget), "--recall",
           str(args.recall), "--k", str(args.k), "--queries", str(args.queries), "--work", str(args.work),
           "--exact-queries", str(args.exact_queries), *(["--warm-up"] if args.warm_up else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap.preexec if cap else None)
    if cap is not None and cap.oom_kills():
        raise SystemExit(f"phase {name} was OOM-killed under a {cap.limit / 1e9:.2f} GB memory cap: it needs more")
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"phase {name} failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def search_phase(args) -> dict:
    """The search phase; from a cold page cache for --cold or --search-cap, inside the cap for the latter."""
    if not (args.cold or args.search_cap):
        return run_phase("search", args)
    from bench.memory_cap import CapUnavailable, MemoryCap, drop_page_cache

    try:
        drop_page_cache()
        if not args.search_cap:
            return run_phase("search", args)
        with MemoryCap(args.search_cap) as cap:
            search = run_phase("search", args, cap)
            return {**search, "cap_bytes": cap.limit, "cap_peak_bytes": cap.peak(), "cap_oom_kills": cap.oom_kills()}
    except CapUnavailable as err:
        raise SystemExit(f"--cold/--search-cap: {err}") from None


def table(args, gen_s: float, build: dict, search: dict) -> str:
    raw = args.n * args.dim * 4
    gb = 1 << 30
    tuned = build["tuned"]
    knob = f"nprobe={tuned['nprobe']}" if tuned["nprobe"] else f"efSearch={tuned['efsearch']}"
    rows = [
        ("index", build["plan"]["factory"], "", ""),
        ("why", build["plan"]["reason"], "", ""),
        ("tuned", f"{knob} refine={tuned['refine']} (recall {tuned['recall']} on {tuned['queries']} held-out)",
         "", ""),
        ("generate vectors", f"{gen_s:.0f} s" if gen_s else "reused", "", ""),
        ("build (train+shards+merge)", _seconds(build["build_s"]), "", ""),
        ("tune" + (" (again, on the index built before)" if build.get("retuned") else "")
         + (" (recorded by the last build)" if build.get("reused") else ""),
         f"{build['tune_s']:.0f} s", "", ""),
        ("index size / raw float32", f"{build['index_bytes'] / raw:.3f} ({build['index_bytes'] / gb:.2f} GiB)",
         "<= 0.125", _ok(build["index_bytes"] / raw <= 0.125)),
        _build_memory_row(build),
        *([("tune peak RSS (anon), this run", f"{build['tune_hwm_kb'] / 2**20:.2f} GiB "
            f"({build['tune_anon_kb'] / 2**20:.2f})", "<= 4 GiB", _ok(build["tune_hwm_kb"] <= 4 * 2**20))]
          if build.get("tune_hwm_kb") else []),
        ("search peak RSS (anon)",
         f"{search['search_hwm_kb'] / 2**20:.2f} GiB ({search['search_anon_kb'] / 2**20:.2f})",
         "<= 1 GiB", _ok(search["search_hwm_kb"] <= 2**20)),
        *([("search memory cap (cgroup), cold page cache",
            f"{search['cap_bytes'] / 1e9:.2f} GB: finished, {search['cap_oom_kills']} OOM kills, "
            f"group peak {search['cap_peak_bytes'] / 1e9:.2f} GB", "", "")] if search.get("cap_bytes") else []),
        ("anon RSS to open the index / index size", f"{search['open_anon_kb'] * 1024 / build['index_bytes']:.3f}",
         "<< 1 (mmap)", ""),
        (f"recall@{args.k} vs exact ({args.queries} new queries)", f"{search['recall']:.3f}",
         f">= {args.recall}", _ok(search["recall"] >= args.recall)),
        ("p50 / p95 query, 1 thread" + _search_state(args), f"{search['p50_ms']:.2f} / {search['p95_ms']:.2f} ms", "p50 < 20 ms",
         _ok(search["p50_ms"] < 20)),
        ("exact search p50 (baseline)", f"{search['exact_p50_ms']:.0f} ms", "", ""),
        ("speed-up vs exact", f"{search['exact_p50_ms'] / search['p50_ms']:.0f}x", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"# bench/scale.py  n={args.n:,} dim={args.dim} clusters={args.clusters} "
             f"budget={args.memory_budget / 2**20:.0f} MiB  cores={os.cpu_count()}  "
             f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    lines += [f"{name:<{width}}  {value:<60} {target:<12} {ok}".rstrip() for name, value, target, ok in rows]
    return "\n".join(lines)


def _search_state(args) -> str:
    cold = " from a cold page cache" if args.cold or args.search_cap else ""
    return cold + (", after a warm-up pass" if args.warm_up else "")


def _seconds(value: float | None) -> str:
    return "not recorded by this run" if value is None else f"{value:.0f} s"


def _build_memory_row(build: dict) -> tuple[str, str, str, str]:
    if build["build_hwm_kb"] is None:
        return ("build peak RSS (anon)", "not recorded by this run", "<= 4 GiB", "")
    if build.get("retuned") or build.get("reused"):  # the recorded build process tuned too
        return ("build peak RSS (anon), recorded", f"{build['build_hwm_kb'] / 2**20:.2f} GiB "
                f"({build['build_anon_kb'] / 2**20:.2f}) incl. its own tuning", "<= 4 GiB", "")
    return ("build peak RSS (anon)", f"{build['build_hwm_kb'] / 2**20:.2f} GiB ({build['build_anon_kb'] / 2**20:.2f})",
            "<= 4 GiB", _ok(build["build_hwm_kb"] <= 4 * 2**20))


def _ok(passed: bool) -> str:
    return "ok" if passed else "MISSED"


def parse_args(argv=None):
    from retrieval.store.index_plan import parse_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1M vectors (the default)")
    size.add_argument("--full", action="store_true", help="10M vectors")
    size.add_argument("--n", type=int)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--memory-budget", default="1G", help="the index's search-time budget (default 1G)")
    p.add_argument("--recall", type=float, default=0.95)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--exact-queries", type=int, default=10)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--retune", action="store_true",
                   help="keep the index the last run built here; tune it again, then search")
    p.add_argument("--search-only", action="store_true",
                   help="keep the index and tuning the last run left here; only search again")
    p.add_argument("--search-cap", default=None,
                   help="root: drop the page cache, then search inside a cgroup limited to this many bytes")
    p.add_argument("--cold", action="store_true", help="root: drop the page cache before searching")
    p.add_argument("--warm-up", action="store_true",
                   help="run the queries once, untimed, before the timed pass (in the same process)")
    p.add_argument("--phase", choices=["build", "tune", "search"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.n = args.n or (10_000_000 if args.full else 1_000_000)
    args.memory_budget = parse_size(args.memory_budget)
    args.search_cap = parse_size(args.search_cap) if args.search_cap else None
    if args.search_only and args.retune:
        p.error("--search-only keeps the last tuning; --retune makes a new one: pick one")
    args.work = args.work or DEFAULT_WORK / f"{args.n}x{args.dim}"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.phase:
        result = {"build": phase_build, "tune": phase_tune, "search": phase_search}[args.phase](args)
        print(json.dumps(result))
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    gen_s = generate(Path(args.work) / "vectors.f32", args.n, args.dim, args.clusters)
    if args.search_only:
        if not (Path(args.work) / "setting.json").exists():
            raise SystemExit(f"--search-only: no earlier build in {args.work}; run without it first")
        build = {**json.loads((Path(args.work) / "setting.json").read_text())["build"], "reused": True}
    else:
        build = run_phase("tune" if args.retune else "build", args)
    search = search_phase(args)
    if args.json:
        print(json.dumps({"n": args.n, "dim": args.dim, "load": os.getloadavg(), "generate_s": gen_s,
                          "build": build, "search": search}))
    else:
        print(table(args, gen_s, build, search))


if __name__ == "__main__":
    main()
