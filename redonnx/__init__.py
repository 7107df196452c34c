"""redonnx: data-free ONNX pruning (RED / RED++) verified with onnxruntime.

The public names are imported on first use (PEP 562): ``import redonnx`` alone, the command line's
parser and its usage errors do not pay for onnx (whose ml_dtypes costs about a second), onnxruntime
or the passes.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os
from importlib import import_module
from typing import TYPE_CHECKING, Any

# One BLAS thread: our matrices are small, and on a busy 2-core machine OpenBLAS's own threads made
# the channel statistics 1.4x slower; a fixed count also fixes the order of its float sums.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from redonnx.errors import RedonnxError, VerificationError  # noqa: E402

if TYPE_CHECKING:
    from redonnx.io.files import LoadedModel, load_model, save_model
    from redonnx.measure.verify import VerificationResult, verify
    from redonnx.pipeline import PruneResult, prune

_LAZY = {
    "LoadedModel": "redonnx.io.files",
    "load_model": "redonnx.io.files",
    "save_model": "redonnx.io.files",
    "PruneResult": "redonnx.pipeline",
    "prune": "redonnx.pipeline",
    "VerificationResult": "redonnx.measure.verify",
    "verify": "redonnx.measure.verify",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'redonnx' has no attribute {name!r}")


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
