"""redonnx: data-free ONNX pruning (RED / RED++) verified with onnxruntime."""

from __future__ import annotations

__version__ = "0.1.0"

from redonnx.errors import RedonnxError, VerificationError
from redonnx.io import LoadedModel, load_model, save_model
from redonnx.pipeline import PruneResult, prune
from redonnx.verify import VerificationResult, verify

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
