"""The depth and head stages of the budget search: which residual branches and attention heads go.

Heads (:mod:`redonnx.passes.prune_heads`) are scored the same way: each head's context replaced
by its least-squares prediction from the other heads of its block (fitted on the statistics'
inputs), alone, against the unchanged run; per millisecond (cost model) or MAC the head costs.

Each removable branch (:mod:`redonnx.passes.drop_branches`) is scored without the verification
samples: on the channel statistics' synthetic inputs (BatchNorm-corrected where the model had
BatchNorm), the model runs once piecewise to record every branch output's per-channel mean, then
once per branch with that branch's output replaced by its mean; the score is the outputs' mean
(1 - cosine) to the unchanged run, per millisecond the branch's layers cost (cost model) or per
MAC (other targets). Branches are removed in that order, as many as the fidelity budget allows
(each candidate verified like the channel trials; the search on the count starts where the summed
scores reach the cosine budget and steps away from there until the verdict turns, then bisects).
Channel merging then searches what budget is left on the shallower model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from redonnx.inputs.realism import intervene
from redonnx.io.graph import export, to_graph
from redonnx.measure.runtime import in_order
from redonnx.measure.segments import Stepper
from redonnx.measure.verify import Checker, Tolerance
from redonnx.passes import drop_branches as D
from redonnx.passes import prune_heads as H
from redonnx.passes.base import PassContext, PassResult
from redonnx.planner.search import Runner, Trial, largest_passing
from redonnx.redundancy import statistics as R

DEPTH_SEED = 2  # the scores' synthetic inputs: neither the statistics' nor verification's samples
SCORE_BATCH = 8  # samples (at most) the branch scores run on
HEAD_BATCH = 256  # samples (at most) the heads' least-squares statistics are fitted on
HOPELESS = 20.0  # a branch whose removal alone moves the outputs by more than this many budgets is not tried


@dataclass
class DepthResult:
    model: onnx.ModelProto
    results: list[PassResult] = field(default_factory=list)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)
    removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        trials = [{"branches": t.value, "cosine": t.cosine, "passed": t.passed} for t in self.trials]
        return {"removed": self.removed, "ranking": self.ranking, "trials": trials}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0


def _scoring_model(base: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """``base`` without stale shapes, its activations BatchNorm-corrected where the context says."""
    model = export(to_graph(base))
    del model.graph.value_info[:]
    return intervene(model, ctx.corrections) if ctx.corrections else model


def score_branches(base: onnx.ModelProto, branches: list[D.Branch], ctx: PassContext) -> tuple[dict, dict]:
    """Per-channel means of each branch's output, and the output deviation removing it alone causes."""
    model = _scoring_model(base, ctx)
    feeds = R.stats_feeds(ctx.settled(model), batch=SCORE_BATCH, seed=DEPTH_SEED)
    stepper = Stepper(model, [b.output.name for b in branches])
    by_out = {b.output.name: b for b in branches}
    means: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}

    def record(name: str, v: np.ndarray) -> None:
        means[by_out[name].key] = D.per_channel_mean(v, by_out[name].axis)
        ranks[by_out[name].key] = np.ndim(v)

    states: list = []  # each replacement run resumes where its branch ends
    ref = stepper.run(feeds, record, keep=states)

    def effect(b: D.Branch) -> float:
        const = D.channel_shaped(means[b.key], ranks[b.key], b.axis)

        def replace(name: str, v: np.ndarray) -> np.ndarray | None:
            return np.broadcast_to(const, v.shape).astype(v.dtype) if name == b.output.name else None

        out = stepper.run(feeds, replace, keep=states, resume=b.output.name)
        return float(np.mean([1.0 - _cosine(ref[k], out[k]) for k in ref]))

    effects = dict(zip([b.key for b in branches], in_order(effect, branches), strict=True))  # side by side
    return means, effects


def _saving(branch: D.Branch, cm: Any) -> float:
    total = 0.0
    for n in branch.layers():
        if cm is not None:
            shape = cm.layer(n)
            total += cm.ms(shape) if shape is not None else 0.0
        else:
            w = n.inputs[1]
            out = n.outputs[0].shape or []
            spatial = np.prod([d for d in out[2:] if isinstance(d, int)]) if n.op.startswith("Conv") else 1
            total += float(np.prod(getattr(w, "shape", (0,)))) * float(spatial)
    return total


def _removal_stage(
    base: onnx.ModelProto,
    ranked: list[tuple[str, float, float]],
    apply: Callable[[list[str]], tuple[onnx.ModelProto, list[PassResult]]],
    reference: Checker,
    tol: Tolerance,
    what: str,
    progress: Callable[[str], None] | None,
) -> DepthResult:
    """Remove the first k of ``ranked`` (key, output deviation, saving), the largest k the budget
    allows (bisection; each candidate verified like the channel trials)."""
    result = DepthResult(base)
    result.ranking = [{"unit": k, "output_deviation": round(e, 6), "saves": round(v, 6)} for k, e, v in ranked]
    if tol.min_cosine is not None:  # a first candidate far over the budget: nothing to try
        ranked = [r for r in ranked if r[1] <= HOPELESS * (1.0 - tol.min_cosine)]
    keys = [r[0] for r in ranked]
    trials: dict[int, tuple[onnx.ModelProto, list[PassResult], bool]] = {}

    def ok(k: int) -> bool:
        if k not in trials:
            model, res = apply(keys[:k])
            v = reference.check(model, tol)
            trials[k] = (model, res, bool(v))
            result.trials.append(Trial(float(k), None, v.worst_cosine, v.min_top1, bool(v)))
            if progress:
                verdict = "ok" if v else "over budget"
                progress(f"{k} {what} removed: cosine {v.worst_cosine:.4f}, {verdict}")
        return trials[k][2]

    guess = None
    if tol.min_cosine is not None:  # the scores, summed, predict how many fit the cosine budget
        spent = np.cumsum([r[1] for r in ranked])
        guess = int(np.searchsorted(spent, 1.0 - tol.min_cosine, side="right"))
    lo = largest_passing(ok, len(keys), guess)
    if lo:
        result.model, result.results, _ = trials[lo]
        result.removed = lo
    return result


