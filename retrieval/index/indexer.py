"""`clipfind index`: folders of images -> rows with embeddings -> FAISS, resumably.

One run: plan (`retrieval.index.planner`: scan, diff, hash; moves, renames,
duplicates and touched-but-unchanged files cost no encoding); apply all of
that in one transaction; then decode in
DataLoader workers while the encoder runs, committing each batch's rows in one
transaction. Nothing is written anywhere else until the end, when the FAISS
cache catches up from the database's `vector_log`. A kill at any moment loses
at most the batch in flight; the next run finds the committed rows unchanged
and carries on with the rest.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, insert, select, text, update

from retrieval.errors import InputError, LibraryError, ModelError
from retrieval.index.planner import (
    Plan,
    Skipped,
    Work,
    check_roots,
    known_rows,
    plan_index,
    stored_ids,
)
from retrieval.index.threads import ThreadTuner
from retrieval.media.images import DEFAULT_MAX_PIXELS
from retrieval.model.spec import ModelSpec
from retrieval.store.library import LOCK_NAME, Library
from retrieval.store.schema import ErrorRow, Image, Run, path_to_db, utcnow, vector_to_blob
from retrieval.store.vectors import EXACT_LIMIT, choose_factory

if TYPE_CHECKING:  # torch loads only when something needs encoding: an unchanged re-run never does
    from retrieval.model.encoder import Encoder

NO_MODEL = "no model given: pass --model-dir DIR, or --model NAME --pretrained TAG"


@dataclass
class IndexOptions:
    workers: int | None = None  # None: pipeline.default_workers()
    threads: int | None = None  # encoder torch threads; None: measured (index/threads.py)
    batch_size: int | None = None  # None: 32 on CPU, 256 on GPU
    follow_symlinks: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    index_type: str | None = None  # any FAISS factory string; None: chosen by size
    progress: bool = False
    wait: bool = False  # wait for the write lock instead of refusing
    dry_run: bool = False
    retry_failed: bool = False  # decode again files that failed before and are unchanged


@dataclass
class IndexResult:
    library: str
    plan: Plan
    stats: dict
    skipped: list[Skipped]
    run_id: int | None = None
    status: str = "done"
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def nothing_indexed(self) -> bool:
        """The roots held something, and not one image of it is usable in the library."""
        usable = self.plan.unchanged + self.stats.get("indexed", 0)
        return bool(self.skipped) and usable == 0


# -- running -----------------------------------------------------------------------------
def index_paths(library: Library, roots: Iterable[str | os.PathLike], spec: ModelSpec | None = None,
                device: str = "auto", precision: str = "auto",
                options: IndexOptions | None = None) -> IndexResult:
    """Bring the library up to date with `roots`; see the module docstring for how."""
    options = options or IndexOptions()
    roots = check_roots(roots)
    if spec is None and library.model_record is None:
        raise ModelError(NO_MODEL)
    if options.dry_run:
        plan = plan_index(library, roots, options.follow_symlinks, options.retry_failed,
                          options.max_pixels)
        return IndexResult(os.path.abspath(library.root), plan, plan.counts(), plan.skipped,
                           dry_run=True)
    with library.write_lock(wait=options.wait):
        return _Run(library, roots, spec, device, precision, options).run()


class _Run:
    """One locked indexing run; the steps share the run id, the stats and the skip list."""

    def __init__(self, library: Library, roots: list[str], spec: ModelSpec | None, device: str,
                 precision: str, options: IndexOptions) -> None:
        self.library, self.roots, self.spec, self.options = library, roots, spec, options
        self.device, self.precision = device, precision
        self.stats: Counter = Counter(indexed=0, encoded=0)
        self.warnings: list[str] = []
        self.failed_digests: dict[str, Skipped] = {}
        self.skipped: list[Skipped] = []

    def run(self) -> IndexResult:
        started = time.perf_counter()
        mark_stale_runs(self.library)
        if self.library.model_record is None:  # a new library: record the model before anything
            encoder = self.library.encoder(self.spec, device=self.device, precision=self.precision)
            self._export_onnx(encoder)
        self.run_id = self.library.start_run("index")
        status, plan = "failed", Plan()
        try:
            plan = plan_index(self.library, self.roots, self.options.follow_symlinks,
                              self.options.retry_failed, self.options.max_pixels)
            self.skipped.extend(plan.skipped)
            self._apply_plan(plan)
            self._encode(plan)
            self._late_copies(plan)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self.stats["skipped"] = len(self.skipped)
            self.stats["seconds"] = round(time.perf_counter() - started, 3)
            stats = {**plan.counts(), **self.stats,
                     "skipped_by_kind": dict(Counter(s.kind for s in self.skipped))}
            try:
                stats["faiss"] = refresh_vectors(self.library, self.options.index_type)
            except BaseException as exc:
                cut = isinstance(exc, KeyboardInterrupt)
                self.library.finish_run(self.run_id, "interrupted" if cut else "failed", stats)
                raise
            self.library.finish_run(self.run_id, status, stats)
        return IndexResult(os.path.abspath(self.library.root), plan, stats, self.skipped, self.run_id,
                           status, warnings=self.warnings)

    def _export_onnx(self, encoder: Encoder) -> None:
        """Export the towers for torch-free queries now, while the model is loaded anyway."""
        from retrieval.store.onnx_exports import ExportError, ensure_export

        try:
            ensure_export(self.library, "fp32", encoder)
        except ExportError as exc:
            self.warnings.append(f"could not export the model to ONNX ({exc}); queries will use torch")

    # -- the first transaction: everything that needs no encoder -----------------------
    def _apply_plan(self, plan: Plan) -> None:
        with self.library.session() as s, s.begin():
            if plan.gone:
                ids = [row_id for row_id, _ in plan.gone]
                for start in range(0, len(ids), 500):
                    s.execute(delete(Image).where(Image.id.in_(ids[start:start + 500])))
            moves = [{"id": w.row_id, **_path_fields(w.entry.path), "size": w.entry.size,
                      "mtime_ns": w.entry.mtime_ns} for w in plan.moves]
            touches = [{"id": w.row_id, "size": w.entry.size, "mtime_ns": w.entry.mtime_ns}
                       for w in plan.touches]
            for batch in (moves, touches):
                if batch:
                    s.execute(update(Image), batch)
            self._copy(s, plan.copies)
            self._record_errors(s, plan.skipped)
        self.stats["indexed"] += len(plan.moves) + len(plan.touches) + len(plan.copies)

    def _copy(self, s, works: list[Work]) -> None:
        """Rows for files whose bytes a stored row already has: its vector, no encoding."""
        if not works:
            return
        sources = {r.id: r for r in s.execute(
            select(Image).where(Image.id.in_({w.source_id for w in works}))).scalars()}
        inserts, updates = [], []
        for w in works:
            src = sources[w.source_id]
            fields = {"size": w.entry.size, "mtime_ns": w.entry.mtime_ns, "content_hash": w.digest,
                      "width": src.width, "height": src.height, "format": src.format,
                      "taken_at": src.taken_at, "embedding": src.embedding, "run_id": src.run_id}
            if w.row_id is None:
                inserts.append({**_path_fields(w.entry.path), **fields})
            else:
                updates.append({"id": w.row_id, **fields})
        if inserts:
            s.execute(insert(Image), inserts)
        if updates:
            s.execute(update(Image), updates)

    def _record_errors(self, s, skipped: list[Skipped]) -> None:
        rows = [{"run_id": self.run_id, "path": path_to_db(k.path)[0], "kind": k.kind,
                 "message": path_to_db(k.message)[0]} for k in skipped if not k.known]
        if rows:
            s.execute(insert(ErrorRow), rows)

    # -- encoding --------------------------------------------------------------------------
    def _encode(self, plan: Plan) -> None:
        if not plan.encode:
            return
        import torch

        from retrieval.media import pipeline

        encoder = self._load_encoder()
        opts = self.options
        threads = torch.get_num_threads()
        tuner = None
        if encoder.device.type == "cpu":
            if opts.threads is None:  # measured on the run's own batches (index/threads.py)
                tuner = ThreadTuner(len(os.sched_getaffinity(0)))
            torch.set_num_threads(opts.threads or (tuner.next_threads() if tuner else 1))
        self.stats.update(threads=torch.get_num_threads(),
                          workers=pipeline.default_workers() if opts.workers is None else opts.workers,
                          batch_size=opts.batch_size or pipeline.default_batch_size(encoder.device))
        loader = pipeline.make_loader(
            [w.entry.path for w in plan.encode], encoder.preprocess, encoder.image_size,
            batch_size=self.stats["batch_size"], workers=self.stats["workers"],
            pin_memory=encoder.device.type == "cuda", max_pixels=opts.max_pixels,
            close_in_workers=[self.library.root / LOCK_NAME])
        bar = _progress(len(plan.encode), opts.progress)
        try:
            for batch in loader:
                vectors = []
                if batch.pixels is not None:
                    if tuner is not None:
                        torch.set_num_threads(tuner.next_threads())
                    started = time.perf_counter()
                    vectors = encoder.encode_pixels(batch.pixels)
                    if tuner is not None:
                        tuner.record(torch.get_num_threads(), len(batch.decoded), time.perf_counter() - started)
                self._commit_batch(plan, batch, vectors)
                self.stats["encoded"] += len(batch.decoded)
                bar.update(len(batch))
        finally:
            bar.close()
            if tuner is not None:  # assigned, not Counter.update (which would add)
                self.stats["threads"], self.stats["thread_rates"] = tuner.chosen, tuner.history
            torch.set_num_threads(threads)

    def _load_encoder(self) -> Encoder:
        library = self.library
        encoder = library.encoder(self.spec, device=self.device, precision=self.precision_to_use())
        if self.options.index_type:
            check_factory(self.options.index_type, encoder.embed_dim)
        with library.session() as s, s.begin():
            run = s.get(Run, self.run_id)
            run.precision, run.device = encoder.precision, str(encoder.device)
            made_with = set(s.scalars(text(
                "SELECT DISTINCT r.precision FROM images i JOIN runs r ON r.id = i.run_id "
                "WHERE r.precision IS NOT NULL")))
        if made_with - {encoder.precision}:
            self.warnings.append(
                f"this library's vectors were made at {', '.join(sorted(made_with))} precision; "
                f"new ones now at {encoder.precision} (re-embed all with one precision for consistency)")
        return encoder

    def precision_to_use(self) -> str:
        """`auto` on a library whose vectors were all made at one CPU precision keeps it.

        Otherwise a new machine, a torch upgrade or a re-measurement could silently add
        vectors of another precision (issue 17); asked for explicitly, any precision goes.
        """
        if self.precision != "auto" or self.device not in ("auto", "cpu"):
            return self.precision
        import torch

        from retrieval.model.encoder import cpu_has_native_bf16
        from retrieval.model.precision import vectors_by_precision

        if self.device == "auto" and torch.cuda.is_available():
            return self.precision
        made_with = set(vectors_by_precision(self.library)) - {"unknown"}
        runnable = {"fp32", "int8"} | ({"bf16"} if cpu_has_native_bf16() else set())
        if len(made_with) == 1 and (only := made_with.pop()) in runnable:
            return only
        return self.precision

    def _commit_batch(self, plan: Plan, batch, vectors) -> None:
        inserts, updates, stale, skipped = [], [], [], []
        for item, vector in zip(batch.decoded, vectors):
            w = plan.encode[item.key]
            fields = {"size": w.entry.size, "mtime_ns": w.entry.mtime_ns, "content_hash": w.digest,
                      "width": item.width, "height": item.height, "format": item.format,
                      "taken_at": item.taken_at, "embedding": vector_to_blob(vector),
                      "run_id": self.run_id}
            if w.row_id is None:
                inserts.append({**_path_fields(w.entry.path), **fields})
            else:
                updates.append({"id": w.row_id, **fields})
        for failure in batch.failed:
            w = plan.encode[failure.key]
            skip = Skipped(w.entry.path, failure.kind, failure.message)
            skipped.append(skip)
            self.failed_digests[w.digest] = skip
            if w.row_id is not None:  # its old vector describes bytes that are gone
                stale.append(w.row_id)
        with self.library.session() as s, s.begin():
            if inserts:
                s.execute(insert(Image), inserts)
            if updates:
                s.execute(update(Image), updates)
            if stale:
                s.execute(delete(Image).where(Image.id.in_(stale)))
            self._record_errors(s, skipped)
        self.skipped.extend(skipped)
        self.stats["indexed"] += len(inserts) + len(updates)

    def _late_copies(self, plan: Plan) -> None:
        """Duplicates of files first seen in this run: copy the vectors encoded above."""
        if not plan.late_copies:
            return
        stored = stored_ids(self.library, {w.digest for w in plan.late_copies}, set())
        ready, failed = [], []
        for w in plan.late_copies:
            if w.digest in stored:
                w.source_id = stored[w.digest]
                ready.append(w)
            else:
                first = self.failed_digests.get(w.digest)
                kind, why = (first.kind, first.message) if first else ("corrupt", "not decoded")
                failed.append(Skipped(w.entry.path, kind, f"{w.entry.path}: same bytes as {why}"))
        with self.library.session() as s, s.begin():
            self._copy(s, ready)
            if failed:
                s.execute(delete(Image).where(Image.id.in_([w.row_id for w in plan.late_copies
                                                               if w.row_id and w.digest not in stored])))
            self._record_errors(s, failed)
        self.skipped.extend(failed)
        self.stats["indexed"] += len(ready)


def _path_fields(path: str) -> dict:
    path_text, raw = path_to_db(path)
    return {"path": path_text, "path_bytes": raw}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="encoding", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()), smoothing=0.1)


# -- shared by index, remove, reindex ----------------------------------------------------
def mark_stale_runs(library: Library) -> int:
    """Runs still 'running' while we hold the write lock were killed: say so.

    Also removes temp files a killed FAISS save left behind.
    """
    for stale in Path(library.root).glob(".index.*.tmp-*"):
        stale.unlink(missing_ok=True)
    with library.session() as s, s.begin():
        result = s.execute(update(Run).where(Run.status == "running")
                           .values(status="interrupted", finished_at=utcnow()))
        return result.rowcount


def check_factory(factory: str, dim: int) -> None:
    """Refuse a FAISS factory string FAISS cannot build, before hours of encoding."""
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputError(f"--index-type {factory!r} is not a FAISS index factory string for "
                         f"{dim}-d vectors ({_faiss_reason(exc)})") from None


def _faiss_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def refresh_vectors(library: Library, factory: str | None = None) -> str:
    """Bring the FAISS cache up to the database, save it, and prune the change log.

    `factory` rebuilds with that index type and remembers it; otherwise a flat
    index that outgrew exact search is rebuilt with the size-based choice.
    Call only under the write lock.
    """
    if library.model_record is None:
        return "none"
    vectors = library.vectors(sync=False)
    if factory is None and library.get_meta("index_type") is None and vectors.load():
        n = library.image_count()
        if vectors.state.factory == "Flat" and n >= EXACT_LIMIT:
            factory = choose_factory(n, library.dim)
    if factory is not None:
        check_factory(factory, library.dim)
        try:
            vectors.rebuild(library.engine, factory)
        except RuntimeError as exc:
            raise InputError(f"cannot build a {factory!r} index over {library.image_count()} vectors: "
                             f"{_faiss_reason(exc)}") from None
        vectors.save()
        action = "rebuilt"
    else:
        action = vectors.sync(library.engine)
    vectors.prune_log(library.engine)
    return action


def rebuild_index(library: Library, factory: str | None = None, wait: bool = False) -> dict:
    """`clipfind reindex`: rebuild FAISS from the database (the same type unless told)."""
    if library.model_record is None:
        raise LibraryError(f"the library at {library.root} has no images yet; nothing to rebuild")
    with library.write_lock(wait=wait):
        mark_stale_runs(library)
        run_id = library.start_run("reindex")
        started = time.perf_counter()
        vectors = library.vectors(sync=False)
        current = vectors.state.factory if vectors.load() else None
        chosen = factory or library.get_meta("index_type") or current or choose_factory(
            library.image_count(), library.dim)
        try:
            refresh_vectors(library, chosen)
        except BaseException:
            library.finish_run(run_id, "failed", {})
            raise
        if factory:
            library.set_meta("index_type", factory)
        stats = {"index_type": chosen, "vectors": int(vectors.index.ntotal),
                 "seconds": round(time.perf_counter() - started, 3)}
        library.finish_run(run_id, "done", stats)
        return stats


def remove_paths(library: Library, paths: Iterable[str | os.PathLike], dry_run: bool = False,
                 wait: bool = False, on_match: Callable[[str], None] | None = None) -> int:
    """Delete the rows of files at or under `paths` (they need not exist on disk)."""
    targets = [os.path.abspath(os.fsdecode(p)) for p in paths]
    with library.write_lock(wait=wait):
        rows = known_rows(library, targets)
        for path in sorted(rows):
            if on_match:
                on_match(path)
        if dry_run or not rows:
            return len(rows)
        mark_stale_runs(library)
        run_id = library.start_run("remove")
        ids = sorted(r[0] for r in rows.values())
        with library.session() as s, s.begin():
            for start in range(0, len(ids), 500):
                s.execute(delete(Image).where(Image.id.in_(ids[start:start + 500])))
        refresh_vectors(library)
        library.finish_run(run_id, "done", {"removed": len(ids), "paths": targets})
        return len(ids)
