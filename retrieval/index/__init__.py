"""The indexing operations: plan a run, run it (decode, encode, commit, refresh FAISS), inspect and repair a library."""
