"""Fidelity budgets: how much relaxed merging a model can take, found by measuring.

The passes before merge-channels run once. Merging then runs for several values of alpha (the
fraction of channels removed); each candidate is checked against the reference outputs on the
verification inputs (synthetic unless the user passes real ones) and its MACs are counted:

- with a fidelity budget (cosine, top-1 agreement, max error), bisection finds the largest alpha
  whose model still meets it;
- with ``--target-macs P``, bisection finds the smallest alpha removing at least P % of the MACs,
  and the report states the fidelity that cost.

Channel statistics are computed on the first trial and reused (they only depend on the graph
before merging).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from redonnx import weights
from redonnx.cost import model_cost
from redonnx.passes.base import PassResult
from redonnx.verify import Reference, Tolerance, VerificationResult

ALPHA_MAX = 0.6
STEPS = 6


@dataclass
class Trial:
    alpha: float
    macs_removed_pct: float | None
    cosine: float
    top1_agreement: float | None
    passed: bool


@dataclass
class SearchResult:
    goal: str
    alpha: float
    trials: list[Trial] = field(default_factory=list)
    met: bool = True
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Runner = Callable[[onnx.ModelProto, list[str], dict[str, Any]], tuple[onnx.ModelProto, list[PassResult]]]


def search_alpha(
    base: onnx.ModelProto,
    suffix: list[str],
    options: dict[str, Any],
    reference: Reference,
    tol: Tolerance,
    run_passes: Runner,
    target_macs: float | None = None,
    shapes: dict[str, list[int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, list[PassResult], SearchResult]:
    """Run ``suffix`` (starting at merge-channels) on ``base`` for the alpha the budget allows."""
    opts = {**options, "stats_cache": {}}
    macs0 = model_cost(base, shapes).macs if target_macs is not None else None
    trials: dict[float, tuple[onnx.ModelProto, list[PassResult], VerificationResult, float | None]] = {}

    def trial(alpha: float):
        if alpha not in trials:
            model, results = run_passes(base, suffix, {**opts, "alpha": alpha})
            v = reference.check(model, tol)
            removed = None
            if macs0:
                removed = 100.0 * (1 - (model_cost(model, shapes).macs or 0) / macs0)
            trials[alpha] = (model, results, v, removed)
            if progress:
                extra = f", {removed:.1f} % of MACs removed" if removed is not None else ""
                progress(f"alpha {alpha:.3f}: cosine {v.worst_cosine:.4f}{extra}, {'ok' if v else 'over budget'}")
        return trials[alpha]

    if target_macs is not None:
        alpha, goal = _bisect(lambda a: (trial(a)[3] or 0.0) >= target_macs, want_max=False), f"{target_macs:g} % MACs"
    else:
        alpha, goal = _bisect(lambda a: bool(trial(a)[2]), want_max=True), "fidelity budget"
    model, results, v, removed = trial(alpha)
    for a, t in trials.items():
        if a != alpha:
            weights.discard(t[0])  # lean candidates: free their scratch data files
    record = SearchResult(goal, alpha, met=bool(v) if target_macs is None else (removed or 0) >= target_macs)
    record.trials = [
        Trial(a, t[3], t[2].worst_cosine, t[2].min_top1, bool(t[2])) for a, t in sorted(trials.items())
    ]  # fmt: skip
    return model, results, record


def _bisect(ok: Callable[[float], bool], want_max: bool) -> float:
    """Largest alpha with ok (want_max) or smallest alpha with ok, in [0, ALPHA_MAX]."""
    if want_max:
        if not ok(0.0):
            return 0.0
        lo, hi = 0.0, ALPHA_MAX
        if ok(hi):
            return hi
        for _ in range(STEPS):
            mid = round((lo + hi) / 2, 4)
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo
    lo, hi = 0.0, ALPHA_MAX
    if not ok(hi):
        return hi
    for _ in range(STEPS):
        mid = round((lo + hi) / 2, 4)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi
