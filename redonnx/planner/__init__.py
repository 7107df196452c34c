"""The planner: the one place that searches the passes' tunables against the budgets.

Passes do not know they are searched: each takes its amount as a parameter, and the planner
tries values by copying the instance with other parameters (:meth:`Pass.with_params`), checking
every candidate against the fidelity budget on the verification inputs. For a default pipeline
``before + [merge-channels] + after``:

1. the passes before merging run once (hashing's bound ``max_error`` is lowered four times, then
   hashing is dropped, when even exact merging after it is over the budget);
2. heads (``PruneHeads.drop``) and then residual branches (``DropBranches.drop``) go, best score
   per millisecond first, as many as the budget allows (:mod:`redonnx.planner.stages`);
3. merging's tunable (``MergeChannels.knob``: the reconstruction budget, or the paper's alpha)
   is searched on a ladder (:mod:`redonnx.planner.search`), or sized to ``--target-macs``;
4. the exact passes after merging run once on the result;
5. under ``--target ort-cpu`` the result is timed against the lossless one (:mod:`redonnx.planner.speed`)
   and kept only if measurably faster, else less pruning, else the lossless result.

With ``--calibration`` (and ``refit``) the pruned layers of every trial are refitted to the
calibration inputs by least squares (:mod:`redonnx.redundancy.refit`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from redonnx import passes as P
from redonnx.io import weights
from redonnx.measure.cost import ModelCost, model_cost
from redonnx.measure.verify import Checker, Tolerance
from redonnx.passes.base import Pass, PassContext, PassResult
from redonnx.passes.hash_weights import HashWeights
from redonnx.passes.merge_channels import MergeChannels
from redonnx.planner import speed as speed_mod
from redonnx.planner.search import SearchResult, search_merging
from redonnx.planner.stages import DepthResult, depth_stage, head_stage
from redonnx.redundancy import refit as refit_mod

FALLBACKS = 2  # passing trials with less pruning the speed gate tries before the lossless result
MILDER = 4.0  # hashing's bound is divided by this when hashing alone is over the budget


def searched(passes: list[Pass], exact: bool) -> bool:
    """Whether the planner sizes this pipeline: a merge-channels pass left without an amount."""
    merge = next((p for p in passes if isinstance(p, MergeChannels)), None)
    return merge is not None and merge.searched and not exact


@dataclass
class Planned:
    """The planner's choice: the model, what each pass did, and the search's record."""

    model: onnx.ModelProto | None  # None until the speed gate chooses, where the search chose exact merges alone
    results: list[PassResult]
    search: SearchResult
    speed: speed_mod.SpeedCheck | None = None
    cost: ModelCost | None = None  # the model's, where the speed gate counted it
    lossless: tuple[onnx.ModelProto, list[PassResult], ModelCost] | None = None  # timed against, where not kept


@dataclass
class Planner:
    """Searches the tunables of a pipeline against ``tol`` on ``reference`` (see the module)."""

    reference: Checker
    tol: Tolerance
    ctx: PassContext
    target_macs: float | None = None
    refit: bool = True  # with calibration inputs: refit the pruned layers of every trial
    progress: Callable[[str], None] | None = None
    _targets: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # original's calibration outputs
    # the search's exact passes before merging, the model they made, their results, and the search's
    # memo where the search started from that model (no heads or branches removed)
    _before: tuple[list[Pass], onnx.ModelProto, list[PassResult], dict | None] | None = field(default=None, repr=False)

    def plan(self, source: onnx.ModelProto, passes: list[Pass], feeds: dict[str, np.ndarray] | None = None) -> Planned:
        """Size ``passes`` (which hold one searched merge-channels) for ``source``; with ``feeds``
        and a cost model, the speed gate decides between the choice, less pruning and lossless."""
        gated = feeds is not None and self.ctx.cost_model is not None and self.target_macs is None
        best, finish = self._search(source, passes, gated)
        if gated:
            best.model, best.results, best.speed, best.cost = self._speed_gate(source, best, finish, feeds)
        return best

    def _trial(self, source: onnx.ModelProto, kept_before: dict[str, list[int]]) -> Callable:
        """One trial's passes, then (with calibration inputs) the refit of the layers they cut."""

        def trial(m: onnx.ModelProto, chosen: list[Pass], ctx: PassContext):
            out, results = P.apply(m, chosen, ctx)
            kept = {**kept_before, **{k: v for r in results for k, v in r.kept.items()}}
            if self.ctx.calibration is None or not self.refit or not kept:
                return out, results
            t0 = time.perf_counter()
            fitted = refit_mod.refit(out, source, self.ctx.calibration, kept, cache=self._targets)
            res = PassResult("refit", modified=bool(fitted.layers), layers=fitted.layers,
                             counts={"layers refitted to the calibration inputs": len(fitted.layers)})  # fmt: skip
            res.seconds = time.perf_counter() - t0
            weights.discard(out)
            return fitted.model, [*results, res]

        return trial

    def _attempts(self, before: list[Pass]) -> list[list[Pass]]:
        """The passes before merging, then with milder hashing, then without hashing."""
        hashing = next((p for p in before if isinstance(p, HashWeights)), None)
        if hashing is None or self.target_macs is not None:
            return [before]
        milder = [p.with_params(max_error=hashing.max_error / MILDER) if p is hashing else p for p in before]
        return [before, milder, [p for p in before if p is not hashing]]

    def _stages(self, base: onnx.ModelProto, results: list[PassResult]):
        """Heads, then residual branches, removed under the budget before merging."""
        heads = head_stage(base, self.ctx, self.reference, self.tol, P.apply, self.progress)
        kept_before: dict[str, list[int]] = {}
        if heads.removed:
            weights.discard(base)
            base, results = heads.model, results + heads.results
            kept_before = {k: v for r in heads.results for k, v in r.kept.items()}
        depth = depth_stage(base, self.ctx, self.reference, self.tol, P.apply, self.progress)
        if depth.removed:
            weights.discard(base)
            base, results = depth.model, results + depth.results
        return base, results, heads, depth, kept_before

    def _search(self, source: onnx.ModelProto, passes: list[Pass], gated: bool = False) -> tuple[Planned, Callable]:
        """The search's choice and how to finish a trial's model; ``gated``: the speed gate follows, and
        writes its lossless result where only exact merges fit (the planned model is then None)."""
        cut = next(i for i, p in enumerate(passes) if isinstance(p, MergeChannels))
        merge, rest = passes[cut], passes[cut + 1 :]
        # exact passes after merging cannot change fidelity: they run once, after the search
        later = [p for p in rest if p.name != "cleanup"] if all(p.exact for p in rest) else []
        in_trials = [p for p in rest if not any(p is q for q in later)]  # equal instances are still distinct
        attempts = self._attempts(passes[:cut])
        for i, before in enumerate(attempts):
            base, results = P.apply(source, before, self.ctx)
            made = (before, base, list(results)) if i == 0 and all(p.exact for p in before) else None
            heads = depth = None
            kept_before: dict[str, list[int]] = {}
            if self.target_macs is None:
                base, results, heads, depth, kept_before = self._stages(base, results)
            memo: dict = {}
            if made is not None:  # the lossless result starts the same way; the memo holds if no stage cut
                self._before = (*made, memo if base is made[1] else None)
            out, tail, search = search_merging(base, merge, in_trials, self.ctx, self.reference, self.tol,
                                               self._trial(source, kept_before), self.target_macs,
                                               self.progress, memo, build_exact=not gated)  # fmt: skip
            search.depth = depth.to_dict() if depth is not None and depth.ranking else None
            search.heads = heads.to_dict() if heads is not None and heads.ranking else None
            if search.met or i == len(attempts) - 1:
                _notes(search, i, before, heads, depth)

                def finish(m: onnx.ModelProto, res: list[PassResult], results=results) -> tuple:
                    if later:
                        m, after = P.apply(m, [*later, P.Cleanup()], self.ctx)
                        res = res + after
                    return m, results + res

                model, all_results = finish(out, tail) if out is not None else (None, results)
                return Planned(model, all_results, search), finish
            if out is not None:
                weights.discard(out)
            weights.discard(base)
            search.discard_fallbacks()
            if self.progress:
                self.progress("over budget before any merging: milder hashing")
        raise AssertionError("unreachable")

    def _lossless(self, source: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassResult]]:
        """The lossless pipeline on ``source``; where the search's exact passes before merging are its
        first passes, continued from the model they made (not run twice)."""
        passes = P.resolve(None, exact=True, target="ort-cpu")
        if self._before is not None:
            done, model, results, memo = self._before
            if len(done) < len(passes) and passes[: len(done)] == done and weights.external_base(model) is None:
                # where the search started from this very model, its memo (class summaries) holds here too
                ctx = replace(self.ctx, memo=memo) if memo is not None else self.ctx
                out, rest = P.apply(model, passes[len(done) :], ctx, done=done)
                return out, [*results, *rest]
        return P.apply(source, passes, self.ctx)

    def _speed_gate(
        self, source: onnx.ModelProto, best: Planned, finish: Callable, feeds: dict[str, np.ndarray]
    ) -> tuple[onnx.ModelProto, list[PassResult], speed_mod.SpeedCheck, ModelCost]:
        """Keep the most pruned candidate that is measurably faster than the lossless result (and
        its cost, counted here)."""
        search = best.search
        lossless = speed_mod.Candidate("lossless result", *self._lossless(source))
        what = search.knob.replace("_", " ")
        pending = [(f"budget's choice ({what} {search.value:.3g})", lambda: (best.model, best.results))
                   ] if search.value else []  # fmt: skip
        pending += [(f"less pruning ({what} {value:.3g})", lambda m=m, res=res: finish(m, res))
                    for value, m, res in search.fallbacks[:FALLBACKS]]  # fmt: skip
        costs: dict[int, ModelCost] = {}
        built: list[speed_mod.Candidate] = []

        def cost(c: speed_mod.Candidate) -> ModelCost:
            costs[id(c.model)] = model_cost(c.model, self.ctx.shapes)
            return costs[id(c.model)]

        floor = cost(lossless).macs  # a candidate must do less work to be tried

        def candidates():  # built and counted as the gate comes to them: it stops at the first kept
            for label, make in pending:
                built.append(cand := speed_mod.Candidate(label, *make()))
                macs = cost(cand).macs  # counted even where the floor is unknown: a kept one reports it
                if floor is None or (macs or 0) < floor:
                    yield cand

        kept, check = speed_mod.gate(source, lossless, candidates(), feeds, self.ctx.cost_model.cache, "ort-cpu")
        self.ctx.cost_model.save()
        for cand in built:
            if cand is not kept:
                weights.discard(cand.model)
        if kept is not lossless:  # the precision stage's second candidate (the caller discards it)
            best.lossless = (lossless.model, lossless.results, costs[id(lossless.model)])
        search.discard_fallbacks()
        return kept.model, kept.results, check, costs[id(kept.model)]


def _notes(search: SearchResult, attempt: int, before: list[Pass], heads: DepthResult | None,
           depth: DepthResult | None) -> None:  # fmt: skip
    if attempt:
        hashing = next((p for p in before if isinstance(p, HashWeights)), None)
        search.notes.append("hashing alone was over the budget: " + (
            f"bound lowered to {hashing.max_error:g}" if hashing is not None else "skipped"))  # fmt: skip
    if heads is not None and heads.removed:
        search.notes.append(f"{heads.removed} attention head(s) removed first")
    if depth is not None and depth.removed:
        search.notes.append(f"{depth.removed} residual branch(es) removed first (depth pruning)")


__all__ = ["Planned", "Planner", "SearchResult", "searched"]
