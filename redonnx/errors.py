"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class RedonnxError(Exception):
    """Bad input or usage: reported as one clear line, never a traceback."""


class VerificationError(RedonnxError):
    """The rewritten model does not match the original within tolerance (exit code 1)."""
