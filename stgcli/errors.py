"""Errors a user can fix. The CLI turns them into exit code 2 and one short stderr line."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us (a path, a flag, a file). Exit code 2, no traceback."""

    exit_code = 2


class VideoError(UserError):
    """A video file that cannot be opened or decoded."""


class ModelError(UserError):
    """A model name, directory or checkpoint that cannot be used."""
