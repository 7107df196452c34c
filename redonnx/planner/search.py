"""The merge search: how much relaxed merging a model can take, found by measuring.

The passes before merge-channels run once (:mod:`redonnx.planner`). Merging then runs for
several values of its tunable (:attr:`MergeChannels.knob`):
``error_budget`` (the summed relative reconstruction error it may spend, searched on a geometric
ladder: the greedy takes the most efficient steps that fit, see merge_channels) or, for the
paper's rule, ``alpha`` (the fraction of channels removed). Each candidate is checked against
the reference outputs on the verification inputs (synthetic unless the user passes real ones)
and its MACs are counted:

- with a fidelity budget (cosine, top-1 agreement, max error), the largest value whose model still
  meets it: the least lossy step first, then steps up doubling while they pass, then bisection;
- with ``--target-macs P``, bisection finds the smallest value removing at least P % of the
  MACs, and the report states the fidelity that cost.

Channel statistics are computed on the first trial and reused through the context's memo (they
only depend on the graph before merging); the pass does not know it is being searched. A trial's
merge result says which other budgets make the same choices (the budget only decides whether a
step fits); the search takes those from the trial instead of building the same model again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from redonnx.io import weights
from redonnx.measure.cost import model_cost
from redonnx.measure.verify import Checker, Tolerance, VerificationResult
from redonnx.passes.base import Pass, PassContext, PassResult
from redonnx.passes.merge_channels import MergeChannels

ALPHA_MAX = 0.6
STEPS = 6
#: error budgets tried: 0, then 63 values from 1e-6 to 10, evenly spaced in log scale
ERROR_LADDER = (0.0, *(float(v) for v in np.geomspace(1e-6, 10.0, 2**STEPS - 1)))


@dataclass
class Trial:
    value: float
    macs_removed_pct: float | None
    cosine: float
    top1_agreement: float | None
    passed: bool


@dataclass
class SearchResult:
    goal: str
    knob: str  # error_budget | alpha
    value: float
    trials: list[Trial] = field(default_factory=list)
    met: bool = True
    notes: list[str] = field(default_factory=list)
    depth: dict[str, Any] | None = None  # the depth stage before it (redonnx.planner)
    heads: dict[str, Any] | None = None  # the head stage before that
    # passing trials below the chosen value, largest first: less pruning, for the speed gate
    fallbacks: list[tuple[float, onnx.ModelProto, list[PassResult]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"goal": self.goal, "knob": self.knob, "value": self.value, "trials": [asdict(t) for t in self.trials],
                "met": self.met, "notes": list(self.notes), "depth": self.depth,
                "heads": self.heads}  # fmt: skip

    def discard_fallbacks(self) -> None:
        for _a, model, _r in self.fallbacks:
            weights.discard(model)  # lean candidates: free their scratch data files
        self.fallbacks = []


Runner = Callable[[onnx.ModelProto, list[Pass], PassContext], tuple[onnx.ModelProto, list[PassResult]]]


def search_merging(
    base: onnx.ModelProto,
    merge: MergeChannels,
    after: list[Pass],
    ctx: PassContext,
    reference: Checker,
    tol: Tolerance,
    run_passes: Runner,
    target_macs: float | None = None,
    progress: Callable[[str], None] | None = None,
    memo: dict | None = None,
    build_exact: bool = True,
) -> tuple[onnx.ModelProto | None, list[PassResult], SearchResult]:
    """Run ``merge`` then ``after`` on ``base`` for the value of merging's tunable the budget allows;
    ``memo`` (a fresh one when None) keeps what depends on ``base`` only, for every pass started there.
    ``build_exact`` False: where exact merges alone are chosen (0), no model is built (None is
    returned): the caller writes its lossless result there (the speed gate)."""
    ctx = replace(ctx, memo={} if memo is None else memo)  # every trial starts from ``base``: once
    knob = merge.knob
    shapes = ctx.shapes
    ladder = [round(ALPHA_MAX * i / 2**STEPS, 4) for i in range(2**STEPS + 1)] if knob == "alpha" else ERROR_LADDER
    macs0 = model_cost(base, shapes).macs if target_macs is not None else None
    trials: dict[float, tuple[onnx.ModelProto, list[PassResult], VerificationResult, float | None]] = {}

    def trial(index: int):
        value = ladder[index]
        same = next((a for a, t in trials.items() if value > 0 and _makes_same(t[1], value)), None)
        if same is not None:  # a value making the same choices as one tried: the same model
            return trials[same]
        if value not in trials:
            model, results = run_passes(base, [merge.with_params(**{knob: value}), *after], ctx)
            v = reference.check(model, tol)
            removed = None
            if macs0:
                removed = 100.0 * (1 - (model_cost(model, shapes).macs or 0) / macs0)
            trials[value] = (model, results, v, removed)
            if progress:
                extra = f", {removed:.1f} % of MACs removed" if removed is not None else ""
                progress(f"{knob} {value:.3g}: cosine {v.worst_cosine:.4f}{extra}, {'ok' if v else 'over budget'}")
        return trials[value]

    top = len(ladder) - 1

    def span(index: int) -> int:
        """The last ladder index making the choices ``index`` made (tried): they build its model."""
        results, j = trial(index)[1], index
        while j < top and ladder[j + 1] > 0 and _makes_same(results, ladder[j + 1]):
            j += 1
        return j

    if target_macs is not None:
        index = smallest_passing(lambda i: (trial(i)[3] or 0.0) >= target_macs, top)
        goal = f"{target_macs:g} % MACs"
    else:
        index, goal = largest_passing(lambda i: bool(trial(i)[2]), top, 1, span), "fidelity budget"
    if index == 0 and not build_exact and target_macs is None:
        for t in trials.values():
            weights.discard(t[0])  # lean candidates: free their scratch data files
        record = SearchResult(goal, knob, 0.0, [_trial(a, t) for a, t in sorted(trials.items())])
        return None, [], record
    model, results, v, removed = trial(index)
    value = next(a for a, t in trials.items() if t[0] is model)  # the value built (others made the same)
    record = SearchResult(goal, knob, value, met=bool(v) if target_macs is None else (removed or 0) >= target_macs)
    for a, t in sorted(trials.items(), reverse=True):
        if t[0] is model:
            continue
        if 0 < a < value and bool(t[2]):
            record.fallbacks.append((a, t[0], t[1]))
        else:
            weights.discard(t[0])  # lean candidates: free their scratch data files
    record.trials = [_trial(a, t) for a, t in sorted(trials.items())]
    return model, results, record


def _trial(value: float, t: tuple) -> Trial:
    _model, _results, v, removed = t
    return Trial(value, removed, v.worst_cosine, v.min_top1, bool(v))


def _makes_same(results: list[PassResult], value: float) -> bool:
    """Whether merging at ``value`` makes the choices of the trial with these ``results`` (its
    merge-channels result says for which values of the tunable it would choose the same)."""
    same = results[0].same_for if results else None
    return same is not None and same[0] <= value < same[1]


def largest_passing(
    ok: Callable[[int], bool], n: int, guess: int | None = None, span: Callable[[int], int] = lambda k: k
) -> int:
    """The largest k in [1, n] with ok(k), 0 if none, for an ok that holds up to a point. From a
    ``guess`` (clamped to [1, n]): that, then steps doubling away from it until the verdict turns,
    then bisection (a good guess decides in two trials). Without one: 1, n, then bisection.
    ``span(k)``: the last count making the model k made (a passing k passes up to there).

    The merge search guesses 1, the least lossy step: on well-trained models even that is over
    the budget, and that decides it in one trial; a budget that holds little more than the first
    step decides in two or three, where bisection from the top of the ladder took five to eight,
    each a model built and verified. The depth and head stages guess from their scores."""
    if n < 1:
        return 0
    if guess is None:
        if not ok(1):
            return 0
        lo, hi = (n, n + 1) if n == 1 or ok(n) else (span(1), n)
    else:
        k = min(max(guess, 1), n)
        lo, hi, step = (span(k), n + 1, 1) if ok(k) else (0, k, 1)
        if lo:  # passing: up until one fails
            while lo < n and hi == n + 1:
                nxt = min(lo + step, n)
                lo, hi, step = (span(nxt), hi, 2 * step) if ok(nxt) else (lo, nxt, step)
        else:  # failing: down until one passes
            while hi > 1 and lo == 0:
                nxt = max(hi - step, 1)
                lo, hi, step = (span(nxt), hi, step) if ok(nxt) else (lo, nxt, 2 * step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (min(span(mid), hi - 1), hi) if ok(mid) else (lo, mid)
    return lo


def smallest_passing(ok: Callable[[int], bool], top: int) -> int:
    """Smallest index in [1, top] with ok (``top`` if none), for an ok that holds from a point on;
    bisection, stopped once decided. The MAC target (merging something, so 0 is not tried) and the
    INT8 stage (how many of the most sensitive layers stay float; none was tried first). Where ok
    does not quite hold from a point on (INT8 near the budget), bisection's probes from the middle
    found fewer float layers than a gallop from a guess (ResNet-56 after depth pruning: 12 of 48
    where a guess from the summed deviations ended at 17), so the INT8 stage does not guess."""
    lo, hi = 0, top
    if not ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi
