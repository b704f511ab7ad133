"""What the runs table says about the stored vectors: which precisions made them.

Why it matters: a library whose vectors were made at different precisions
ranks images on slightly different embeddings, so `status` shows the mix,
`verify` reports it and `index` warns before adding to it. Plain SQL, no torch.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine


def vectors_by_precision(engine: Engine) -> dict[str, int]:
    """How many stored vectors each precision made ('unknown': no run or no precision recorded)."""
    with engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT coalesce(r.precision, 'unknown'), count(*) FROM images i "
            "LEFT JOIN runs r ON r.id = i.run_id GROUP BY 1 ORDER BY 1")).all())


def mixed_precision_runs(engine: Engine) -> list[dict]:
    """The runs whose vectors are still stored, when they used more than one precision; else [].

    Judged by the vectors the library holds now, not by run history: a run whose
    images were all re-embedded or removed since no longer counts.
    """
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT i.run_id AS run_id, r.kind AS kind, r.status AS status, r.precision AS precision, "
            "count(*) AS images FROM images i LEFT JOIN runs r ON r.id = i.run_id "
            "GROUP BY i.run_id ORDER BY i.run_id")).mappings().all()
    runs = [{**dict(r), "precision": r["precision"] or "unknown"} for r in rows]
    return runs if len({r["precision"] for r in runs}) > 1 else []


def mixed_precision_problem(engine: Engine) -> str | None:
    """verify's sentence for a library whose vectors were made at different precisions."""
    counts = vectors_by_precision(engine)
    if len(counts) <= 1:
        return None
    made = ", ".join(f"{n} at {p}" for p, n in sorted(counts.items()))
    return (f"vectors made at different precisions ({made}); scores mix slightly different "
            "embeddings (run `clipfind reindex --precision fp32`, or another single precision)")
