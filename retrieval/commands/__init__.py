"""Click commands, one module per family; `cli.py` assembles them into `clipfind`."""
