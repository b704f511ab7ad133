"""`clipfind ingest SHARDS`: load embedding shards into a library, idempotently.

Every shard is checked (size, SHA-256, parquet footer, row count, model fingerprint)
before a single row is written, so a truncated shard or one from another model is
refused in one line with nothing changed. Then each shard is one transaction: a row
whose path already holds the same bytes (content hash) adds nothing, so loading a
folder twice, or again after a kill, changes nothing the first load did. A path the
library holds with other bytes is replaced only when the shard's file is newer (its
mtime), so an old shard never undoes a later index. The files the workers could not
decode (the manifest's `skipped`) become the run's error rows, as the single-process
indexer records its skips: `status`, `--verbose` and `--json` report them alike, and a
failure already recorded is not recorded twice. The FAISS cache catches up at the end,
as after `index`.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from sqlalchemy import insert, select, update

from retrieval.errors import InputError, LibraryError
from retrieval.index.planner import Skipped
from retrieval.index.refresh import refresh_vectors
from retrieval.store.library import Library
from retrieval.store.schema import ErrorRow, Image, Run, path_to_db
from retrieval.store.shards import Manifest, check_shard, read_manifest, read_shards
from retrieval.store.sql import in_chunks


def check_model(library: Library, manifest: Manifest) -> None:
    """Shards of another model than the library's: refused (exit 4), as `index` refuses one."""
    record = library.model_record
    if record is None:
        return
    if record["fingerprint"] != manifest.fingerprint or int(record["embed_dim"]) != int(manifest.model["embed_dim"]):
        raise LibraryError(f"these shards were made with {manifest.model.get('label', 'another model')} "
                           f"(fingerprint {manifest.fingerprint}), but this library with {record['label']} "
                           f"(fingerprint {record['fingerprint']}); ingest them into a library of their model")


def checked_manifest(folder: str | os.PathLike) -> Manifest:
    """The folder's manifest once every shard it lists is whole and of its model; else one line."""
    manifest = read_manifest(Path(folder))
    for entry in manifest.shards:
        check_shard(Path(folder), manifest, entry)
    return manifest


def ingest_shards(library: Library, folder: str | os.PathLike, wait: bool = False,
                  manifest: Manifest | None = None) -> dict:
    """Check every shard (unless `manifest` comes from `checked_manifest`), then load them one
    transaction each; returns the run's counts."""
    folder = Path(folder)
    manifest = manifest or checked_manifest(folder)
    check_model(library, manifest)
    started = time.perf_counter()
    counts: Counter = Counter(added=0, updated=0, unchanged=0, stale=0)
    skipped = skipped_of(manifest)
    with library.write_lock(wait=wait):
        check_model(library, manifest)  # again under the lock: a writer may have bound a model since
        if library.model_record is None:
            library.set_meta("model", manifest.model)
        with library.run("ingest") as run:
            with library.session() as s, s.begin():
                row = s.get(Run, run.id)
                row.precision, row.device = manifest.precision, manifest.device
            try:
                for table in read_shards(folder, manifest):
                    counts.update(_load(library, run.id, table.to_pylist(), int(manifest.model["embed_dim"])))
                    counts["shards"] += 1
                counts["errors_recorded"] = record_skipped(library, run.id, skipped)
            finally:
                run.stats = {**counts, "rows": manifest.rows, "shards_listed": len(manifest.shards),
                             "indexed": counts["added"] + counts["updated"], "skipped": len(skipped),
                             "skipped_by_kind": dict(Counter(k.kind for k in skipped)),
                             "seconds": round(time.perf_counter() - started, 3)}
                run.stats["faiss"] = refresh_vectors(library)
    return {"library": str(library.root.resolve()), "shards_dir": str(folder.resolve()),
            "run_id": run.id, **run.stats, "skipped_files": skipped}


def skipped_of(manifest: Manifest) -> list[Skipped]:
    """The manifest's undecodable files as the indexer's `Skipped` (paths as the store keeps them)."""
    out = []
    for entry in manifest.skipped:
        try:
            out.append(Skipped(str(entry["path"]), str(entry["kind"]), str(entry["message"])))
        except (KeyError, TypeError):
            raise InputError("the shards' manifest.json is damaged (a skipped entry without "
                             "path, kind and message)") from None
    return out


def record_skipped(library: Library, run_id: int, skipped: list[Skipped]) -> int:
    """Error rows for `skipped` under this run, but none for a failure (path, kind, message) the
    library has recorded already: ingesting the same shards twice records nothing new."""
    if not skipped:
        return 0
    with library.session() as s, s.begin():
        known = set()
        for part in in_chunks(sorted({k.path for k in skipped})):
            known.update(s.execute(select(ErrorRow.path, ErrorRow.kind, ErrorRow.message)
                                   .where(ErrorRow.path.in_(part))).all())
        rows = [{"run_id": run_id, "path": k.path, "kind": k.kind, "message": k.message}
                for k in skipped if (k.path, k.kind, k.message) not in known]
        if rows:
            s.execute(insert(ErrorRow), rows)
    return len(rows)


def _load(library: Library, run_id: int, rows: list[dict], dim: int) -> Counter:
    """One shard's rows in one transaction: insert new paths, replace older ones, skip the same."""
    counts: Counter = Counter()
    by_path: dict[str, dict] = {}
    for r in rows:
        if not isinstance(r["embedding"], bytes) or len(r["embedding"]) != dim * 4:
            raise InputError(f"a shard row for {os.fsdecode(r['path'])!r} holds no {dim}-d float32 vector")
        by_path[path_to_db(os.fsdecode(r["path"]))[0]] = r
    with library.session() as s, s.begin():
        stored = {}
        for part in in_chunks(sorted(by_path)):
            for sid, path, digest, mtime in s.execute(select(Image.id, Image.path, Image.content_hash,
                                                             Image.mtime_ns).where(Image.path.in_(part))):
                stored[path] = (sid, digest, mtime)
        inserts, updates = [], []
        for text, r in by_path.items():
            fields = {"size": r["size"], "mtime_ns": r["mtime_ns"], "content_hash": r["content_hash"],
                      "width": r["width"], "height": r["height"], "format": r["format"],
                      "taken_at": datetime.fromisoformat(r["taken_at"]) if r["taken_at"] else None,
                      "embedding": r["embedding"], "run_id": run_id}
            if text not in stored:
                inserts.append({"path": text, "path_bytes": path_to_db(os.fsdecode(r["path"]))[1], **fields})
            elif stored[text][1] == r["content_hash"]:
                counts["unchanged"] += 1
            elif r["mtime_ns"] > stored[text][2]:
                updates.append({"id": stored[text][0], **fields})
            else:
                counts["stale"] += 1
        if inserts:
            s.execute(insert(Image), inserts)
        if updates:
            s.execute(update(Image), updates)
    counts["added"] += len(inserts)
    counts["updated"] += len(updates)
    return counts
