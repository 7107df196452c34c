"""The reconstruction criterion (default): a channel the remaining channels predict by least squares
is removed and its readers read the prediction instead (W_K += W_R B, bias += W_R c). Channels
go greedily by relative reconstruction error per unit saved, in steps of the runtime's block per
coupled group, until the alpha fraction or the error budget is spent.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.channels.coupling import ChannelGraph
from redonnx.measure.cost import layer_origin
from redonnx.passes.base import PassContext, PassResult
from redonnx.redundancy import statistics as R
from redonnx.redundancy.blocks import align, savings
from redonnx.redundancy.classes import ClassInfo, Plan, sink_columns


def relaxed_removals(
    graph: gs.Graph,
    cg: ChannelGraph,
    groups: dict[tuple, list[ClassInfo]],
    plan: Plan,
    res: PassResult,
    alpha: float,
    ctx: PassContext,
    multiple: int = 1,
    budget: float | None = None,
) -> None:
    """Remove the channels whose loss the remaining channels best reconstruct: the alpha fraction
    of them, or (``budget``) as many as keep the summed relative reconstruction error within it."""
    gone = {m[0] for m in plan.merges}
    cands = [i for g in groups.values() for i in g if i.root not in gone and i.sourced and not i.zero_item]
    sinks = {t for i in cands for t, _ in i.members if any(it.kind == "sink" for it in cg.items.get(t, []))}
    cands = [i for i in cands if any(t in sinks for t, _ in i.members)]
    target = len(cands) if budget else round(alpha * len(cands))
    if target < 1 or not sinks:
        res.same_for = (0.0, float("inf")) if budget else None  # nothing to choose from: any budget
        return
    axes = {t: cg.spaces[t].axis for t in sorted(sinks)}  # a set's order varies between processes
    cache = ctx.memo  # the planner's trials start from the same graph: statistics computed once
    key = tuple(sorted(axes.items()))
    stats = cache.get(key) if cache is not None else None
    if stats is None:
        stats = R.channel_stats(
            graph,
            axes,
            ctx.calibration,
            ctx.shapes,
            input_model=ctx.input_model,
            corrections=ctx.corrections,
            inputs=ctx.inputs,
        )
        if cache is not None:
            cache[key] = stats
    energy = cache.setdefault("column energy", {}) if cache is not None else {}  # the readers' weights: once
    for t in sinks:
        if t not in energy:
            energy[t] = _column_energy(cg, t)
    prec = {t: stats[t].precision() for t in sinks}
    for drop, _keep, _s in plan.merges:  # exact merges already took these channels away
        for t, c in cg.members_of(drop):
            if t in prec and np.isfinite(prec[t][c, c]):
                prec[t] = R.remove_from_precision(prec[t], c)
    total = {t: float(energy[t] @ stats[t].second_moment) or 1.0 for t in sinks}
    memo = cache.setdefault("savings", {}) if cache is not None else None  # per group: the same in every trial
    saving = savings(cg, cands, ctx.cost_model, multiple, memo)
    all_cands = cands
    cands = [i for i in cands if saving[i.root] > 0]
    key_of = {i.root: k for k, members in groups.items() for i in members}
    exact_done = Counter(key_of[r] for r in plan.exact)
    sizes = {key: min(cg.spaces[t].size for t, _c in members[0].members) for key, members in groups.items()}
    chosen, res.same_for = _lazy_greedy(cands, target, prec, energy, total, _group_caps(groups, cands), saving,
                                        multiple, exact_done, budget, sizes)  # fmt: skip
    chosen = align(plan, groups, chosen, multiple, ctx.cost_model)
    _record_groups(res, cg, all_cands, chosen, saving, multiple, ctx.cost_model is not None)
    if not chosen:
        return
    removed: dict[str, list[int]] = defaultdict(list)
    for info in chosen:
        plan.merges.append((info.root, None, 0.0))
        for t, c in info.members:
            if t in sinks:
                removed[t].append(c)
    dropped: dict[str, set[int]] = defaultdict(set)
    for d, _k, _s in plan.merges:
        for tt, c in cg.members_of(d):
            if tt in removed:
                dropped[tt].add(c)
    for t, r in removed.items():
        kept = [c for c in range(cg.spaces[t].size) if c not in dropped[t]]
        b, c0 = R.regression(stats[t], sorted(r), kept)
        plan.recon.append((t, sorted(r), kept, b, c0))
    res.count("channels removed with reconstruction", len(chosen))


def _record_groups(
    res: PassResult, cg: ChannelGraph, cands: list[ClassInfo], chosen: list[ClassInfo], saving: dict[int, float],
    step: int, measured: bool,
) -> None:  # fmt: skip
    """Per coupled group: the layers it touches, its channels, how many went and why (the report)."""
    by_key: dict[tuple, list[ClassInfo]] = defaultdict(list)
    for info in cands:
        by_key[info.key].append(info)
    gone = Counter(i.key for i in chosen)
    unit = "ms" if measured else "MACs"
    for key, infos in by_key.items():
        tensors = sorted({t for t, _ in infos[0].members})
        layers = sorted({layer_origin(it.node) for t in tensors for it in cg.items.get(t, [])
                         if it.kind in ("row", "sink")})  # fmt: skip
        per = saving[infos[0].root]
        if gone[key]:
            why = f"removed in steps of {step}: saves {per:.3g} {unit} per channel"
        elif per <= 0:
            why = f"kept: removing {step} channels saves no time (cost model)"
        else:
            why = "kept: no step fits the fidelity budget"
        res.layers.append({"layers": layers, "channels": len(infos), "removed": gone[key], "why": why})


def _column_energy(cg: ChannelGraph, t: str) -> np.ndarray:
    """Sum of squared consumer weights reading each channel of ``t``."""
    e = np.zeros(cg.spaces[t].size)
    for it in cg.items.get(t, []):
        if it.kind == "sink":
            for c in range(len(e)):
                e[c] += float(np.sum(sink_columns(it, c) ** 2))
    return e


def _group_caps(groups: dict[tuple, list[ClassInfo]], cands: list[ClassInfo]) -> dict[int, tuple[tuple, int]]:
    """Each candidate's group and how many of that group may go (at most 3/4, keeping one)."""
    alive = {i.root for i in cands}
    caps = {}
    for key, members in groups.items():
        n = sum(i.root in alive for i in members)
        for i in members:
            caps[i.root] = (key, max(0, min(n - 1, (3 * n) // 4)))
    return caps


class _Group:
    """A coupled group's remaining candidates, with their channel index in each tensor (vectorized costs)."""

    def __init__(self, infos: list[ClassInfo], saving: dict[int, float], floor: float, prec: dict[str, np.ndarray]):
        self.infos = list(infos)
        tensors = sorted({t for t, _ in infos[0].members if t in prec})
        at = [dict(i.members) for i in infos]
        self.cidx = {t: np.array([a[t] for a in at]) for t in tensors}
        self.saving = np.maximum(np.array([saving[i.root] for i in infos]), floor)
        self.alive = np.ones(len(infos), bool)
        self.taken = 0

    def errors(self, prec: dict[str, np.ndarray], energy: dict[str, np.ndarray], total: dict[str, float]) -> np.ndarray:
        err = np.zeros(len(self.infos))
        for t, idx in self.cidx.items():
            d = np.diagonal(prec[t])[idx]
            ok = (d > 0) & np.isfinite(d)
            err[ok] += energy[t][idx[ok]] / d[ok] / total[t]
        return np.where(self.alive, err, np.inf)


def _lazy_greedy(
    cands: list[ClassInfo],
    target: int,
    prec: dict[str, np.ndarray],
    energy: dict[str, np.ndarray],
    total: dict[str, float],
    caps: dict[int, tuple[tuple, int]],
    saving: dict[int, float],
    step: int = 1,
    done: dict[tuple, int] | None = None,
    budget: float | None = None,
    sizes: dict[tuple, int] | None = None,
) -> tuple[list[ClassInfo], tuple[float, float] | None]:
    """Pick about ``target`` channels by increasing relative reconstruction error per unit saved
    (MACs or milliseconds: the layers that lose least per unit of cost give most).

    Channels go in steps of ``step`` per coupled group (the runtime's channel block: a group's
    first step brings the channels that remain of its ``sizes``, after its ``done`` exact merges,
    to a whole block), so that removals gather where they pay instead of spreading thin and being
    rounded away. A step costs the sum of its channels' current costs; costs only grow as channels
    go, so stale heap entries are refreshed lazily. With a ``budget`` on the summed error, a step
    that would exceed it is skipped (and its group closed) while cheaper steps elsewhere still go:
    the most efficient step may be too big to fit (half of a 16-channel layer), smaller ones are not.

    Also returns, with a ``budget``, the budgets [low, high) that make these same choices: the budget
    only decides whether a step fits, so every budget at least what was spent and below the smallest
    error at which a skipped step would have fitted takes the same steps (the search reuses the trial)."""
    floor = min((v for v in saving.values() if v > 0), default=1.0) * 1e-3
    by_key: dict[tuple, list[ClassInfo]] = defaultdict(list)
    for info in cands:
        by_key[info.key].append(info)
    groups = {key: _Group(infos, saving, floor, prec) for key, infos in by_key.items()}
    done = done or {}

    def size(key: tuple) -> int:
        left = (sizes or {}).get(key, 0) - done.get(key, 0) - groups[key].taken
        return left % step or step

    def step_of(key: tuple) -> tuple[float, float]:
        """(cost, error) of the group's next step; inf when it cannot take one."""
        g, k = groups[key], size(key)
        if int(g.alive.sum()) < k or g.taken + k > caps[g.infos[0].root][1]:
            return np.inf, np.inf
        err = g.errors(prec, energy, total)
        picks = np.argpartition(err / g.saving, k - 1)[:k]
        return float(np.sum(err[picks] / g.saving[picks])), float(np.sum(err[picks]))

    order = {key: n for n, key in enumerate(groups)}
    heap = [(c, order[key], key) for key in groups if np.isfinite(c := step_of(key)[0])]
    heapq.heapify(heap)
    chosen: list[ClassInfo] = []
    spent = 0.0
    flips = np.inf  # the smallest budget at which a skipped step would have fitted
    while heap and len(chosen) < target:
        _c, n, key = heapq.heappop(heap)
        fresh, step_error = step_of(key)
        if not np.isfinite(fresh):
            continue
        if heap and fresh > heap[0][0] * (1 + 1e-12) + 1e-15:
            heapq.heappush(heap, (fresh, n, key))
            continue
        if budget is not None:
            if spent + step_error > budget:
                flips = min(flips, spent + step_error)
                continue  # too big for what is left of the budget: this group is done
            spent += step_error
        g = groups[key]
        for _ in range(size(key)):  # the step's channels one by one, each priced after the last went
            i = int(np.argmin(g.errors(prec, energy, total) / g.saving))
            g.alive[i] = False
            g.taken += 1
            chosen.append(g.infos[i])
            for t, ch in g.infos[i].members:
                if t in prec:
                    prec[t] = R.remove_from_precision(prec[t], ch)
        nxt = step_of(key)[0]
        if np.isfinite(nxt):
            heapq.heappush(heap, (nxt, n, key))
    return chosen, ((spent, float(flips)) if budget is not None else None)
