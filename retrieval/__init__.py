"""clipfind: search and auto-tag image collections with CLIP (open_clip + FAISS + SQLite)."""

from retrieval.encoder import Encoder, ModelSpec
from retrieval.errors import ClipfindError
from retrieval.library import Library

__all__ = ["ClipfindError", "Encoder", "Library", "ModelSpec"]
