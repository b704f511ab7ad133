"""The search box's syntax, the CLI's in one line: `"red car" beach^2 -people --not night`.

Each word or quoted phrase is a text term (as each argument of `clipfind
search` is), `TERM^W` weighs it, and `-TERM` or `--not TERM` pushes results
away from it, like `--not`. Images join the query from the page (an upload or
"search with this"), never as paths typed into the box.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from retrieval.errors import InputError

MAX_TERMS = 32


@dataclass
class BoxTerms:
    texts: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)


def parse_box(line: str) -> BoxTerms:
    """Split the box's text into positive and negative terms (weights stay on the terms)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise InputError(f"cannot read the query: {exc} (close the quote)") from None
    out = BoxTerms()
    negate_next = False
    for word in words:
        if negate_next:
            out.negatives.append(word)
            negate_next = False
        elif word == "--not":
            negate_next = True
        elif word.startswith("-") and len(word) > 1 and not _is_number(word):
            out.negatives.append(word[1:])
        else:
            out.texts.append(word)
    if negate_next:
        raise InputError("--not needs a term after it")
    if len(out.texts) + len(out.negatives) > MAX_TERMS:
        raise InputError(f"at most {MAX_TERMS} terms in one query")
    return out


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True
