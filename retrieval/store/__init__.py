"""The store floor: the SQLAlchemy schema, the library directory (lock, runs, meta, model binding) and the FAISS vector cache."""
