"""The long-running query server and the CLI's client for it."""
