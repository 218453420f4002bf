"""The one exception type that the command line turns into a one-line error and exit code 2."""

from __future__ import annotations


class KebenchError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name.

    The message must be one line that names the offending field, file or value and, where it can,
    says how to fix it.  Anything else that escapes is a bug and keeps its traceback.
    """


class RunError(RuntimeError):
    """A run that failed for a reason found only while working (an editor whose ``restore`` did not return
    the model to its original outputs): neither bad input (``KebenchError``, exit 2) nor a bug (a
    traceback).  The command line prints one line and exits 1; a grid stores it as a failed cell."""
