"""redonnx: data-free ONNX pruning (RED / RED++) verified with onnxruntime.

The public names are imported on first use (PEP 562): ``import redonnx`` alone, the command line's
parser and its usage errors do not pay for onnx (whose ml_dtypes costs about a second), onnxruntime
or the passes.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os
import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

# One BLAS thread: our matrices are small, and on a busy 2-core machine OpenBLAS's own threads made
# the channel statistics 1.4x slower; a fixed count also fixes the order of its float sums.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from redonnx.errors import RedonnxError, VerificationError  # noqa: E402

if TYPE_CHECKING:
    from redonnx.io import LoadedModel, load_model, save_model
    from redonnx.pipeline import PruneResult, prune
    from redonnx.verify import VerificationResult, verify

_LAZY = {
    "LoadedModel": "redonnx.io",
    "load_model": "redonnx.io",
    "save_model": "redonnx.io",
    "PruneResult": "redonnx.pipeline",
    "prune": "redonnx.pipeline",
    "VerificationResult": "redonnx.verify",
    "verify": "redonnx.verify",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'redonnx' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``redonnx.verify`` is the function, as it was when imported eagerly: importing the module
    ``redonnx.verify`` would otherwise set the package's attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "LoadedModel",
    "PruneResult",
    "RedonnxError",
    "VerificationError",
    "VerificationResult",
    "__version__",
    "load_model",
    "prune",
    "save_model",
    "verify",
]