def depth_stage(
    base: onnx.ModelProto,
    ctx: PassContext,
    reference: Checker,
    tol: Tolerance,
    run_passes: Runner,
    progress: Callable[[str], None] | None = None,
) -> DepthResult:
    """Remove as many residual branches as the budget allows, best score first."""
    branches = [b for b in D.find_branches(to_graph(base))[0] if b.constant is None]
    if not branches:
        return DepthResult(base)
    means, effects = score_branches(base, branches, ctx)
    saving = {b.key: _saving(b, ctx.cost_model) for b in branches}
    ranked = sorted(((b.key, effects[b.key], saving[b.key]) for b in branches),
                    key=lambda r: (r[1] / max(r[2], 1e-12), r[0]))  # fmt: skip

    def apply(keys: list[str]):
        return run_passes(base, [D.DropBranches(drop=tuple(keys), means=means)], ctx)

    return _removal_stage(base, ranked, apply, reference, tol, "residual branch(es)", progress)


def _features(v: np.ndarray) -> np.ndarray:
    """[B, H, S, D] head contexts as rows of the output projection's H*D input features."""
    b, h, s, d = v.shape
    return np.asarray(v, np.float64).transpose(0, 2, 1, 3).reshape(b * s, h * d)


def score_heads(base: onnx.ModelProto, atts: list[H.Attention], ctx: PassContext) -> tuple[dict, dict]:
    """Per attention block, the statistics (mean, covariance) of the output projection's H*D input
    features; per (block, head), the output deviation replacing that head's context by its least-
    squares prediction from the other heads' contexts causes (statistics' inputs)."""
    model = _scoring_model(base, ctx)
    feeds = ctx.calibration or R.stats_feeds(ctx.settled(model), batch=HEAD_BATCH, seed=DEPTH_SEED)
    by_ctx = {a.ctx.name: a for a in atts}
    stepper = Stepper(model, list(by_ctx))
    stats: dict[str, R.Stats] = {}

    def record(name: str, v: np.ndarray) -> None:
        stats[by_ctx[name].key] = R.Stats.of_rows(_features(v))

    stepper.run(feeds, record)
    n = min(len(v) for v in feeds.values())
    feeds = {k: v[: min(n, SCORE_BATCH)] for k, v in feeds.items()}  # scores: a few samples
    states: list = []  # each replacement run resumes where its head's context is made
    ref = stepper.run(feeds, lambda _n, _v: None, keep=states)

    def effect(unit: tuple[H.Attention, int]) -> float:
        a, h = unit
        cols = list(range(a.cols(h).start, a.cols(h).stop))
        kept = [c for c in range(a.heads * a.dim) if c not in cols]
        coef, const = R.regression(stats[a.key], cols, kept)

        def replace(name: str, v: np.ndarray) -> np.ndarray | None:
            if name != a.ctx.name:
                return None
            out = np.array(v, copy=True)
            pred = _features(v)[:, kept] @ coef.T + const  # [B*S, D]
            b, _, s, d = v.shape
            out[:, h] = pred.reshape(b, s, d).astype(v.dtype)
            return out

        out = stepper.run(feeds, replace, keep=states, resume=a.ctx.name)
        return float(np.mean([1.0 - _cosine(ref[k], out[k]) for k in ref]))

    units = [(a, h) for a in atts for h in range(a.heads)]
    effects = {(a.key, h): e for (a, h), e in zip(units, in_order(effect, units), strict=True)}  # side by side
    return stats, effects


def head_stage(
    base: onnx.ModelProto,
    ctx: PassContext,
    reference: Checker,
    tol: Tolerance,
    run_passes: Runner,
    progress: Callable[[str], None] | None = None,
) -> DepthResult:
    """Remove as many attention heads as the budget allows, best score first (MACs a head costs:
    its share of the four projections)."""
    atts = H.find(to_graph(base))[0]
    if not atts:
        return DepthResult(base)
    stats, effects = score_heads(base, atts, ctx)
    ranked = []
    for a in atts:
        saving = 4.0 * a.q.w.shape[0] * a.dim
        ranked += [(f"{a.key}#{h}", effects[(a.key, h)], saving) for h in range(a.heads)]
    ranked.sort(key=lambda r: (r[1] / max(r[2], 1e-12), r[0]))

    def apply(keys: list[str]):
        drop: dict[str, list[int]] = {}
        for k in keys:
            att, h = k.rsplit("#", 1)
            drop.setdefault(att, []).append(int(h))
        return run_passes(base, [H.PruneHeads(drop=drop, stats=stats)], ctx)

    return _removal_stage(base, ranked, apply, reference, tol, "attention head(s)", progress)
