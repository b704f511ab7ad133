"""`clipfind index | status | verify | remove | reindex`: build and look after a library.

Thin shells over `retrieval.index.indexer` and `retrieval.index.inspection`; heavy imports
(torch, open_clip, faiss) happen inside the commands so `--help` stays quick.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import click

from retrieval import config
from retrieval.cli.common import (
    MODEL_HELP,
    PRECISIONS,
    emit_json,
    json_option,
    library_option,
    model_options,
    note_random,
    pop_model_options,
    warn,
)
from retrieval.cli.engine_cmds import engine_options, pop_engine_options, run_export
from retrieval.cli.skips import by_kind, report_skipped, skipped_json
from retrieval.errors import ClipfindError, VerifyError
from retrieval.query.render import human_size, shown_path


def _open(library_path: str | None, create: bool = False):
    from retrieval.store.library import Library

    return Library.open(library_path, create=create)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`kill PID` gets the same clean stop as Ctrl-C: batch rolled back, run marked, FAISS saved."""
    def handler(_signum, _frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("index", epilog=MODEL_HELP)
@click.argument("paths", nargs=-1, type=click.Path())
@library_option
@model_options
@click.option("--file-list", type=click.File("r", encoding="utf-8", errors="surrogateescape"), metavar="FILE",
              help="Index the paths and fsspec URLs listed in FILE, one a line ('-': standard input), "
                   "besides any PATHS. Listed files that are gone are skipped, not fatal.")
@click.option("--workers", type=click.IntRange(0),
              help="Decode worker processes (default: cores - 1, one more while the encoder waits on decoding).")
@click.option("--threads", type=click.IntRange(1),
              help="Encoder threads on a CPU (default: chosen by timing the run's first batches).")
@click.option("--batch-size", type=click.IntRange(1), help="Images per encoder batch (default: 32 on CPU, 256 on GPU).")
@click.option("--index-type", metavar="FACTORY", help="FAISS index factory string, e.g. Flat, IVF1024,Flat, HNSW32 (default: by size).")
@click.option("--follow-symlinks", is_flag=True, help="Enter symlinked folders too (loops are detected).")
@click.option("--max-pixels", type=click.IntRange(1), default=100_000_000, show_default=True,
              help="Skip images larger than this many pixels (decompression bombs).")
@click.option("--retry-failed", is_flag=True,
              help="Decode again files that failed before, even if unchanged since.")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--wait", is_flag=True, help="If another command is writing this library, wait for it instead of refusing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", is_flag=True, help="List every skipped file (and, with --dry-run, every change).")
@engine_options
@json_option
def index_command(paths, library_path, file_list, workers, threads, batch_size, index_type, follow_symlinks, max_pixels,
                  retry_failed, dry_run, wait, quiet, verbose, as_json, **model_kwargs) -> None:
    """Add the images under PATHS (folders, files, fsspec URLs) to the library, or bring it up to date.

    Only new and changed files are encoded; deleted files are removed, moved or
    renamed files keep their row, duplicates reuse the stored vector. Broken
    files are skipped and listed at the end. Safe to interrupt: run it again to
    resume.

    \b
    Examples:
      clipfind index ~/Pictures --model-dir ./my-clip-model
      clipfind index ~/Pictures                 # again: only what changed
      clipfind index ~/Pictures --dry-run -v
      clipfind index ~/Pictures --db postgresql+psycopg://me@dbhost/photos   # metadata in PostgreSQL
      clipfind index ~/Pictures --engine ray    # decode + encode on a local Ray cluster
      clipfind index s3://bucket/photos/ --engine ray     # a bucket prefix (needs s3fs)
      clipfind index --file-list paths.txt --engine ray   # one path or URL per line
      clipfind index /data --engine ray --ray-address head:6379 --output-shards /shared/shards
    """
    from retrieval.index.planner import IndexResult, check_roots, plan_index, read_file_list
    from retrieval.model.spec import ModelSpec

    spec, device, precision = pop_model_options(model_kwargs)
    make_stages, ray_options, shards_dir = pop_engine_options(model_kwargs)
    root = str(config.library_path(library_path))
    if not paths and file_list is None:
        raise click.UsageError("give PATHS to index, or --file-list FILE")
    listed = read_file_list(file_list, file_list.name) if file_list is not None else []
    # mistakes first, before a library directory is made; a listed file that is gone is only skipped
    roots = (check_roots(paths) if paths else []) + (check_roots(listed, missing_ok=True) if listed else [])
    # nothing changed: answered on the standard library alone (no SQLAlchemy, numpy, FAISS: index/rerun.py)
    if not (file_list or make_stages or shards_dir or dry_run or index_type):
        from retrieval.index.rerun import unchanged_rerun

        unchanged = unchanged_rerun(root, roots, spec, follow_symlinks, retry_failed, max_pixels)
        if unchanged is not None:
            result, record = unchanged
            note_random(spec or ModelSpec(**record["spec"]))
            return _finish_index(result, as_json, verbose, quiet)

    from retrieval.errors import ModelError
    from retrieval.index.indexer import NO_MODEL, IndexOptions, index_paths
    from retrieval.store.library import Library, library_exists

    options = IndexOptions(workers=workers, threads=threads, batch_size=batch_size, follow_symlinks=follow_symlinks,
                           max_pixels=max_pixels, index_type=index_type, progress=not quiet,
                           wait=wait, dry_run=dry_run, retry_failed=retry_failed,
                           missing_ok=file_list is not None)
    exists = library_exists(root)
    if spec is None and not exists:
        raise ModelError(NO_MODEL)
    if shards_dir and not dry_run:
        return run_export(library_path, roots, shards_dir, spec, device, precision, options, ray_options,
                          as_json)
    if dry_run and not exists:
        plan = plan_index(None, roots, follow_symlinks)
        result = IndexResult(os.path.abspath(root), plan, plan.counts(), plan.skipped, dry_run=True)
    else:
        library = Library.open(root, model=spec)
        record = library.model_record
        note_random(spec or (ModelSpec(**record["spec"]) if record else None))
        with library, _sigterm_as_interrupt():
            result = index_paths(library, roots, spec, device, precision, options, make_stages)
        encoder = library.loaded_encoder  # loaded only if something was encoded
        if verbose and not as_json and encoder is not None and encoder.precision_report:
            from retrieval.model.autoprecision import describe

            click.echo(describe(encoder.precision_report), err=True)
    _finish_index(result, as_json, verbose, quiet)


def _finish_index(result, as_json: bool, verbose: bool, quiet: bool) -> None:
    """The summary of an index run (or dry run), and exit 1 when nothing of it is usable."""
    _report_index(result, as_json, verbose, quiet)
    if result.nothing_indexed:
        raise ClipfindError(f"nothing could be indexed: {len(result.skipped)} files skipped "
                            f"({by_kind(result.skipped)})")


def _report_index(result, as_json: bool, verbose: bool, quiet: bool) -> None:
    plan, stats = result.plan, result.stats
    for message in result.warnings:
        warn(message)
    if as_json:
        out = {"library": result.library, "run_id": result.run_id, "status": result.status,
               "dry_run": result.dry_run, **stats,
               "skipped_files": skipped_json(result.skipped)}
        if result.dry_run:
            out["changes"] = _dry_run_changes(plan)
        emit_json(out)
        return
    c = plan.counts()
    scanned = (f"{c['scanned']} image files: {len(plan.encode)} to encode, {c['duplicates']} duplicates, "
               f"{c['moved']} moved, {c['touched']} touched, {c['unchanged']} unchanged, "
               f"{c['removed']} gone")
    if result.dry_run:
        click.echo(f"dry run, nothing changed. {scanned}")
        if verbose:
            for kind, path in _dry_run_changes(plan):
                click.echo(f"  {kind:<9} {path}")
    else:
        rate = stats.get("encoded", 0) / max(stats.get("seconds", 0), 1e-9)
        click.echo(f"{scanned}")
        click.echo(f"indexed {stats.get('indexed', 0)} in {stats.get('seconds', 0):.1f} s "
                   f"(encoded {stats.get('encoded', 0)}, {rate:.1f} img/s overall); "
                   f"library {result.library}")
        if stats.get("encoded") and stats.get("precision"):
            click.echo(f"encoded with {run_mix(stats)}")
    report_skipped(result.skipped, verbose, quiet)
    if not result.dry_run and c["scanned"] == 0 and not result.skipped:
        warn("no image files found there")


def run_mix(stats: dict) -> str:
    """'onnx-int8 (ONNX Runtime) on cpu, 2 encoder threads, 1 decode worker': what a run used."""
    runtime = "ONNX Runtime" if stats.get("runtime") == "onnx" else "torch"
    parts = [f"{stats['precision']} ({runtime}) on {stats.get('device', 'cpu')}"]
    if stats.get("threads"):
        parts.append(f"{stats['threads']} encoder thread{'s' * (stats['threads'] != 1)}")
    if stats.get("workers") is not None:
        parts.append(f"{stats['workers']} decode worker{'s' * (stats['workers'] != 1)}")
    return ", ".join(parts)


def _dry_run_changes(plan) -> list[tuple[str, str]]:
    out = [("encode", w.entry.path) for w in plan.encode]
    out += [("duplicate", w.entry.path) for w in plan.copies + plan.late_copies]
    out += [("move", w.entry.path) for w in plan.moves]
    out += [("touch", w.entry.path) for w in plan.touches]
    out += [("remove", path) for _, path in plan.gone]
    return [(kind, shown_path(path)) for kind, path in out]


@click.command("status")
@library_option
@json_option
def status_command(library_path, as_json) -> None:
    """What the library holds: images, model, index type, size on disk, last runs."""
    from retrieval.index.inspection import library_status

    with _open(library_path) as library:
        info = library_status(library)
    if as_json:
        emit_json(info)
        return
    index = info["index"]
    sizes = info["size_bytes"]
    click.echo(f"library:   {info['library']}")
    if info["database"].startswith("postgresql"):
        click.echo(f"database:  {info['database']}")
    click.echo(f"images:    {info['images']}")
    click.echo(f"model:     {info['model'] or '(none yet)'}" +
               (f" ({info['embed_dim']}-d)" if info["embed_dim"] else ""))
    if info["vectors_by_precision"]:
        made = ", ".join(f"{k} {v}" for k, v in sorted(info["vectors_by_precision"].items()))
        click.echo(f"vectors:   {made}")
    if info["model"]:
        from retrieval.model.autoprecision import status_line

        click.echo(f"precision: {status_line(info['auto_precision_here'])}")
    click.echo("index:     " + (f"{index['type']}, {index['vectors']} vectors" if index else "not built yet")
               + (f" ({info['log_entries']} changes to catch up)" if info["log_entries"] and index else ""))
    click.echo(f"on disk:   database {human_size(sizes['database'])}, index {human_size(sizes['index'])}")
    for label, run in (("last run", info["last_run"]), ("last index", info["last_index_run"])):
        if run and (label == "last run" or run["id"] != info["last_run"]["id"]):
            s = run["stats"]
            detail = ", ".join(f"{k} {s[k]}" for k in ("indexed", "encoded", "removed", "skipped", "seconds")
                               if s.get(k))
            state = run["status"] + (f" ({run['note']})" if run.get("note") else "")
            click.echo(f"{label + ':':<10} {run['kind']} #{run['id']} {state} at {run['started_at'][:19]}"
                       + (f" [{run['precision']} on {run['device']}]" if run["precision"] else "")
                       + (f": {detail}" if detail else ""))
    click.echo(f"skipped:   {info['skipped_last_index_run']} files in the last index run "
               f"({info['errors_recorded']} recorded in all)")


@click.command("verify")
@library_option
@click.option("--no-files", is_flag=True, help="Do not check that the indexed files are still on disk.")
@click.option("--sample", type=click.IntRange(0), default=1000, show_default=True,
              help="Vectors to compare between FAISS and the database.")
@click.option("--wait", is_flag=True, help="Wait for a running writer instead of refusing.")
@click.option("--verbose", "-v", is_flag=True, help="List every missing file.")
@json_option
def verify_command(library_path, no_files, sample, wait, verbose, as_json) -> None:
    """Check that database, FAISS index and files agree; exit 6 if they do not."""
    from retrieval.index.inspection import VerifyReport, damaged_finding, verify_library
    from retrieval.store.integrity import DamagedDatabase
    from retrieval.store.library import Library

    try:
        with Library.open(library_path, create=False, check=False) as library:
            report = verify_library(library, wait=wait, sample=sample, check_files=not no_files)
    except DamagedDatabase as exc:  # too damaged to open at all: still a finding, not a refusal
        report = VerifyReport()
        report.problem("integrity", damaged_finding(exc.detail, exc.hint))
    if as_json:
        out = report.as_dict()
        out["missing_files"] = [shown_path(p) for p in report.missing]
        emit_json(out)
    else:
        checked = report.checked
        click.echo(f"checked {checked.get('images', 0)} images, {checked.get('index_vectors', 0)} "
                   f"vectors ({checked.get('index_type', '-')}), {checked.get('spot_checked', 0)} spot-checked")
        for note in report.notes:
            click.echo(f"note: {note}")
        for problem in report.problems:
            click.echo(f"PROBLEM: {problem}")
        for path in report.missing if verbose else report.missing[:10]:
            click.echo(f"  missing {shown_path(path)}")
        if len(report.missing) > 10 and not verbose:
            click.echo(f"  ... and {len(report.missing) - 10} more (--verbose lists all)")
        if report.ok:
            click.echo("ok")
    if not report.ok:
        raise VerifyError(f"verify found {len(report.problems)} problem(s)")


@click.command("remove")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@library_option
@click.option("--dry-run", is_flag=True, help="Show what would be removed.")
@click.option("--wait", is_flag=True, help="Wait for a running writer instead of refusing.")
@click.option("--verbose", "-v", is_flag=True, help="List every removed image.")
@json_option
def remove_command(paths, library_path, dry_run, wait, verbose, as_json) -> None:
    """Forget the images at or under PATHS (files or folders; they need not exist any more)."""
    from retrieval.index.indexer import remove_paths

    matched: list[str] = []
    with _open(library_path) as library:
        n = remove_paths(library, paths, dry_run=dry_run, wait=wait, on_match=matched.append)
    if as_json:
        emit_json({"removed": 0 if dry_run else n, "matched": n, "dry_run": dry_run,
                   "paths": [shown_path(p) for p in matched]})
        return
    if verbose:
        for path in matched:
            click.echo(f"  {shown_path(path)}")
    if not n:
        click.echo("no indexed images there; nothing removed")
    else:
        click.echo(f"{'would remove' if dry_run else 'removed'} {n} images")


@click.command("reindex")
@library_option
@click.option("--index-type", metavar="FACTORY",
              help="FAISS factory string, or auto: planned from --memory-budget and tuned to --recall "
                   "(default: keep the current type).")
@click.option("--memory-budget", metavar="SIZE",
              help="With --index-type auto: RAM the index may use when searching, e.g. 512M, 4G (default 4G).")
@click.option("--recall", type=click.FloatRange(0, 1, min_open=True),
              help="With --index-type auto: recall@10 against exact search to tune for (default 0.95).")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="First re-encode every image at this precision (e.g. fp32), then rebuild.")
