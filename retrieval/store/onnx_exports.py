"""A library's ONNX exports: where they live, making them once, checking them, opening them.

Layout: `<library>/onnx/<weights fingerprint>/<precision>/` (see
`retrieval.model.onnx_export` for what a folder holds). The fp32 export is
made when the library's model is first bound (the first index) and again on
demand when a query finds it missing, truncated or stale; one process at a
time exports (a lock file), the others wait and then use its result. Exports
of other weights are removed when a new one is made.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.model.onnx_export import ExportError, export_towers, problems, remove_leftovers

if TYPE_CHECKING:
    from retrieval.model.encoder import Encoder
    from retrieval.model.onnx_session import OnnxEncoder
    from retrieval.store.library import Library

ONNX_DIR = "onnx"
LOCK_FILE = ".export.lock"

__all__ = ["ExportError", "ensure_export", "export_folder", "export_problems", "open_export"]


def export_folder(library: Library, precision: str = "fp32", fingerprint: str | None = None) -> Path:
    if fingerprint is None:
        record = library.model_record
        if record is None:
            raise ExportError(f"the library at {library.root} has no model yet")
        fingerprint = record["fingerprint"]
    return Path(library.root) / ONNX_DIR / fingerprint / precision


@contextlib.contextmanager
def _export_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def machine_export(fingerprint: str, precision: str) -> Path:
    """The machine-wide copy of an export ($CLIPFIND_CACHE/onnx/...): libraries of the same
    weights share one export instead of tracing the model again (seconds for a ViT-B-32)."""
    from retrieval.model.onnx_tower import machine_folder

    return machine_folder(fingerprint, precision)


def _share(source: Path, target: Path) -> None:
    """Put a copy of the export folder `source` at `target`, atomically.

    Copies, not hard links: a file damaged in place in one library must not damage
    the machine's copy and every library made from it."""
    from retrieval.model.onnx_export import swap_into_place

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from other users of the library
    try:
        for entry in source.iterdir():
            shutil.copyfile(entry, tmp / entry.name)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_export(library: Library, precision: str = "fp32", encoder: Encoder | None = None,
                  notice: Callable[[str], None] | None = None) -> Path:
    """The folder of a sound export at `precision`, exporting first if it is missing or stale.

    Without `encoder` the library's model is loaded (torch) only when an export is
    needed. Raises ExportError when exporting fails (the caller falls back to torch).
    """
    record = library.model_record
    if record is None:
        raise ExportError(f"the library at {library.root} has no model yet")
    fingerprint = record["fingerprint"]
    folder = export_folder(library, precision, fingerprint)
    found = problems(folder, fingerprint, precision)
    if not found:
        return folder
    root = Path(library.root) / ONNX_DIR
    try:
        with _export_lock(root):
            found = problems(folder, fingerprint, precision)
            if not found:  # another process exported while we waited
                return folder
            if notice is not None:
                notice(f"{found[0]}; exporting the model to ONNX (once; a minute or two for a ViT-B model on a small CPU)")
            remove_leftovers(folder.parent)
            for other in root.iterdir():  # exports of weights this library no longer uses
                if other.is_dir() and other.name != fingerprint and not other.name.startswith("."):
                    shutil.rmtree(other, ignore_errors=True)
            shared = machine_export(fingerprint, precision)
            if problems(shared, fingerprint, precision, full=True):  # hashed: shared widely
                if encoder is None:
                    encoder = library.encoder()
                export_towers(encoder, folder, precision)
                with contextlib.suppress(OSError):  # a read-only cache costs the next library an export
                    _share(folder, shared)
            else:
                _share(shared, folder)
    except OSError as exc:
        raise ExportError(f"cannot write the ONNX export under {root}: {exc.strerror or exc}") from exc
    return folder


def open_export(library: Library, precision: str = "fp32", threads: int | None = 1,
                notice: Callable[[str], None] | None = None, **options) -> OnnxEncoder:
    """An OnnxEncoder over the library's export (made first if needed; `options` are
    OnnxEncoder's); raises ExportError or OnnxUnavailable when ONNX cannot serve this library."""
    from retrieval.model.onnx_session import OnnxEncoder, OnnxUnavailable, onnxruntime_available

    if not onnxruntime_available():
        raise OnnxUnavailable("onnxruntime is not installed")
    return OnnxEncoder(ensure_export(library, precision, notice=notice), threads=threads, **options)


def export_problems(library: Library, full: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes) for `clipfind verify`: a damaged or stale export is a problem
    (a query would rebuild it), none at all only a note."""
    record = library.model_record
    root = Path(library.root) / ONNX_DIR
    if record is None:
        return [], []
    folder = export_folder(library, "fp32", record["fingerprint"])
    if not folder.exists():
        return [], [f"no ONNX export yet: the first query makes it ({folder})"]
    found = problems(folder, record["fingerprint"], "fp32", full=full)
    found = [f"{p}; the next query re-exports it" for p in found]
    leftovers = [p.name for p in (folder.parent.iterdir() if folder.parent.is_dir() else [])
                 if p.name.startswith(".tmp-")]
    notes = [f"leftovers of an interrupted ONNX export in {folder.parent}: {', '.join(leftovers)}"] \
        if leftovers else []
    stale = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
             and p.name != record["fingerprint"]] if root.is_dir() else []
    if stale:
        notes.append(f"ONNX exports of other weights in {root}: {', '.join(stale)}")
    return found, notes
