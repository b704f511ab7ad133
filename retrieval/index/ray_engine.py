"""`clipfind index --engine ray`: the same run, with decode + encode on a Ray cluster.

Planning (scan, diff, hash), the first transaction, duplicates, the runs table, the
skip report and the FAISS catch-up are the single-process indexer's own stages
(`retrieval.index.indexer`); only `encode` is replaced. The driver loads the model
once too: its transform is the one decode tasks run (so pixels are identical), and on
a CPU cluster its measured precision is the one every actor uses (so one run never
mixes precisions). Each block the cluster finishes is committed in one transaction
through `IndexStages.commit_batch`: a killed worker is retried by Ray, a killed driver
loses the blocks in flight, and the next run resumes from the committed rows.

`export_shards` runs the same pipeline into parquet shards (`retrieval.store.shards`)
instead of the store, for `clipfind ingest` to load elsewhere.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from retrieval.errors import LibraryError, ModelError
from retrieval.index.indexer import IndexOptions, IndexStages
from retrieval.index.planner import Plan, plan_index
from retrieval.index.ray_pipeline import (
    Layout,
    RayOptions,
    connected,
    embed,
    plan_layout,
    split_block,
)
from retrieval.media.pipeline import Batch
from retrieval.model.spec import ModelSpec
from retrieval.store.library import Library
from retrieval.store.schema import Run, path_to_db, vector_to_blob
from retrieval.store.shards import Manifest, ShardWriter


def ray_stages(ray: RayOptions) -> Callable[..., IndexStages]:
    """The stages factory `index_paths(make_stages=...)` takes to run on Ray."""
    def make(*args, **kwargs) -> RayStages:
        return RayStages(*args, ray=ray, **kwargs)

    return make


class RayStages(IndexStages):
    """IndexStages whose `encode` runs on a Ray cluster; every other stage is inherited."""

    def __init__(self, *args, ray: RayOptions, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ray = ray

    def encode(self, plan: Plan) -> None:
        if not plan.encode:
            return
        with connected(self.ray.address, self.options.progress):
            layout = plan_layout(self.ray, self.device, self.options.batch_size, len(plan.encode))
            encoder = self.driver_encoder(layout)
            precision = encoder.precision if layout.device == "cpu" else self.precision
            for key, value in dict(engine="ray", actors=layout.actors, threads=layout.threads or "measured",
                                   batch_size=layout.batch_size, blocks=0).items():
                self.stats[key] = value  # assigned: Counter.update would add
            expected = self.library.model_record["fingerprint"]
            started = time.perf_counter()
            bar = _progress(len(plan.encode), self.options.progress)
            try:
                for block in embed([w.entry.path for w in plan.encode], encoder.spec.to_json(),
                                   encoder.preprocess, encoder.image_size, layout, precision,
                                   self.options.max_pixels, encoder.embed_dim):
                    made_by = check_block(block, expected)
                    if self.stats["blocks"] == 0:  # workers started, model loaded: the fixed cost
                        self.stats["first_block_s"] = round(time.perf_counter() - started, 2)
                        self._record_precision(*made_by)
                    decoded, vectors, failed = split_block(block)
                    self.commit_batch(plan, Batch(decoded=decoded, failed=failed), vectors)
                    self.stats["encoded"] += len(decoded)
                    self.stats["blocks"] += 1
                    bar.update(len(decoded) + len(failed))
            finally:
                bar.close()

    def driver_encoder(self, layout: Layout):
        """On a CPU cluster: the run's encoder, precision settled here (the actors then use it).
        With GPUs the actors settle their own fp16; the driver's copy only lends its transform."""
        if layout.device == "cpu":
            return self.load_encoder()
        return self.library.encoder(self.spec, device="cpu", precision="fp32")

    def _record_precision(self, precision: str, device: str) -> None:
        with self.library.session() as s, s.begin():
            run = s.get(Run, self.run_id)
            run.precision, run.device = precision, device


def check_block(block: dict, fingerprint: str) -> tuple[str, str]:
    """(precision, device) of the actor that made the block; refuse weights not the library's.

    A worker node whose model folder holds other files than the driver's would otherwise
    write vectors of another model into the library.
    """
    if not len(block["key"]):
        return "", ""
    made = str(block["fingerprint"][0])
    if made != fingerprint:
        raise LibraryError(f"a Ray worker loaded other weights (fingerprint {made}, not {fingerprint}); "
                           "every node must see the same model files")
    return str(block["precision"][0]), str(block["device"][0])


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="encoding (ray)", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()), smoothing=0.1)


