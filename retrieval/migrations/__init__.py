"""Alembic migrations for the library's SQLite schema (run by `retrieval.store.library`)."""
