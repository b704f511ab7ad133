"""`clipfind status` and `clipfind verify`: what a library holds, and whether it holds together.

Status only reads (the database and `index.json`, never the FAISS file), so it
is instant at any size. Verify checks every row against its vector, the
FAISS cache against the database, and the files against the disk; it holds
the write lock so that a running `index` cannot look like an inconsistency.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select, text

from retrieval.media import remote
from retrieval.model.precision_cache import cached_choice
from retrieval.store import postgres
from retrieval.store.integrity import RESTORE_HINT, damage_of, restore_hint
from retrieval.store.library import Library
from retrieval.store.onnx_exports import export_problems
from retrieval.store.runs import mixed_precision_problem, vectors_by_precision
from retrieval.store.schema import Image, blobs_to_matrix, path_from_db
from retrieval.store.sql import in_chunks
from retrieval.store.vectors import INDEX_FILE, STATE_FILE, VectorIndex

EXACT_TOLERANCE = 1e-5


def _size(*paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


def library_status(library: Library) -> dict:
    """Counts, model, index type, sizes on disk and the last runs, from cheap reads only."""
    root = library.root
    db = library.db_path
    with library.engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM images")).scalar_one()
        runs = conn.execute(text(
            "SELECT id, kind, status, started_at, finished_at, precision, device, stats "
            "FROM runs ORDER BY id DESC LIMIT 50")).mappings().all()
        errors_total = conn.execute(text("SELECT count(*) FROM errors")).scalar_one()
        pending = conn.execute(text("SELECT count(*) FROM vector_log")).scalar_one()
        database_bytes = (postgres.database_bytes(conn) if library.store.is_postgres
                          else _size(db, f"{db}-wal", f"{db}-shm"))
    try:
        state = json.loads((root / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = None
    record = library.model_record
    last = [_run_dict(r) for r in runs]
    if any(r["status"] == "running" for r in last) and not library.writer_active():
        for r in last:  # nobody holds the write lock: those runs were killed (kill -9, power cut)
            if r["status"] == "running":
                r["status"], r["note"] = "interrupted", "its process is gone"
    # an ingest adds images (from shards) as an index run does, with its own skips
    last_index = next((r for r in last if r["kind"] in ("index", "ingest")), None)
    return {
        "library": str(root),
        "database": library.store.label,
        "images": count,
        "model": record["label"] if record else None,
        "embed_dim": record["embed_dim"] if record else None,
        "vectors_by_precision": vectors_by_precision(library.engine),
        "auto_precision_here": cached_choice(record["fingerprint"]) if record else None,
        "index": {"type": state["factory"], "vectors": state["ntotal"],
                  "watermark": state["watermark"]} if state else None,
        "log_entries": pending,
        "size_bytes": {"database": database_bytes,
                       "index": _size(root / INDEX_FILE, root / STATE_FILE)},
        "last_run": last[0] if last else None,
        "last_index_run": last_index,
        "skipped_last_index_run": (last_index or {}).get("stats", {}).get("skipped", 0),
        "errors_recorded": errors_total,
        "interrupted_runs": sum(r["status"] == "interrupted" for r in last),
    }


def _run_dict(row) -> dict:
    stats = row["stats"]
    if isinstance(stats, str):
        stats = json.loads(stats)
    return {"id": row["id"], "kind": row["kind"], "status": row["status"],
            "started_at": str(row["started_at"]), "finished_at": str(row["finished_at"] or ""),
            "precision": row["precision"], "device": row["device"], "stats": stats or {}}


@dataclass(frozen=True)
class Finding:
    """One problem verify found: `kind` (what code acts on) and `message` (what a person reads)."""

    kind: str  # integrity, no_model, bad_vectors, bad_norms, missing_files, faiss_unreadable,
    #            faiss_stale, faiss_ids, faiss_vectors, mixed_precision, onnx_export
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class VerifyReport:
    problems: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def found(self, kind: str) -> bool:
        """Whether a problem of this kind was found."""
        return any(p.kind == kind for p in self.problems)

    def problem(self, kind: str, message: str) -> None:
        self.problems.append(Finding(kind, message))

    def as_dict(self) -> dict:
        return {"ok": self.ok, "problems": [p.message for p in self.problems], "notes": self.notes,
                "missing_files": self.missing, "checked": self.checked}


def verify_library(library: Library, wait: bool = False, sample: int = 1000,
                   check_files: bool = True) -> VerifyReport:
    """Every row has a unit vector of the right size, FAISS holds exactly the rows' ids and
    vectors, every file is still on disk. Read-only: a stale cache is repaired in memory."""
    report = VerifyReport()
    with library.write_lock(wait=wait, check=False):
        damage = damage_of(library.engine)
        if damage is not None:
            report.problem("integrity", damaged_finding(damage, restore_hint(library.engine)))
            return report
        record = library.model_record
        count = library.image_count()
        report.checked["images"] = count
        if record is None:
            if count:
                report.problem("no_model", f"{count} images but no model recorded")
            return report
        dim = int(record["embed_dim"])
        ids = _check_rows(library, dim, report, check_files)
        if report.found("bad_vectors"):
            report.notes.append("FAISS not checked: rows without a valid vector must be fixed first")
        else:
            _check_index(library, dim, ids, report, sample)
        mixed = mixed_precision_problem(library.engine)
        if mixed:
            report.problem("mixed_precision", mixed)
        exported, notes = export_problems(library, full=True)
        for message in exported:
            report.problem("onnx_export", message)
        report.notes += notes
    return report


def damaged_finding(detail: str, hint: str = RESTORE_HINT) -> str:
    """How verify words damaged pages: the same sentence every other command refuses with."""
    return f"the library database is damaged: {detail}; {hint}"


def _check_rows(library: Library, dim: int, report: VerifyReport, check_files: bool) -> np.ndarray:
    bad_size, bad_norm, changed, last, all_ids, urls = [], [], 0, 0, [], 0
    query = text("SELECT id, path, path_bytes, size, mtime_ns, embedding FROM images "
                 "WHERE id > :last ORDER BY id LIMIT 20000")
    with library.engine.connect() as conn:
        while rows := conn.execute(query, {"last": last}).all():
            last = rows[-1].id
            good = []
            for r in rows:
                all_ids.append(r.id)
                if r.embedding is None or len(r.embedding) != dim * 4:
                    bad_size.append(r.id)
                else:
                    good.append(r)
                if check_files:
                    path = path_from_db(r.path, r.path_bytes)
                    if remote.is_url(path):  # a request per object: not here (index re-lists them)
                        urls += 1
                        continue
                    try:
                        st = os.stat(path)
                        changed += (st.st_size, st.st_mtime_ns) != (r.size, r.mtime_ns)
                    except OSError:
                        report.missing.append(path)
            if good:
                norms = np.linalg.norm(blobs_to_matrix([r.embedding for r in good], dim), axis=1)
                bad_norm += [r.id for r, n in zip(good, norms) if not abs(n - 1) < 1e-3]
    if bad_size:
        report.problem("bad_vectors", f"{len(bad_size)} rows have no vector of {dim} floats (ids {bad_size[:5]}...)")
    if bad_norm:
        report.problem("bad_norms", f"{len(bad_norm)} vectors are not unit length or not finite (ids {bad_norm[:5]}...)")
    if report.missing:
        report.problem("missing_files", f"{len(report.missing)} indexed files are no longer on disk "
                               "(run `clipfind index` on their folder, or `clipfind remove`)")
    if changed:
        report.notes.append(f"{changed} files changed on disk since indexing (run `clipfind index` again)")
    if urls:
        report.notes.append(f"{urls} rows are URLs, not checked against their store (`clipfind index` "
                            "re-lists them)")
    report.checked["files"] = check_files
    return np.array(all_ids, dtype=np.int64)


def _check_index(library: Library, dim: int, ids: np.ndarray, report: VerifyReport, sample: int) -> None:
    vectors = VectorIndex(library.root, dim, library.identity)
    loaded = vectors.load()
    if not loaded and vectors.index_path.exists():
        report.problem("faiss_unreadable", "index.faiss is unreadable, was built from another database "
                       "or does not match this one (run `clipfind reindex`; any search rebuilds it too)")
    elif not loaded and len(ids):
        report.notes.append("no FAISS index saved yet; it will be built on next use")
    action = vectors.sync(library.engine, save=False)
    if loaded and action == "rebuilt":
        report.problem("faiss_stale", "the saved FAISS index disagreed with the database and its change "
                               "log (run `clipfind reindex`)")
    elif action == "caught-up":
        report.notes.append("the saved FAISS index is behind the database; it catches up on next use")
    index = vectors.index
    faiss_ids = vectors.ids()
    report.checked["index_type"] = vectors.state.factory
    report.checked["index_vectors"] = int(index.ntotal)
    if not np.array_equal(faiss_ids, np.sort(ids)):
        extra = np.setdiff1d(faiss_ids, ids)
        lost = np.setdiff1d(ids, faiss_ids)
        report.problem("faiss_ids", f"FAISS ids differ from database ids: {len(extra)} vectors without a "
                               f"row, {len(lost)} rows without a vector (run `clipfind reindex`)")
        return
    _spot_check(library, vectors, ids, report, sample)


def _spot_check(library: Library, vectors: VectorIndex, ids: np.ndarray, report: VerifyReport,
                sample: int) -> None:
    """Reconstructed (exact types) or searched-for (approximate types) vectors match the rows."""
    if not len(ids):
        return
    chosen = sorted(random.Random(0).sample(list(ids), min(sample, len(ids))))
    rows = []
    with library.engine.connect() as conn:
        for part in in_chunks([int(i) for i in chosen]):
            rows += conn.execute(select(Image.id, Image.embedding).where(Image.id.in_(part))).all()
    stored = blobs_to_matrix([r.embedding for r in rows], vectors.dim)
    row_ids = [r.id for r in rows]
    exact = all(part not in vectors.state.factory for part in ("PQ", "SQ", "LSH", "RaBitQ"))
    bad = 0
    try:
        got = np.stack([vectors.reconstruct(i) for i in row_ids])
        tolerance = EXACT_TOLERANCE if exact else 0.25
        bad = int((np.abs(got - stored).max(axis=1) > tolerance).sum())
    except RuntimeError:  # IVF/HNSW without a direct map: ask the index to find each vector
        _, found = vectors.search(stored, 10 * vectors.state.refine)  # PQ: as many as search re-ranks
        bad = sum(rid not in set(hits) for rid, hits in zip(row_ids, found.tolist()))
        if "HNSW" in vectors.state.factory:  # a graph search may miss a few, by design
            bad = 0 if bad <= 0.02 * len(row_ids) else bad
    report.checked["spot_checked"] = len(row_ids)
    if bad:
        report.problem("faiss_vectors", f"{bad} of {len(row_ids)} sampled FAISS vectors differ from the "
                               "database (run `clipfind reindex`)")
