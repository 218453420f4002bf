"""The one exception type that the command line turns into a one-line error and exit code 2."""

from __future__ import annotations


class KebenchError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name.

    The message must be one line that names the offending field, file or value and, where it can,
    says how to fix it.  Anything else that escapes is a bug and keeps its traceback.
    """
