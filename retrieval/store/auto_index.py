"""`--index-type auto`: plan from size and budget, build, tune to the recall target, install.

The steps are separate modules with plain hand-offs (plan -> files -> parameters),
like clip-retrieval's stages: `index_plan` decides, `index_builder` writes,
`tuning` measures, `VectorIndex.install` swaps the result in atomically.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import Engine

from retrieval.store.index_builder import SqlVectorSource, build_index
from retrieval.store.index_files import open_index
from retrieval.store.index_plan import EXACT_LIMIT, plan_index
from retrieval.store.reads import reading
from retrieval.store.tuning import tune
from retrieval.store.vectors import IndexState, VectorIndex, last_log_seq

DEFAULT_RECALL = 0.95
DEFAULT_K = 10


def build_auto(vectors: VectorIndex, engine: Engine, memory_budget: int, recall: float = DEFAULT_RECALL,
               k: int = DEFAULT_K, progress: Callable[[int], None] | None = None,
               exact_limit: int = EXACT_LIMIT) -> dict:
    """Rebuild `vectors` as the planned index, tuned so recall@k reaches `recall`. Writers only."""
    started = time.perf_counter()
    _remove_abandoned_builds(vectors.root)
    with reading(engine) as reads:
        watermark = last_log_seq(reads)
        source = SqlVectorSource(reads, vectors.dim)
        plan = plan_index(source.count(), vectors.dim, memory_budget, exact_limit)
        if plan.kind != "flat":
            built = build_index(source, plan, vectors.root, progress=progress)
            try:
                setting = tune(open_index(built.index_file, plan.on_disk), source, recall, k,
                               uses_codes=plan.kind == "ivf-pq")
            except BaseException:
                shutil.rmtree(built.build_dir, ignore_errors=True)
                raise
    if plan.kind == "flat":
        vectors.rebuild(engine, "Flat")
        vectors.save()
        vectors.drop_unused_data_files()
        return _stats(plan.to_dict(), None, int(vectors.index.ntotal), started)
    state = IndexState(watermark=watermark, factory=plan.factory, nprobe=setting.nprobe, frozen=True,
                       on_disk=plan.on_disk, efsearch=setting.efsearch, refine=setting.refine,
                       plan=plan.to_dict(), tuned=setting.to_dict(), library_id=vectors.library_id)
    vectors.install(built, state)
    return _stats(plan.to_dict(), setting.to_dict(), built.ntotal, started)


def _stats(plan: dict, tuned: dict | None, n: int, started: float) -> dict:
    return {"index_type": plan["factory"], "kind": plan["kind"], "vectors": n, "reason": plan["reason"],
            "tuned": tuned, "seconds": round(time.perf_counter() - started, 3)}


def _remove_abandoned_builds(root: Path) -> None:
    """Temp folders of builds killed part-way (we hold the write lock, so none is running)."""
    for path in Path(root).glob(".index-build-*"):
        shutil.rmtree(path, ignore_errors=True)
