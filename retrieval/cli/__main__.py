"""`python -m retrieval.cli` runs clipfind (what the tests and benchmarks spawn)."""

from retrieval.cli import main

main()
