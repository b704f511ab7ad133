"""The seeded sample of stored vectors (concept negatives, the relevance background), on a real SQLite table."""

from __future__ import annotations

import numpy as np
from sqlalchemy import create_engine, text

from retrieval.store.sampling import sample_vectors
from retrieval.store.schema import vector_to_blob


def make_images(tmp_path, n: int, dim: int = 4):
    engine = create_engine(f"sqlite:///{tmp_path / 'lib.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE images (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT, embedding BLOB)"))
        conn.execute(text("CREATE INDEX ix_path ON images (path)"))
        for i in range(n):
            conn.execute(text("INSERT INTO images (path, embedding) VALUES (:p, :e)"),
                         {"p": f"{i}.png", "e": vector_to_blob(np.full(dim, i, np.float32))})
    return engine


def test_a_sample_is_seeded_excludes_what_it_is_told_and_reads_each_rows_own_vector(tmp_path):
    engine = make_images(tmp_path, 300)
    ids, vectors = sample_vectors(engine, 4, 50, seed=1, exclude={1, 2, 3})
    assert len(ids) == 50 and len(set(ids)) == 50 and not {1, 2, 3} & set(ids.tolist())
    assert np.array_equal(vectors[:, 0], ids - 1)  # row i (id i + 1) holds the vector (i, i, i, i)
    again, _ = sample_vectors(engine, 4, 50, seed=1, exclude={1, 2, 3})
    assert np.array_equal(ids, again)


def test_removed_images_are_never_sampled(tmp_path):
    engine = make_images(tmp_path, 300)
    with engine.begin() as conn:  # gaps in the ids: the sample must not invent the missing ones
        conn.execute(text("DELETE FROM images WHERE id % 3 = 0"))
    ids, vectors = sample_vectors(engine, 4, 150, seed=2)
    assert len(ids) == 150 and np.all(ids % 3 != 0)
    assert np.array_equal(vectors[:, 0], ids - 1)
    everything, _ = sample_vectors(engine, 4, 10_000)
    assert len(everything) == 200 and np.all(np.diff(everything) > 0)
