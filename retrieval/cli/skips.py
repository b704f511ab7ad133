"""The skip report (files a run could not use, and why), one shape for `index` and `ingest`."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import click

from retrieval.query.render import shown_path


def by_kind(skipped: Sequence) -> str:
    """'2 corrupt, 1 vanished': items with a `kind`."""
    return ", ".join(f"{n} {kind}" for kind, n in Counter(s.kind for s in skipped).most_common())


def skipped_json(skipped: Sequence) -> list[dict]:
    return [{"path": shown_path(s.path), "kind": s.kind, "message": shown_path(s.message)} for s in skipped]


def report_skipped(skipped: Sequence, verbose: bool, quiet: bool) -> None:
    """One line with the counts by kind; with --verbose, a line per file."""
    if not skipped:
        return
    click.echo(f"skipped {len(skipped)} files: {by_kind(skipped)}"
               + ("" if verbose else " (--verbose lists them)"), err=not verbose and quiet)
    if verbose:
        for s in skipped:
            click.echo(f"  {s.kind:<11} {shown_path(s.path)}: {shown_path(_reason(s.path, s.message))}")


def _reason(path: str, message: str) -> str:
    for prefix in (f"{path}: ", f"{os.path.basename(path)}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message
