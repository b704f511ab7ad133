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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import insert, select, update

from retrieval import config
from retrieval.errors import ModelError
from retrieval.index.planner import (  # noqa: F401 - IndexResult re-exported: what index_paths returns
    IndexResult,
    Plan,
    Skipped,
    Work,
    check_roots,
    known_rows,
    plan_index,
    run_counts,
    run_stats,
    stored_ids,
)
from retrieval.index.refresh import check_factory, refresh_vectors
from retrieval.index.threads import ThreadTuner
from retrieval.index.workers import WorkerTuner
from retrieval.media import remote
from retrieval.media.images import DEFAULT_MAX_PIXELS
from retrieval.model import release
from retrieval.model.precision_cache import onnxruntime_version
from retrieval.model.spec import ModelSpec
from retrieval.store.library import Library
from retrieval.store.runs import vectors_by_precision
from retrieval.store.schema import ErrorRow, Image, Run, path_to_db, vector_to_blob
from retrieval.store.sql import delete_images, in_chunks

if TYPE_CHECKING:  # torch loads in the encoding stage only, so planning and dry runs stay light
    from retrieval.model.encoder import Encoder

NO_MODEL = "no model given: pass --model-dir DIR, or --model NAME --pretrained TAG"


@dataclass
class IndexOptions:
    workers: int | None = None  # None: config.decode_workers(), grown while the encoder waits (index/workers.py)
    threads: int | None = None  # encoder torch threads; None: measured (index/threads.py)
    batch_size: int | None = None  # None: 32 on CPU, 256 on GPU
    follow_symlinks: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    index_type: str | None = None  # any FAISS factory string; None: chosen by size
    progress: bool = False
    wait: bool = False  # wait for the write lock instead of refusing
    dry_run: bool = False
    retry_failed: bool = False  # decode again files that failed before and are unchanged
    missing_ok: bool = False  # roots from a file list: one that is gone is skipped (vanished), not fatal


# -- running -----------------------------------------------------------------------------
def index_paths(library: Library, roots: Iterable[str | os.PathLike], spec: ModelSpec | None = None,
                device: str = "auto", precision: str = "auto",
                options: IndexOptions | None = None,
                make_stages: Callable[..., IndexStages] | None = None) -> IndexResult:
    """Bring the library up to date with `roots`; see the module docstring for how.

    The stages, in order: `plan_index`, then `IndexStages.apply`, `.encode` (which
    commits each batch), `.copy_late`, and finally `refresh_vectors`, inside one
    recorded run (`Library.run`) under the write lock. `make_stages` swaps the engine that
    decodes and encodes (`retrieval.index.ray_engine.RayStages`); everything else stays.
    """
    options = options or IndexOptions()
    roots = check_roots(roots, options.missing_ok)
    if spec is None and library.model_record is None:
        raise ModelError(NO_MODEL)
    if options.dry_run:
        plan = plan_index(library, roots, options.follow_symlinks, options.retry_failed,
                          options.max_pixels)
        return IndexResult(os.path.abspath(library.root), plan, plan.counts(), plan.skipped,
                           dry_run=True)
    with library.write_lock(wait=options.wait):
        export_warning = None
        if library.model_record is None:  # a new library: record the model before anything
            # Image tower only: the export reloads the whole model if the machine has no copy of it.
            release.fix_mmap_threshold()  # as encode() does: what loading frees goes back to the kernel
            export_warning = export_onnx(library, library.encoder(spec, device=device, precision=precision,
                                                                  images_only=True))
        started = time.perf_counter()
        plan = Plan()
        with library.run("index") as run:
            stages = (make_stages or IndexStages)(library, run.id, options, spec, device, precision)
            stages.warnings += [export_warning] if export_warning else []
            try:
                plan = plan_index(library, roots, options.follow_symlinks, options.retry_failed,
                                  options.max_pixels)
                stages.skipped.extend(plan.skipped)
                stages.apply(plan)
                stages.encode(plan)
                stages.copy_late(plan)
            finally:  # what was committed is reported and reaches FAISS, whatever stopped us
                run.stats = stages.summary(plan, started)
                run.stats["faiss"] = refresh_vectors(library, options.index_type)
    return IndexResult(os.path.abspath(library.root), plan, run.stats, stages.skipped, run.id,
                       run.status, warnings=stages.warnings)


