"""A user's mistake is a type: what an entry point prints as one line, and what it lets through.

Every mistake a user can make (a bad option, a missing or wrong file, a run or cache directory
that holds something else) is raised as a :class:`UserError`. An entry point prints those as one
``error: ...`` line and exits 2 (:func:`exit_on_user_error`); any other exception is a bug and
keeps its traceback. ``TITOK_FULL_ERROR=1`` shows the traceback of a user error too (as Hydra's
``HYDRA_FULL_ERROR``).

The classes also derive from the built-in exception a caller would catch (a bad option is a
ValueError, a missing file a FileNotFoundError), so code that catches those keeps working::

    UserError
    ├── UsageError        (ValueError)         a bad option or value
    ├── MissingFileError  (FileNotFoundError)  a file, folder or dataset that is not there
    ├── BadFileError      (ValueError)         one that is there but of the wrong kind, shape or content
    ├── PathTakenError    (FileExistsError)    a path the job would write that holds something else
    ├── MismatchError     (ValueError)         a run or cache directory that holds something else
    └── MissingPackageError (ImportError)      an optional extra that is not installed
"""
from __future__ import annotations

import contextlib
import os
import sys

FULL_ERROR_ENV = "TITOK_FULL_ERROR"


# The line a stopped job prints (Ctrl-C, SIGTERM): what it saved is where the same command continues.
RESUME_HINT = "interrupted: run the same command to resume"


class UserError(Exception):
    """A user's mistake; the message is one line that names the problem (and, when there is one, the fix).

    Raised in a DataLoader worker, it comes back to the main process rebuilt from the worker's
    whole traceback (``Caught <Name> in DataLoader worker ...``; torch's ExceptionWrapper.reraise):
    the message is cut back to the original line, so the user still reads one line.
    """

    def __init__(self, *args):
        name = type(self).__name__
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith(f"Caught {name} "):
            args = (args[0].rstrip().rsplit("\n", 1)[-1].split(f"{name}: ", 1)[-1],)
        super().__init__(*args)


class UsageError(UserError, ValueError):
    """A bad option or value: on the command line, in a config, or passed to a function."""


class MissingFileError(UserError, FileNotFoundError):
    """A file, folder or dataset that is not where the user said."""


class BadFileError(UserError, ValueError):
    """A file or dataset that is there but cannot be used: of another kind, damaged, or of the wrong shape."""


class PathTakenError(UserError, FileExistsError):
    """A path a job would write (a built-in dataset, say) that holds something it did not write."""


class MismatchError(UserError, ValueError):
    """A directory that holds another run or another cache than the command asks for."""


class MissingPackageError(UserError, ImportError):
    """An optional extra that is not installed; the message says what to install."""


def full_error() -> bool:
    """True when ``TITOK_FULL_ERROR`` asks for the traceback of user errors too."""
    return os.environ.get(FULL_ERROR_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report(exc: BaseException) -> None:
    """Print ``error: <message>`` on stderr and exit 2 (SystemExit)."""
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def exit_on_user_error():
    """For entry points: a :class:`UserError` becomes one ``error: ...`` line on stderr and exit 2.

    Every other exception passes with its traceback, and so does a user error when
    ``TITOK_FULL_ERROR=1``.
    """
    try:
        yield
    except UserError as exc:
        if full_error():
            raise
        report(exc)
