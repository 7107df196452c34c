"""merge-channels: merge and remove redundant output channels across coupled layers (RED step 2).

Channel work in three parts: which channels are coupled (:mod:`redonnx.channels.coupling`: every tensor
and layer that indexes one channel, groups ended safely at unknown ops), which are redundant
(:mod:`redonnx.redundancy`, one module per criterion) and how each op is cut
(:mod:`redonnx.channels.cutting`). Exact rules, always applied: a channel identical to another, or a
positive multiple s of it through positively homogeneous ops, is dropped and its readers' columns
added into the other's (col_a += s col_b, paper eq. 2); a provably constant channel k is dropped
and k times its columns folded into the readers' biases. Relaxed (lossy) rules, when ``alpha`` or
``error_budget`` is set: ``criterion="reconstruct"`` removes channels the others predict by
least squares, compensating the readers (W_K += W_R B, bias += W_R c); ``criterion="paper"``
merges the alpha fraction of closest channels into their mean. Channel counts stay in the
runtime's block (``channel_multiple``, or the cost model's block under ``--target ort-cpu``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import ClassVar

import onnx_graphsurgeon as gs

from redonnx.channels.coupling import analyze
from redonnx.channels.cutting import apply_plan
from redonnx.errors import RedonnxError
from redonnx.inputs.shapes import annotate_graph
from redonnx.io.graph import tensor_map
from redonnx.passes.base import Decline, Pass, PassContext, PassResult
from redonnx.redundancy.blocks import align, channel_multiple
from redonnx.redundancy.classes import Plan, class_infos, parallel_groups
from redonnx.redundancy.exact import exact_merges
from redonnx.redundancy.paper import paper_merges
from redonnx.redundancy.reconstruct import relaxed_removals

CRITERIA = ("reconstruct", "paper")


@dataclass
class MergeChannels(Pass):
    """Merges identical, proportional and constant channels exactly; removes more when ``alpha``
    (fraction of channels) or ``error_budget`` (summed relative reconstruction error) is set."""

    name: ClassVar[str] = "merge-channels"
    alpha: float | None = None  # None: not set (exact unless the planner searches it)
    error_budget: float | None = None
    criterion: str = "reconstruct"  # reconstruct or paper
    alpha_strategy: str = "constant"  # paper rule: constant or block (per third of depth)
    channel_multiple: int | None = None  # channel counts in multiples of this (targets macs and others)

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha < 1.0:
            raise RedonnxError("--alpha must be in [0, 1)")
        if self.criterion not in CRITERIA:
            raise RedonnxError("--merge-criterion must be reconstruct or paper")
        if self.alpha_strategy not in ("constant", "block"):
            raise RedonnxError("--alpha-strategy must be constant or block")

    @property
    def exact(self) -> bool:
        return not self.alpha and not self.error_budget

    @property
    def uses_statistics(self) -> bool:
        return not self.exact and self.criterion == "reconstruct"

    @property
    def knob(self) -> str:
        """The tunable the planner searches: the paper's fraction, or the reconstruction budget."""
        return "alpha" if self.criterion == "paper" else "error_budget"

    @property
    def searched(self) -> bool:
        """Whether the amount is left to the planner (neither alpha nor a budget given)."""
        return self.alpha is None and self.error_budget is None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        alpha = float(self.alpha or 0.0)
        memo = ctx.memo.setdefault(self.name, {}) if ctx.memo is not None else None
        _annotate(graph, memo)
        cg = analyze(graph)
        infos, pinned = class_infos(cg, memo.setdefault("class_sources", {}) if memo is not None else None)
        _report_pins(res, pinned)
        groups = parallel_groups(infos)
        plan = Plan()
        for _key, members in groups.items():
            exact_merges(cg, members, plan)
        multiple = channel_multiple(ctx.target, ctx.cost_model, self.channel_multiple)
        if alpha > 0 or self.error_budget:
            if self.criterion == "paper":
                paper_merges(groups, plan, res, alpha, self.alpha_strategy)
            else:
                relaxed_removals(graph, cg, groups, plan, res, alpha, replace(ctx, memo=memo), multiple,
                                 self.error_budget)  # fmt: skip
        else:
            align(plan, groups, [], multiple, ctx.cost_model)
        for kind in plan.exact.values():
            res.count(kind)
        if plan.merges:
            res.kept = apply_plan(cg, infos, plan)
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        return res


def _annotate(graph: gs.Graph, memo: dict | None) -> None:
    """Shapes and dtypes onnx infers, filled in; with a memo (every budget trial starts from the same
    graph) inferred once and copied by tensor name afterwards."""
    if memo is None:
        annotate_graph(graph)
        return
    known = memo.get("annotated")
    variables = [t for t in tensor_map(graph).values() if isinstance(t, gs.Variable)]
    if known is None:
        annotate_graph(graph)
        memo["annotated"] = {t.name: (t.shape, t.dtype) for t in variables}
        return
    for t in variables:
        shape, dtype = known.get(t.name, (None, None))
        if t.shape is None and shape is not None:
            t.shape = list(shape)
        if t.dtype is None and dtype is not None:
            t.dtype = dtype


def _report_pins(res: PassResult, pinned: dict[int, str]) -> None:
    counts: dict[str, int] = defaultdict(int)
    for reason in pinned.values():
        counts[reason] += 1
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        res.declined.append(Decline("<channels>", "", f"{n} channel(s) left alone: {reason}"))
