"""Errors a user can fix. The CLI turns them into exit code 2 and one short stderr line."""
from __future__ import annotations

import errno

# OSError numbers that mean the disk (or the user's quota) is full: the user's to fix.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(e: OSError) -> str:
    """How a full disk (an OSError in NO_SPACE) is said in an output's error line."""
    return f"no space left on its disk ({e.strerror})"


class UserError(Exception):
    """A mistake in what the user gave us (a path, a flag, a file). Exit code 2, no traceback."""

    exit_code = 2


class VideoError(UserError):
    """A video file that cannot be opened or decoded."""


class ModelError(UserError):
    """A model name, directory or checkpoint that cannot be used."""


def did_you_mean(name: str, choices) -> str:
    """" (did you mean X?)" for the choice nearest a mistyped `name`, or "" when none is near."""
    import difflib

    near = difflib.get_close_matches(name, list(choices), 1)
    return f" (did you mean {near[0]}?)" if near else ""
