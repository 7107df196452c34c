"""redonnx: data-free ONNX pruning (RED / RED++) verified with onnxruntime."""

from __future__ import annotations

__version__ = "0.1.0"

import os

# One BLAS thread: our matrices are small, and on a busy 2-core machine OpenBLAS's own threads made
# the channel statistics 1.4x slower; a fixed count also fixes the order of its float sums.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from redonnx.errors import RedonnxError, VerificationError  # noqa: E402
from redonnx.io import LoadedModel, load_model, save_model  # noqa: E402
from redonnx.pipeline import PruneResult, prune  # noqa: E402
from redonnx.verify import VerificationResult, verify  # noqa: E402

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