@click.option("--device", default="auto", show_default=True, help="With --precision: auto, cpu, cuda, mps.")
@click.option("--wait", is_flag=True, help="Wait for a running writer instead of refusing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def reindex_command(library_path, index_type, memory_budget, recall, precision, device, wait, quiet,
                    as_json) -> None:
    """Rebuild the FAISS index from the stored vectors; with --precision, re-encode them first.

    Without --precision nothing is re-encoded. With it, every image is encoded
    again at that precision, so a library whose vectors were made at different
    precisions (`clipfind verify` reports it) becomes uniform.

    \b
    Examples:
      clipfind reindex
      clipfind reindex --index-type IVF1024,Flat
      clipfind reindex --index-type HNSW32
      clipfind reindex --index-type auto --memory-budget 4G --recall 0.95
      clipfind reindex --precision fp32      # re-embed everything at fp32
    """
    from retrieval.index.refresh import rebuild_index
    from retrieval.store.index_plan import parse_size

    budget = parse_size(memory_budget) if memory_budget else None
    if (budget or recall) and (index_type or "auto") != "auto":
        raise click.UsageError("--memory-budget and --recall go with --index-type auto")
    if (budget or recall) and not index_type:
        index_type = "auto"
    redone = None
    with _open(library_path) as library:
        if precision:
            from retrieval.index.reembed import reembed

            redone = reembed(library, precision, device, wait=wait, progress=not quiet)
        stats = rebuild_index(library, index_type, wait=wait, memory_budget=budget, recall=recall)
    if redone is not None:
        stats["reembedded"] = redone
    if as_json:
        emit_json(stats)
        return
    if redone is not None:
        made = ", ".join(f"{k} {v}" for k, v in sorted(redone["vectors_by_precision"].items()))
        click.echo(f"re-embedded {redone['reembedded']} of {redone['images']} images at {redone['precision']} "
                   f"in {redone['seconds']:.1f} s (vectors now: {made})")
        if redone["stale"]:
            warn(f"{redone['stale']} files are gone or changed on disk and kept their old vectors; "
                 "run `clipfind index` on their folders, then reindex again")
    click.echo(f"rebuilt a {stats['index_type']} index of {stats['vectors']} vectors "
               f"in {stats['seconds']:.1f} s")
    if stats.get("reason"):
        click.echo(f"  why: {stats['reason']}")
    tuned = stats.get("tuned")
    if tuned:
        knob = f"nprobe {tuned['nprobe']}" if tuned["nprobe"] else f"efSearch {tuned['efsearch']}"
        rerank = f", re-ranking {tuned['refine']}x{tuned['k']} candidates exactly" if tuned["refine"] > 1 else ""
        click.echo(f"  tuned: {knob}{rerank}: recall@{tuned['k']} {tuned['recall']:.3f} "
                   f"on {tuned['queries']} held-out queries (target {tuned['target']})")
        if tuned["recall"] < tuned["target"]:
            warn(f"the recall target {tuned['target']} was not reached; raise --memory-budget for "
                 "an index that keeps more of each vector")


@click.command("backup")
@click.argument("destination", type=click.Path())
@library_option
@click.option("--wait", is_flag=True, help="Wait for a running writer instead of refusing.")
@json_option
def backup_command(destination, library_path, wait, as_json) -> None:
    """Copy the library (database and FAISS files) to the new folder DESTINATION.

    The database is copied with SQLite's online backup API and checked; the
    folder appears only once the copy is complete. To restore, stop anything
    using the library and replace its folder with the backup.

    \b
    Examples:
      clipfind backup ~/backups/photos-$(date +%F)
      clipfind backup /mnt/usb/clipfind-copy --wait
    """
    from retrieval.store.backup import backup_library

    with _open(library_path) as library:
        info = backup_library(library, destination, wait=wait)
    if as_json:
        emit_json(info)
        return
    click.echo(f"backed up {info['images']} images ({human_size(info['database_bytes'])} database"
               + (", FAISS index" if info["index_files"] else "") + f") to {info['backup']} "
               f"in {info['seconds']:.1f} s")


COMMANDS = [index_command, status_command, verify_command, remove_command, reindex_command,
            backup_command]
