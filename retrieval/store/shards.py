"""Embedding shards: parquet files of rows + a manifest, the hand-off between a cluster and a library.

Why files between stages (clip-retrieval's lesson): a cluster that embeds 50 million
images need not reach the library's database; it writes shards, and `clipfind ingest`
loads them wherever the library lives. Each shard holds the rows a library stores
(path, size, mtime, content hash, header facts, float32 embedding bytes) and names the
model fingerprint in its own parquet metadata; `manifest.json` lists every shard with
its row count, size and SHA-256, the model record and the precision. A shard is written
to a temp file and renamed, and the manifest is replaced atomically after it, so a
killed writer leaves complete shards and a manifest that lists only complete ones.
Reading checks all of that before a single row is used: a truncated or altered shard,
or one from another model, is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.errors import InputError, LibraryError
from retrieval.store.vectors import fsync_write

MANIFEST = "manifest.json"
FORMAT = "clipfind-shards"
VERSION = 1
COLUMNS = ("path", "size", "mtime_ns", "content_hash", "width", "height", "format", "taken_at", "embedding")


def _schema():
    import pyarrow as pa

    return pa.schema([("path", pa.binary()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                      ("content_hash", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                      ("format", pa.string()), ("taken_at", pa.string()), ("embedding", pa.binary())])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Manifest:
    model: dict  # the library's model record (`Encoder.describe()`): spec, fingerprint, embed_dim
    precision: str
    device: str
    shards: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return str(self.model["fingerprint"])

    @property
    def rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "model": self.model,
                           "precision": self.precision, "device": self.device,
                           "shards": self.shards, "skipped": self.skipped}, indent=1)


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest, or InputError (exit 5) in one line."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise InputError(f"no such shard folder: {folder}")
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder} holds no {MANIFEST}: not a folder of clipfind shards") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{path} is not a clipfind shard manifest")
    if doc.get("version") != VERSION:
        raise InputError(f"{path} is shard format version {doc.get('version')}; this clipfind reads {VERSION}")
    try:
        model = doc["model"]
        manifest = Manifest(model, str(doc["precision"]), str(doc["device"]), list(doc["shards"]),
                            list(doc.get("skipped", [])))
        _ = (model["fingerprint"], int(model["embed_dim"]), model["spec"])
        for s in manifest.shards:
            _ = (s["file"], int(s["rows"]), int(s["bytes"]), s["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path} is damaged (missing or bad field {exc})") from None
    return manifest


class ShardWriter:
    """Writes shards into one folder for one model; resumes a folder a killed run left."""

    def __init__(self, folder: Path, model: dict, precision: str, device: str) -> None:
        self.folder = Path(folder)
        self.run = uuid.uuid4().hex[:8]
        self.manifest = Manifest(model, precision, device)
        self.count = 0

    def open(self) -> dict[bytes, dict]:
        """Create the folder, or take over one written before with the same model.

        Returns path bytes -> row (a dict of COLUMNS) for the rows already in it, so a resumed
        run encodes only the rest. Shard files the manifest does not list (a writer killed between
        its shard and its manifest) are removed.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / MANIFEST).exists():
            if any(self.folder.iterdir()):
                raise InputError(f"{self.folder} is not empty and holds no {MANIFEST}; "
                                 "give a new or empty folder for the shards")
            self._save()
            return {}
        old = read_manifest(self.folder)
        if old.fingerprint != self.manifest.fingerprint:
            raise LibraryError(f"{self.folder} holds shards of another model (fingerprint {old.fingerprint}, "
                               f"not {self.manifest.fingerprint}); give another folder")
        listed = {s["file"] for s in old.shards}
        for stray in self.folder.iterdir():
            if stray.name.lstrip(".").startswith("shard-") and stray.name not in listed:
                stray.unlink()
        for entry in old.shards:
            check_shard(self.folder, old, entry)
        self.manifest.shards, self.manifest.skipped = old.shards, []
        return {row["path"]: row for table in read_shards(self.folder, old) for row in table.to_pylist()}

    def write(self, rows: list[dict]) -> None:
        """One shard of `rows` (dicts with COLUMNS), then the manifest that lists it."""
        if not rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=_schema()).replace_schema_metadata(
            {b"clipfind.fingerprint": self.manifest.fingerprint.encode(),
             b"clipfind.embed_dim": str(self.manifest.model["embed_dim"]).encode()})
        name = f"shard-{self.run}-{self.count:05d}.parquet"
        self.count += 1
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self.manifest.shards.append({"file": name, "rows": len(rows), "bytes": final.stat().st_size,
                                     "sha256": _sha256(final)})
        self._save()

    def finish(self, skipped: list[dict]) -> Manifest:
        self.manifest.skipped = skipped
        self._save()
        return self.manifest

    def _save(self) -> None:
        fsync_write(self.folder / MANIFEST, lambda tmp: tmp.write_bytes(self.manifest.to_json().encode()))


def check_shard(folder: Path, manifest: Manifest, entry: dict) -> None:
    """One listed shard is whole, unaltered and of the manifest's model; else one line (exit 5/4)."""
    path = Path(folder) / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"shard {entry['file']} is listed in the manifest but missing from {folder}") from None
    if size != int(entry["bytes"]):
        raise InputError(f"shard {entry['file']} is truncated or damaged ({size} bytes, the manifest says "
                         f"{entry['bytes']}); write it again")
    if _sha256(path) != entry["sha256"]:
        raise InputError(f"shard {entry['file']} is damaged (its SHA-256 differs from the manifest's); "
                         "write it again")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"shard {entry['file']} is not a readable parquet file ({exc})") from None
    fingerprint = (schema.metadata or {}).get(b"clipfind.fingerprint", b"").decode()
    if fingerprint != manifest.fingerprint:
        raise LibraryError(f"shard {entry['file']} was made with model fingerprint {fingerprint or 'unknown'}, "
                           f"not {manifest.fingerprint} like the rest of {folder}")
    if meta.num_rows != int(entry["rows"]) or list(schema.names) != list(COLUMNS):
        raise InputError(f"shard {entry['file']} does not hold the rows its manifest lists")


def read_shards(folder: Path, manifest: Manifest):
    """Each listed shard as a pyarrow Table, in manifest order; call `check_shard` on all first."""
    import pyarrow.parquet as pq

    for entry in manifest.shards:
        yield pq.read_table(Path(folder) / entry["file"])
