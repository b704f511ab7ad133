"""Thin launcher: `python cli.py ...` from a checkout runs clipfind (installed: the `clipfind` script)."""

from retrieval.cli import main

if __name__ == "__main__":
    main()
