"""The one user-error type: bad input named in one line, never a bug in disguise.

Every exception we raise for something the user gave us (a file, a config key, a flag, a sample)
derives from :class:`UserError`, and its message names the file / field and what was expected. The
command line prints such an error as one line and exits with status 2; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad user input; the message names where it came from and what was expected."""
