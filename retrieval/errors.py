"""Errors a user can cause, each with its own exit code.

The CLI turns any `ClipfindError` into one line on stderr and this exit code,
so scripts can tell "your model spec is wrong" from "your library is locked"
without parsing text. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran but could not do its job (e.g. nothing indexed)
EXIT_USAGE = 2  # bad flags or arguments (click's own code)
EXIT_MODEL = 3  # model spec unknown, weights missing or not matching
EXIT_LIBRARY = 4  # library unusable: missing or empty, unwritable, newer schema, other model, locked
EXIT_INPUT = 5  # bad input data: unreadable query image, bad label file, bad dataset
EXIT_VERIFY = 6  # `verify` found the library inconsistent
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: what was committed is kept

# One line per code, in the words of the README's exit-code table; a test keeps the two equal.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_FAILURE: "failed: the command ran but could not do its job",
    EXIT_USAGE: "usage error: bad flags or arguments",
    EXIT_MODEL: "model error: unknown model, weights missing or not matching",
    EXIT_LIBRARY: "library error: missing, empty, unwritable, damaged, disk full, newer schema, another model, locked, database unreachable",
    EXIT_INPUT: "bad input: unreadable image, bad label file or dataset",
    EXIT_VERIFY: "`verify` found problems",
    EXIT_INTERRUPTED: "interrupted: everything committed so far is kept; run again to resume",
}

EXIT_CODES_HELP = "Exit codes: " + "; ".join(
    f"{code} {meaning.split(':')[0]}" for code, meaning in EXIT_CODES.items()) + "."


class ClipfindError(Exception):
    """A problem the user can fix; the message is one line that says how."""

    exit_code = EXIT_FAILURE


class UsageError(ClipfindError):
    """A value no command could act on (a weight of 1e39, say), found past click's own checks."""

    exit_code = EXIT_USAGE


class ModelError(ClipfindError):
    exit_code = EXIT_MODEL


class LibraryError(ClipfindError):
    exit_code = EXIT_LIBRARY


class InputError(ClipfindError):
    exit_code = EXIT_INPUT


class EngineError(ClipfindError):
    """The distributed engine could not run the job: Ray missing, or its address not answering."""

    exit_code = EXIT_FAILURE


class VerifyError(ClipfindError):
    exit_code = EXIT_VERIFY
