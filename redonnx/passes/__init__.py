"""Graph passes. Each module defines ``name``, ``exact`` and ``run(graph, ctx) -> PassResult``."""

from __future__ import annotations

from types import ModuleType

from redonnx.errors import RedonnxError
from redonnx.passes import (
    cleanup,
    drop_branches,
    fold_batchnorm,
    fold_constants,
    hash_weights,
    merge_channels,
    prune_heads,
    separate_depthwise,
    shortcut_conv,
    split_inputs,
)
from redonnx.passes.base import Decline, PassContext, PassResult

PASSES: dict[str, ModuleType] = {
    m.name: m
    for m in (cleanup, fold_constants, fold_batchnorm, hash_weights, prune_heads, drop_branches, merge_channels,
              separate_depthwise, shortcut_conv, split_inputs)
}

#: Lossless rewrites, in order (``--exact``).
EXACT_PIPELINE = [
    "fold-constants",
    "fold-batchnorm",
    "prune-heads",
    "drop-branches",
    "merge-channels",
    "separate-depthwise",
    "cleanup",
]
#: What ``prune`` runs with no flags (relaxed merging sized by the fidelity budget).
DEFAULT_PIPELINE = [
    "fold-constants",
    "fold-batchnorm",
    "prune-heads",
    "drop-branches",
    "hash-weights",
    "merge-channels",
    "separate-depthwise",
    "cleanup",
]


def is_exact(module: ModuleType, options: dict | None = None) -> bool:
    """Whether a pass is lossless with these options (merging is exact only with alpha 0)."""
    check = getattr(module, "is_exact", None)
    return bool(check(options or {})) if check else bool(module.exact)


def resolve(names: list[str] | None, exact: bool = False, options: dict | None = None) -> list[ModuleType]:
    """Pass modules for ``names`` (default pipeline when None); unknown names are an error."""
    if names is None:
        names = EXACT_PIPELINE if exact else DEFAULT_PIPELINE
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise RedonnxError(f"unknown pass {unknown[0]!r} (available: {', '.join(PASSES)})")
    chosen = [PASSES[n] for n in names]
    if exact:
        lossy = [m.name for m in chosen if not is_exact(m, options)]
        if lossy:
            raise RedonnxError(f"--exact excludes the lossy pass {lossy[0]!r}")
    return chosen


__all__ = ["DEFAULT_PIPELINE", "EXACT_PIPELINE", "PASSES", "Decline", "PassContext", "PassResult", "resolve"]
