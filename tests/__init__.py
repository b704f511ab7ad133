"""clipfind test suite (a package so tests/models can be imported by bench/ too)."""