def export_onnx(library: Library, encoder: Encoder) -> str | None:
    """Export the towers for torch-free queries while the model is loaded anyway; a warning if not."""
    from retrieval.store.onnx_exports import ExportError, ensure_export

    try:
        ensure_export(library, "fp32", encoder)
    except ExportError as exc:
        return f"could not export the model to ONNX ({exc}); queries will use torch"
    return None


class IndexStages:
    """The writing stages of one recorded run; they share its id, stats, warnings and skip list.

    Call them in order under the write lock: `apply` (moves, touches, copies, removals:
    one transaction, no encoder), `encode` (decode in workers, encode, one transaction
    per batch), `copy_late` (duplicates of files first encoded in this run).
    `retrieval.index.reembed` drives `encode` and `copy_late` with a plan of its own.
    """

    def __init__(self, library: Library, run_id: int, options: IndexOptions,
                 spec: ModelSpec | None = None, device: str = "auto", precision: str = "auto") -> None:
        self.library, self.run_id, self.options = library, run_id, options
        self.spec, self.device, self.precision = spec, device, precision
        self.stats: Counter = run_counts()
        self.warnings: list[str] = []
        self.failed_digests: dict[str, Skipped] = {}
        self.skipped: list[Skipped] = []

    def summary(self, plan: Plan, started: float) -> dict:
        """The run's statistics so far: the plan's counts, what was done, what was skipped."""
        return run_stats(plan, self.stats, self.skipped, started)

    # -- the first transaction: everything that needs no encoder -----------------------
    def apply(self, plan: Plan) -> None:
        """Removals, moves, touches, copies of stored vectors and new error rows: one transaction."""
        with self.library.session() as s, s.begin():
            delete_images(s, [row_id for row_id, _ in plan.gone])
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
        sources = {}
        for part in in_chunks(sorted({w.source_id for w in works})):
            sources.update({r.id: r for r in s.execute(select(Image).where(Image.id.in_(part))).scalars()})
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
    def encode(self, plan: Plan) -> None:
        """Decode `plan.encode` in worker processes, encode, and commit each batch's rows."""
        if not plan.encode:
            return
        import torch  # deferred with the decode pipeline: planning and dry runs need no torch

        from retrieval.media import pipeline

        release.fix_mmap_threshold()  # activations' buffers go back to the kernel (model/release.py)
        encoder = self.load_encoder(images_only=True)
        opts = self.options
        threads = torch.get_num_threads()
        tuner = None
        if encoder.device.type == "cpu":
            if opts.threads is None:  # measured on the run's own batches (index/threads.py)
                tuner = ThreadTuner(config.usable_cores())
            torch.set_num_threads(opts.threads or (tuner.next_threads() if tuner else 1))
        workers = config.decode_workers() if opts.workers is None else opts.workers
        workers_tuner = None
        if opts.workers is None and encoder.device.type == "cpu":  # watched (index/workers.py)
            workers_tuner = WorkerTuner(workers, min(8, config.usable_cores()))
        self.stats.update(threads=torch.get_num_threads(), workers=workers,
                          batch_size=opts.batch_size or pipeline.default_batch_size(encoder.device))
        paths = [w.entry.path for w in plan.encode]

        def batches_from(start: int, workers: int):
            return iter(pipeline.make_loader(
                paths, encoder.preprocess, encoder.image_size, start=start,
                batch_size=self.stats["batch_size"], workers=workers,
                pin_memory=encoder.device.type == "cuda", max_pixels=opts.max_pixels,
                close_in_workers=self.library.lock_handles()))

        batches = batches_from(0, workers)
        taken = 0
        bar = _progress(len(plan.encode), opts.progress)
        try:
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                waited = time.perf_counter() - waited
                if batch is None:
                    break
                vectors = []
                encoding = 0.0
                if batch.pixels is not None:
                    if tuner is not None:
                        torch.set_num_threads(tuner.next_threads())
                    started = time.perf_counter()
                    vectors = encoder.encode_pixels(batch.pixels)
                    encoding = time.perf_counter() - started
                    if tuner is not None:
                        tuner.record(torch.get_num_threads(), len(batch.decoded), encoding)
                self.commit_batch(plan, batch, vectors)
                self.stats["encoded"] += len(batch.decoded)
                taken += len(batch)
                bar.update(len(batch))
                if workers_tuner is not None and encoding and not (tuner is not None and tuner.measuring):
                    more = workers_tuner.record(waited, encoding, len(batch.decoded))
                    if more is not None and taken < len(paths):
                        batches = None  # its workers stop before the new ones start
                        batches = batches_from(taken, more)
        finally:
            bar.close()
            if tuner is not None:  # assigned, not Counter.update (which would add)
                self.stats["threads"], self.stats["thread_rates"] = tuner.chosen, tuner.history
            if workers_tuner is not None:
                self.stats["workers"], self.stats["worker_waits"] = workers_tuner.workers, workers_tuner.history
            torch.set_num_threads(threads)

    def load_encoder(self, images_only: bool = False) -> Encoder:
        """The library's encoder at the precision this run uses; records it on the run.

        `images_only`: this process encodes nothing else, so the encoder builds only the image
        tower where it can, and keeps only the one it runs (`Encoder.keep_image_tower_only`,
        before the precision is settled, so the text tower is gone before an int8/bf16 copy
        is made)."""
        library = self.library
        encoder = library.encoder(self.spec, device=self.device, precision=self.precision_to_use(),
                                  images_only=images_only)
        if images_only:
            encoder.keep_image_tower_only()
        if self.options.index_type:
            check_factory(self.options.index_type, encoder.embed_dim)
        with library.session() as s, s.begin():
            run = s.get(Run, self.run_id)
            run.precision, run.device = encoder.precision, str(encoder.device)
        # What made this run's vectors, in runs.stats and the `index` summary (issue 17).
        self.stats["precision"], self.stats["device"] = encoder.precision, str(encoder.device)  # set, not added
        self.stats["runtime"] = "onnx" if encoder.precision.startswith("onnx-") else "torch"
        made_with = set(vectors_by_precision(library.engine)) - {"unknown"}
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

        if self.device == "auto" and torch.cuda.is_available():
            return self.precision
        made_with = set(vectors_by_precision(self.library.engine)) - {"unknown"}
        runnable = {"fp32", "int8"} | ({"bf16"} if config.cpu_has_native_bf16() else set()) \
            | ({"onnx-fp32", "onnx-int8"} if onnxruntime_version() else set())
        if len(made_with) == 1 and (only := made_with.pop()) in runnable:
            return only
        return self.precision

    def commit_batch(self, plan: Plan, batch, vectors) -> None:
        """One transaction for one batch: rows of `batch.decoded` (with `vectors`, in order), and
        error rows for `batch.failed`. Items carry `key`, an index into `plan.encode`; any engine
        (DataLoader here, Ray in `retrieval.index.ray_engine`) commits through this one door."""
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
            delete_images(s, stale)
            self._record_errors(s, skipped)
        self.skipped.extend(skipped)
        self.stats["indexed"] += len(inserts) + len(updates)

    def copy_late(self, plan: Plan) -> None:
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
                delete_images(s, [w.row_id for w in plan.late_copies if w.row_id and w.digest not in stored])
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


# -- removing -----------------------------------------------------------------------------
def remove_paths(library: Library, paths: Iterable[str | os.PathLike], dry_run: bool = False,
                 wait: bool = False, on_match: Callable[[str], None] | None = None) -> int:
    """Delete the rows of files at or under `paths` (they need not exist on disk)."""
    targets = [remote.canonical(t) if remote.is_url(t) else os.path.abspath(t)
               for t in (os.fsdecode(p) for p in paths)]
    with library.write_lock(wait=wait):
        rows = known_rows(library, targets)
        for path in sorted(rows):
            if on_match:
                on_match(path)
        if dry_run or not rows:
            return len(rows)
        ids = [r[0] for r in rows.values()]
        with library.run("remove") as run:
            with library.session() as s, s.begin():
                delete_images(s, ids)
            run.stats = {"removed": len(ids), "paths": targets}
            refresh_vectors(library)
        return len(ids)
