"""Graph passes: each module defines one :class:`Pass` subclass (a dataclass of its parameters);
:data:`PASSES` is the registry the CLI and the pipelines name them by.

Adding a pass: a module here with the class (docstring: the rewrite and its math), a test file,
and one line in :data:`PASSES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx

from redonnx.errors import RedonnxError
from redonnx.io.graph import to_graph, to_model
from redonnx.passes.base import Decline, Pass, PassContext, PassResult
from redonnx.passes.cleanup import Cleanup
from redonnx.passes.drop_branches import DropBranches
from redonnx.passes.fold_batchnorm import FoldBatchNorm
from redonnx.passes.fold_constants import FoldConstants
from redonnx.passes.hash_weights import HashWeights
from redonnx.passes.merge_channels import MergeChannels
from redonnx.passes.prune_heads import PruneHeads
from redonnx.passes.separate_depthwise import SeparateDepthwise
from redonnx.passes.shortcut_conv import ShortcutConv
from redonnx.passes.split_inputs import SplitInputs

PASSES: dict[str, type[Pass]] = {
    Cleanup.name: Cleanup,
    FoldConstants.name: FoldConstants,
    FoldBatchNorm.name: FoldBatchNorm,
    HashWeights.name: HashWeights,
    PruneHeads.name: PruneHeads,
    DropBranches.name: DropBranches,
    MergeChannels.name: MergeChannels,
    SeparateDepthwise.name: SeparateDepthwise,
    ShortcutConv.name: ShortcutConv,
    SplitInputs.name: SplitInputs,
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
#: What ``prune`` runs with no flags (the planner sizes hashing, heads, branches and merging).
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
#: The default pipeline's hashing bound (hashing that changed no prediction measured); a
#: hash-weights pass named on its own keeps its class default.
DEFAULT_HASH_ERROR = 0.02


def default_names(exact: bool, target: str) -> list[str]:
    """The pipeline ``prune`` runs with no passes named, for ``--exact`` and a target."""
    names = list(EXACT_PIPELINE if exact else DEFAULT_PIPELINE)
    if target != "macs":  # hashing saves no time and spends fidelity budget: only the size objective runs it
        names = [n for n in names if n != "hash-weights"]
    if target == "ort-cpu":  # forms onnxruntime's CPU kernels run faster (measured, see the pass)
        names.insert(names.index("cleanup"), "shortcut-conv")
    return names


def resolve(
    passes: Sequence[str | Pass] | None,
    exact: bool = False,
    configured: Iterable[Pass] = (),
    target: str = "macs",
) -> list[Pass]:
    """Pass instances for ``passes`` (names or instances; the default pipeline when None). A name
    takes the instance in ``configured`` of that name (the CLI's flags), else the class defaults;
    unknown names are an error, and so is a lossy pass under ``exact``."""
    chosen_by_name = {p.name: p for p in configured}
    defaults = passes is None and not exact
    out: list[Pass] = []
    for p in passes if passes is not None else default_names(exact, target):
        if isinstance(p, Pass):
            out.append(p)
        elif p in chosen_by_name:
            out.append(chosen_by_name[p])
        elif p not in PASSES:
            raise RedonnxError(f"unknown pass {p!r} (available: {', '.join(PASSES)})")
        elif p == HashWeights.name and defaults:
            out.append(HashWeights(max_error=DEFAULT_HASH_ERROR))
        else:
            out.append(PASSES[p]())
    if exact:
        lossy = [p.name for p in out if not p.exact]
        if lossy:
            raise RedonnxError(f"--exact excludes the lossy pass {lossy[0]!r}")
    return out


def apply(
    model: onnx.ModelProto, passes: Sequence[Pass], ctx: PassContext | None = None, done: Sequence[Pass] = ()
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run ``passes`` in order on a copy of ``model``; the new model and each pass's result.
    ``done``: the passes that made ``model`` (named with these in the model's ``redonnx`` tag)."""
    graph = to_graph(model)
    ctx = ctx if ctx is not None else PassContext()
    results = [p(graph, ctx) for p in passes]
    return to_model(graph, model, note=",".join(p.name for p in [*done, *passes])), results


__all__ = [
    "DEFAULT_PIPELINE",
    "EXACT_PIPELINE",
    "PASSES",
    "Decline",
    "Pass",
    "PassContext",
    "PassResult",
    "default_names",
    "resolve",
]
