"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class RedonnxError(Exception):
    """Bad input or usage: reported as one clear line, never a traceback."""


class VerificationError(RedonnxError):
    """The rewritten model does not match the original within tolerance (exit code 1)."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none: how
    onnxruntime's and the libraries' multi-line errors are reported."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
