"""Errors a user can cause, each with its own exit code.

The CLI turns any `ClipfindError` into one line on stderr and this exit code,
so scripts can tell "your model spec is wrong" from "your library is locked"
without parsing text. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_FAILURE = 1  # the command ran but could not do its job (e.g. nothing indexed)
EXIT_USAGE = 2  # bad flags or arguments (click's own code)
EXIT_MODEL = 3  # model spec unknown, weights missing or not matching
EXIT_LIBRARY = 4  # library unusable: unwritable, newer schema, other model, locked
EXIT_INPUT = 5  # bad input data: unreadable query image, bad label file, bad dataset
EXIT_VERIFY = 6  # `verify` found the library inconsistent

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 failed; 2 usage error; 3 model error (unknown model, weights "
    "missing or not matching); 4 library error (unwritable, newer schema, other model, "
    "locked); 5 bad input (unreadable image, bad label file or dataset); 6 verify found "
    "problems; 130 interrupted."
)


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


class VerifyError(ClipfindError):
    exit_code = EXIT_VERIFY
