"""Which FAISS index a collection gets from its size and a memory budget (`--index-type auto`).

The rule follows autofaiss: the fastest structure whose search-time footprint
fits the budget. HNSW keeps full vectors and a graph in RAM (best latency at
high recall); IVF-Flat keeps full vectors in memory-mapped inverted lists (the
page cache holds them when the budget does); OPQ+IVF+PQ stores `m` bytes a
vector, and the candidates it returns are re-ranked exactly from the stored
vectors, because a few bytes cannot order close neighbours on their own.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from retrieval.errors import InputError

EXACT_LIMIT = 100_000  # below this an exact scan is fast and perfect (same rule as vectors.choose_factory)
HNSW_M = 32
HNSW_MAX = 2_000_000  # a bigger graph takes hours to build on a few cores; IVF builds in minutes
ID_BYTES = 8  # each inverted-list entry stores its int64 id beside its code
PQ_SIZES = (128, 64, 32, 16, 8)  # bytes per vector, best first
TRAIN_PER_LIST = 32  # k-means wants >= ~39 points per centroid; 32 keeps FAISS quiet enough and trains fast
MAX_TRAIN = 300_000
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class IndexPlan:
    """What to build and why; recorded in index.json beside the tuned search parameters."""

    kind: str  # flat | hnsw | ivf-flat | ivf-pq
    factory: str  # FAISS index_factory string
    nlist: int  # inverted lists (0 for flat / hnsw)
    bytes_per_vector: int  # the search-time footprint per vector
    train_size: int  # vectors sampled to train the quantisers
    reason: str

    @property
    def on_disk(self) -> bool:
        """IVF kinds are merged into a memory-mapped file; flat and HNSW live in RAM."""
        return self.kind in ("ivf-flat", "ivf-pq")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5G', '1000000' -> bytes (powers of 1024, like `free -h`)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(text).upper())
    if not match:
        raise InputError(f"cannot read {text!r} as a size: use e.g. 512M, 4G")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 1:
        raise InputError(f"a memory budget of {text!r} is too small")
    return int(value)


def nlist_for(n: int) -> int:
    """About 4*sqrt(n) lists, a power of two, 256..65536 (the FAISS wiki's 4-16*sqrt(n) guidance)."""
    target = 4 * math.sqrt(max(n, 1))
    return int(min(65536, max(256, 2 ** round(math.log2(target)))))


def plan_index(n: int, dim: int, memory_budget: int, exact_limit: int = EXACT_LIMIT) -> IndexPlan:
    """Pick the index for `n` vectors of `dim` floats whose search must fit `memory_budget` bytes."""
    if n < exact_limit:
        return IndexPlan("flat", "Flat", 0, 4 * dim + ID_BYTES, 0,
                         f"{n} vectors: an exact scan is fast and loses nothing")
    hnsw_bytes = 4 * dim + 2 * HNSW_M * 4 + ID_BYTES
    if n * hnsw_bytes <= memory_budget and n <= HNSW_MAX:
        return IndexPlan("hnsw", f"HNSW{HNSW_M}", 0, hnsw_bytes, 0,
                         f"the graph ({_gb(n * hnsw_bytes)}) fits the budget ({_gb(memory_budget)})")
    nlist = nlist_for(n)
    train = int(min(n, MAX_TRAIN, max(TRAIN_PER_LIST * nlist, 65_536)))
    flat_bytes = 4 * dim + ID_BYTES
    if n * flat_bytes <= memory_budget:
        return IndexPlan("ivf-flat", f"IVF{nlist},Flat", nlist, flat_bytes, train,
                         f"full vectors ({_gb(n * flat_bytes)}) fit the budget; too many for HNSW")
    for m in PQ_SIZES:
        if dim % m == 0 and m < dim and n * (m + ID_BYTES) <= memory_budget:
            return IndexPlan("ivf-pq", f"OPQ{m},IVF{nlist},PQ{m}", nlist, m + ID_BYTES, train,
                             f"full vectors ({_gb(n * flat_bytes)}) exceed the budget; "
                             f"{m}-byte codes ({_gb(n * (m + ID_BYTES))}) fit")
    smallest = min(m for m in PQ_SIZES if dim % m == 0)
    raise InputError(f"{n} vectors need at least {_gb(n * (smallest + ID_BYTES))} even as {smallest}-byte "
                     f"codes; raise --memory-budget above {_gb(memory_budget)}")


def _gb(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB" if nbytes >= 1 << 28 else f"{nbytes / (1 << 20):.0f} MiB"
