"""Errors overtrain raises on purpose: each message is one line naming the file or key at fault."""

from __future__ import annotations


class OvertrainError(Exception):
    """Base of overtrain's own errors, so a caller can catch them all at once."""


class DataError(OvertrainError, ValueError):
    """A corpus, task or benchmark file that is missing, empty or malformed."""