# -- shards instead of the store -------------------------------------------------------------
def export_shards(library: Library | None, roots: Sequence[str], out_dir: str | os.PathLike,
                  spec: ModelSpec | None, device: str = "auto", precision: str = "auto",
                  options: IndexOptions | None = None, ray: RayOptions | None = None) -> dict:
    """Plan against `library` (None: against nothing), embed on Ray, write parquet shards.

    Nothing is written to the library. Shards hold the files that needed encoding and their
    duplicates; moves and copies of stored images are left to the next `clipfind index`,
    which encodes nothing for them. Re-running into the same folder resumes it.
    """
    options, ray = options or IndexOptions(), ray or RayOptions()
    started = time.perf_counter()
    plan = plan_index(library, roots, options.follow_symlinks, options.retry_failed, options.max_pixels)
    with connected(ray.address, options.progress):
        layout = plan_layout(ray, device, options.batch_size, len(plan.encode))
        encoder = _export_encoder(library, spec, layout, precision)
        precision = encoder.precision if layout.device == "cpu" else precision
        writer = ShardWriter(Path(out_dir), encoder.describe(), precision, layout.device)
        done = writer.open()
        todo = [w for w in plan.encode if not _in(done, w)]
        rows_by_digest = {row["content_hash"]: row for row in done.values()}
        skipped = [{"path": path_to_db(s.path)[0], "kind": s.kind, "message": path_to_db(s.message)[0]}
                   for s in plan.skipped]
        encoded = 0
        if todo:
            for block in embed([w.entry.path for w in todo], encoder.spec.to_json(), encoder.preprocess,
                               encoder.image_size, layout, precision, options.max_pixels, encoder.embed_dim):
                made_by = check_block(block, encoder.fingerprint)
                writer.manifest.precision, writer.manifest.device = made_by if made_by[0] else (
                    writer.manifest.precision, writer.manifest.device)
                decoded, vectors, failed = split_block(block)
                rows = []
                for item, vector in zip(decoded, vectors):
                    rows.append(_row(todo[item.key], item, vector_to_blob(vector)))
                    rows_by_digest[rows[-1]["content_hash"]] = rows[-1]
                writer.write(rows)
                encoded += len(rows)
                skipped += [{"path": path_to_db(todo[f.key].entry.path)[0], "kind": f.kind,
                             "message": path_to_db(f.message)[0]} for f in failed]
        writer.write([{**rows_by_digest[w.digest], **_file_fields(w)} for w in plan.late_copies
                      if w.digest in rows_by_digest and not _in(done, w)])
        manifest = writer.finish(skipped)
    return {"shards": str(Path(out_dir).resolve()), **plan.counts(), "encoded": encoded,
            "already_in_shards": len(plan.encode) - len(todo), "rows": manifest.rows,
            "files": len(manifest.shards), "skipped": len(skipped), "precision": manifest.precision,
            "device": manifest.device, "engine": "ray", "actors": layout.actors,
            "seconds": round(time.perf_counter() - started, 3)}


def _export_encoder(library: Library | None, spec: ModelSpec | None, layout: Layout, precision: str):
    device, precision = ("cpu", precision) if layout.device == "cpu" else ("cpu", "fp32")
    if library is not None and library.model_record is not None:
        return library.encoder(spec, device=device, precision=precision)
    if spec is None:
        raise ModelError("no model given: pass --model-dir DIR, or --model NAME --pretrained TAG")
    from retrieval.model.encoder import Encoder

    return Encoder(spec, device=device, precision=precision)


def _key(path: str) -> bytes:
    return os.fsencode(path)


def _in(done: dict, work) -> bool:
    """Already in the shards with these bytes (a file changed since gets a new row, which wins
    at ingest by its newer mtime)."""
    row = done.get(_key(work.entry.path))
    return row is not None and row["content_hash"] == work.digest


def _file_fields(work) -> dict:
    return {"path": _key(work.entry.path), "size": work.entry.size, "mtime_ns": work.entry.mtime_ns,
            "content_hash": work.digest}


def _row(work, item, blob: bytes) -> dict:
    return {**_file_fields(work), "width": item.width, "height": item.height, "format": item.format,
            "taken_at": item.taken_at.isoformat() if item.taken_at else None, "embedding": blob}


__all__ = ["Manifest", "RayOptions", "RayStages", "export_shards", "ray_stages"]
