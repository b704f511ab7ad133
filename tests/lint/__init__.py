"""Import-linter contracts of our own (`lint-imports` loads them by dotted path)."""
