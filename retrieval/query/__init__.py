"""The query operations: query and filter types, the searcher, the text-embedding cache, result rendering."""
