"""clipfind: search and auto-tag image collections with CLIP (open_clip + FAISS + SQLite).

`from retrieval import Library, ModelSpec` works, but the names load lazily so
that importing a light submodule (images, scan) does not pay for torch.
"""

from __future__ import annotations

__all__ = ["ClipfindError", "Encoder", "Library", "ModelSpec"]

_HOMES = {
    "ClipfindError": "retrieval.errors",
    "Encoder": "retrieval.model.encoder",
    "ModelSpec": "retrieval.model.spec",
    "Library": "retrieval.facade",
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
