"""Errors overtrain raises on purpose: each message is one line naming the file, key or value at fault.

The CLI prints an `OvertrainError` as that one line and exits with 2; anything else
is a bug, reported with the path of its traceback and exit code 1.
"""

from __future__ import annotations


class OvertrainError(Exception):
    """Base of overtrain's own errors, so a caller can catch them all at once."""


class SpecError(OvertrainError, ValueError):
    """A study file, option or run folder that cannot be used; names the key and the problem."""


class DataError(OvertrainError, ValueError):
    """A corpus, task or benchmark file that is missing, empty or malformed."""


class CheckpointError(OvertrainError, ValueError):
    """A checkpoint folder, file or hub revision that cannot be used."""


class StoreError(OvertrainError):
    """A results store (results.sqlite) that cannot be read: not a database, or damaged."""


class StudyStopped(OvertrainError):
    """The study cannot go on (the disk is full); finished cells are kept."""
