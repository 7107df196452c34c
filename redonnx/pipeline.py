"""The prune pipeline: load -> passes -> export -> verify, with a JSON-ready report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import redonnx
from redonnx import input_model, weights
from redonnx import passes as passes_mod
from redonnx import realism as realism_mod
from redonnx import reconstruct as R
from redonnx import refit as refit_mod
from redonnx import sizes as sizes_mod
from redonnx import speed as speed_mod
from redonnx.budget import SearchResult, search_alpha
from redonnx.cost import ModelCost, folded_graph, model_cost
from redonnx.errors import RedonnxError
from redonnx.graph import to_graph, to_model
from redonnx.input_model import InputModel
from redonnx.io import LoadedModel, load_model
from redonnx.latency import CostModel
from redonnx.passes import merge_channels as merge_mod
from redonnx.passes.base import PassContext, PassResult
from redonnx.planner import depth_stage, head_stage
from redonnx.realism import Realism
from redonnx.verify import (
    BUDGET_MIN_COSINE,
    CAUTIOUS_MIN_COSINE,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
    LOSSY_MIN_COSINE,
    LOSSY_RTOL,
    Reference,
    Tolerance,
    VerificationResult,
    at_second_size,
)


@dataclass
class PruneResult:
    """The rewritten model and everything the report says about it."""

    model: onnx.ModelProto
    source: LoadedModel
    passes: list[PassResult]
    before: ModelCost
    after: ModelCost
    verification: VerificationResult | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    search: SearchResult | None = None
    evidence: Evidence | None = None
    speed: speed_mod.SpeedCheck | None = None
    target: str = "ort-cpu"
    _sizes: tuple[dict[str, Any], dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def modified(self) -> bool:
        return any(p.modified for p in self.passes)

    def report(self) -> dict[str, Any]:
        """The JSON report: sizes before/after, what each pass did and declined, verification."""
        if self._sizes is None:  # serializing and deflating both models is the costly part: once
            self._sizes = (_sizes(self.source.model, self.before), _sizes(self.model, self.after))
        before, after = self._sizes
        return {
            "tool": f"redonnx {redonnx.__version__}",
            "input": str(self.source.path) if self.source.path else None,
            "input_shapes": self.before.input_shapes,
            "target": self.target,
            "before": before,
            "after": after,
            "removed": {
                "params": before["params"] - after["params"],
                "params_pct": _pct(before["params"], after["params"]),
                "macs": (before["macs"] - after["macs"]) if before["macs"] is not None else None,
                "macs_pct": _pct(before["macs"], after["macs"]),
            },
            "passes": [p.to_dict() for p in self.passes],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "budget": self.search.to_dict() if self.search is not None else None,
            **(self.evidence.to_dict() if self.evidence is not None else {}),
            "speed": self.speed.to_dict() if self.speed is not None else None,
            "notes": self.source.notes + self.notes,
            "seconds": round(self.seconds, 3),
        }

    def summary(self, command: str | None = None) -> str:
        """A readable terminal summary; the full detail is in :meth:`report`. ``command``: how the
        user ran us (for the advice to pass real inputs)."""
        r = self.report()
        b, a = r["before"], r["after"]
        lines = [p.summary() for p in self.passes]
        for p in self.passes:
            if p.declined:
                shown = "; ".join(f"{d.node}: {d.reason}" for d in p.declined[:2])
                more = f" (+{len(p.declined) - 2} more in --report)" if len(p.declined) > 2 else ""
                lines.append(f"  {p.name} left {len(p.declined)} alone, e.g. {shown}{more}")
        if self.search is not None:
            s = self.search
            lines.append(
                f"budget: {s.goal} -> {s.knob.replace('_', ' ')} {s.value:.3g} after {len(s.trials)} trials"
                + ("" if s.met else " (NOT met)")
                + "".join(f"; {n}" for n in s.notes)
            )
        lines.append(
            f"parameters {b['params']:,} -> {a['params']:,} ({_fmt_pct(r['removed']['params_pct'])} removed); "
            f"MACs {_fmt(b['macs'])} -> {_fmt(a['macs'])} ({_fmt_pct(r['removed']['macs_pct'])} removed); "
            f"deflated {'~' if a['deflated_estimated'] else ''}{b['deflated_bytes']:,} -> {a['deflated_bytes']:,} bytes"
        )
        lines += [f"note: {n}" for n in self.notes]
        if self.speed is not None:
            lines.append(self.speed.describe())
        if self.evidence is not None:
            src = self.source.path or "IN.onnx"
            lines += self.evidence.summary_lines(command or f"redonnx prune {src} -o OUT.onnx")
        if self.verification is not None:
            lines.append(self.verification.summary())
        return "\n".join(lines)


def _fmt(v: int | None) -> str:
    return f"{v:,}" if v is not None else "?"


def _fmt_pct(v: float | None) -> str:
    return f"{v:.1f}%" if v is not None else "?"


def _pct(before: int | None, after: int | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return round(100.0 * (before - after) / before, 3)


def _sizes(model: onnx.ModelProto, cost: ModelCost) -> dict[str, Any]:
    return {
        "params": cost.params,
        "macs": cost.macs,
        "bytes": weights.model_nbytes(model),
        "deflated_bytes": weights.deflated_size(model),
        "deflated_estimated": weights.deflate_estimated(model),
        "nodes": len(model.graph.node),
        "ops": cost.ops,
        "layers": [
            {"name": lay.name, "op": lay.op, "weight": lay.weight_shape, "params": lay.params, "macs": lay.macs}
            for lay in cost.layers
        ],
    }


@dataclass
class Evidence:
    """What the synthetic inputs are, and how realistic they look to the model's BatchNorm layers."""

    inputs: InputModel
    given: bool
    realism: Realism | None = None
    calibration: bool = False
    tightened: float | None = None  # the default budget's cosine, when tightened for want of realism
    sizes: str = ""  # dynamic dimensions' sizes, when chosen for the user

    @property
    def corrections(self) -> list | None:
        return self.realism.corrections if self.realism is not None and not self.calibration else None

    @property
    def cautious(self) -> bool:
        """Synthetic verification whose realism is poor or cannot be measured (no BatchNorm)."""
        return not self.given and (self.realism is None or self.realism.poor)

    def why_cautious(self) -> str:
        if self.realism is None or self.realism.overall is None:
            return "the realism of synthetic inputs cannot be measured (no BatchNorm statistics)"
        return f"synthetic inputs look unlike the data (realism {self.realism.overall:.2f} < {realism_mod.POOR:g})"

    def to_dict(self) -> dict[str, Any]:
        verified_on = "given inputs" if self.given else "synthetic inputs"
        return {
            "inputs": {**self.inputs.to_dict(), "verified_on": verified_on, "sizes": self.sizes or None},
            "realism": self.realism.to_dict() if self.realism is not None else None,
        }

    def summary_lines(self, command: str) -> list[str]:
        lines = [f"inputs: {self.inputs.source}: {self.inputs.describe()}"]
        if self.sizes:
            lines.append(self.sizes)
        if self.realism is not None:
            fixed = (f"; channel statistics measured with the activations corrected to the running statistics of "
                     f"{len(self.realism.corrections)} BatchNorm layers") if self.corrections else ""  # fmt: skip
            lines.append(f"synthetic {self.realism.describe()}{fixed}")
        if self.tightened is not None:
            lines.append(f"budget tightened to cosine >= {self.tightened:g}: {self.why_cautious()}")
        if (self.cautious and self.tightened is not None) or (self.realism is not None and self.realism.poor):
            lines.append(f"for evidence on your data, verify on real inputs: {command} --inputs real.npz "
                         f"(arrays {self.inputs.npz_hint()})")  # fmt: skip
        return lines


def _evidence(
    model: onnx.ModelProto,
    given: dict[str, np.ndarray] | None,
    shapes: dict[str, list[int]] | None,
    options: dict[str, Any],
    lossy: bool,
) -> Evidence:
    """The input model, and for lossy pipelines the realism of its draws and their corrections."""
    im = input_model.from_given(model, given) if given is not None else input_model.infer(model, shapes)
    ev = Evidence(im, given is not None, calibration=options.get("calibration") is not None)
    if lossy and not im.missing_values() and realism_mod.bn_points(model):
        try:
            feeds = R.draw_stats_inputs(model, shapes, im, batch=REALISM_BATCH, seed=REALISM_SEED)
            ev.realism = realism_mod.assess(model, feeds)
        except RedonnxError:
            raise
        except Exception:
            ev.realism = None
    return ev


REALISM_SEED = 1  # draws for the realism check: neither the statistics' nor verification's samples
REALISM_BATCH = 32  # images (at most) the realism check and its corrections run on


def run_passes(
    model: onnx.ModelProto, names: list[str] | None, exact: bool, options: dict[str, Any] | None = None
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Apply passes to a copy of ``model``; returns the new model and each pass's result."""
    chosen = passes_mod.resolve(names, exact=exact, options=options)
    graph = to_graph(model)
    ctx = PassContext(opset=int(graph.opset), options=dict(options or {}))
    results = []
    for mod in chosen:
        t0 = time.perf_counter()
        res = mod.run(graph, ctx)
        res.seconds = time.perf_counter() - t0
        results.append(res)
    note = ",".join(m.name for m in chosen)
    return to_model(graph, model, note=note), results


DEFAULT_OPTIONS = {"hash_error": 0.02}  # default pipeline: hashing that changes no prediction measured


def _tolerance(
    lossy: bool,
    atol: float | None,
    rtol: float | None,
    min_cosine: float | None,
    min_agreement: float | None,
    target_macs: float | None,
    default_budget: bool,
    cautious: bool = False,
) -> Tolerance:
    """Unset tolerances follow the passes (see :mod:`redonnx.verify`); the default budget is
    tightened when the synthetic inputs cannot be shown to look like the data (``cautious``)."""
    if not lossy:
        return Tolerance(DEFAULT_ATOL if atol is None else atol, DEFAULT_RTOL if rtol is None else rtol,
                         min_cosine, min_agreement)  # fmt: skip
    explicit = any(v is not None for v in (rtol, min_cosine, min_agreement))
    if target_macs is not None and not explicit:
        return Tolerance(DEFAULT_ATOL if atol is None else atol, float("inf"))  # report only
    cosine = min_cosine
    if cosine is None and not explicit:
        cosine = (CAUTIOUS_MIN_COSINE if cautious else BUDGET_MIN_COSINE) if default_budget else LOSSY_MIN_COSINE
    return Tolerance(DEFAULT_ATOL if atol is None else atol, LOSSY_RTOL if rtol is None else rtol, cosine,
                     min_agreement)  # fmt: skip


def _budgeted(
    model: onnx.ModelProto,
    names: list[str],
    exact: bool,
    options: dict[str, Any],
    reference: Reference,
    tol: Tolerance,
    target_macs: float | None,
    progress: Callable[[str], None] | None,
) -> tuple[onnx.ModelProto, list[PassResult], SearchResult, Callable]:
    """Passes before merge-channels once, then the alpha search. If even alpha 0 is over the
    budget, the lossy passes before merging (hashing) get milder settings, then are dropped.
    Also returns ``finish(model, results, alpha)``: the exact passes that run after the search."""
    cut = names.index("merge-channels")
    prefix, rest = names[:cut], names[cut + 1 :]
    # exact passes after merging cannot change fidelity: run them once, after the search
    later = [n for n in rest if n != "cleanup"] if all(passes_mod.is_exact(passes_mod.PASSES[n], options)
                                                        for n in rest) else []  # fmt: skip
    trial_passes = ["merge-channels", *[n for n in rest if n not in later]]
    attempts = [(prefix, options)]
    if "hash-weights" in prefix and target_macs is None:
        milder = {**options, "hash_error": float(options.get("hash_error", 0.06)) / 4}
        attempts += [(prefix, milder), ([n for n in prefix if n != "hash-weights"], options)]
    trial_runner = _trial_runner(model, options)
    for i, (pre, opts) in enumerate(attempts):
        base, results = run_passes(model, pre, exact, opts)
        depth = heads = None
        if target_macs is None and opts.get("depth", True):
            runner = lambda m, n, o: run_passes(m, n, False, o)  # noqa: E731
            heads = head_stage(base, opts, reference, tol, runner, progress)
            if heads.removed:
                weights.discard(base)
                base, results = heads.model, results + heads.results
                opts = {**opts, "kept_before": {k: v for r in heads.results for k, v in r.kept.items()}}
            depth = depth_stage(base, opts, reference, tol, runner, progress)
            if depth.removed:
                weights.discard(base)
                base, results = depth.model, results + depth.results
        out, tail, search = search_alpha(
            base, trial_passes, opts, reference, tol, trial_runner,
            target_macs=target_macs, shapes=opts.get("shapes"), progress=progress,
        )  # fmt: skip
        search.depth = depth.to_dict() if depth is not None and depth.ranking else None
        search.heads = heads.to_dict() if heads is not None and heads.ranking else None
        if search.met or i == len(attempts) - 1:
            if i:
                search.notes.append(_milder_note(pre, opts))
            if heads is not None and heads.removed:
                search.notes.append(f"{heads.removed} attention head(s) removed first")
            if depth is not None and depth.removed:
                search.notes.append(f"{depth.removed} residual branch(es) removed first (depth pruning)")

            def finish(m: onnx.ModelProto, res: list[PassResult], value: float, opts=opts, results=results,
                       knob=search.knob):  # fmt: skip
                if later:
                    m, after = run_passes(m, [*later, "cleanup"], exact, {**opts, knob: value})
                    res = res + after
                return m, results + res

            out, tail = finish(out, tail, search.value)
            return out, tail, search, finish
        weights.discard(out)
        weights.discard(base)
        search.discard_fallbacks()
        if progress:
            progress("over budget before any merging: milder hashing")
    raise AssertionError("unreachable")


def _trial_runner(source: onnx.ModelProto, options: dict[str, Any]) -> Callable:
    """The passes of one budget trial; with calibration inputs (and ``refit``, default on) the pruned
    layers are then refitted to them by least squares (:mod:`redonnx.refit`)."""
    calibration = options.get("calibration")
    targets: dict[str, np.ndarray] = {}  # the original's outputs on the calibration inputs, once

    def trial(m: onnx.ModelProto, names: list[str], opts: dict[str, Any]):
        out, results = run_passes(m, names, False, opts)
        kept = {**opts.get("kept_before", {}), **{k: v for r in results for k, v in r.kept.items()}}
        if calibration is None or not options.get("refit", True) or not kept:
            return out, results
        t0 = time.perf_counter()
        fitted = refit_mod.refit(out, source, calibration, kept, cache=targets)
        res = PassResult("refit", modified=bool(fitted.layers), layers=fitted.layers,
                         counts={"layers refitted to the calibration inputs": len(fitted.layers)})  # fmt: skip
        res.seconds = time.perf_counter() - t0
        weights.discard(out)
        return fitted.model, [*results, res]

    return trial


def _speed_gate(
    source: onnx.ModelProto,
    best: tuple[onnx.ModelProto, list[PassResult]],
    search: SearchResult,
    finish: Callable,
    options: dict[str, Any],
    feeds: dict[str, np.ndarray],
) -> tuple[onnx.ModelProto, list[PassResult], speed_mod.SpeedCheck]:
    """Keep the most pruned candidate that is measurably faster than the lossless result."""
    exact_model, exact_results = run_passes(source, _default_passes(True, "ort-cpu"), True, options)
    lossless = speed_mod.Candidate("lossless result", exact_model, exact_results)
    what = search.knob.replace("_", " ")
    candidates = [speed_mod.Candidate(f"budget's choice ({what} {search.value:.3g})", *best)] if search.value else []
    for value, m, res in search.fallbacks[:FALLBACKS]:
        candidates.append(speed_mod.Candidate(f"less pruning ({what} {value:.3g})", *finish(m, res, value)))
    floor = model_cost(exact_model, options.get("shapes")).macs  # a candidate must do less work to be tried
    candidates = [c for c in candidates if floor is None or (model_cost(c.model, options.get("shapes")).macs or 0)
                  < floor]  # fmt: skip
    kept, check = speed_mod.gate(source, lossless, candidates, feeds, options["cost_model"].cache, "ort-cpu")
    options["cost_model"].save()
    for cand in [lossless, *candidates]:
        if cand is not kept:
            weights.discard(cand.model)
    search.discard_fallbacks()
    return kept.model, kept.results, check


FALLBACKS = 2  # passing trials with less pruning the speed gate tries before the lossless result


def _milder_note(prefix: list[str], opts: dict[str, Any]) -> str:
    if "hash-weights" not in prefix:
        return "hashing alone was over the budget: skipped"
    return f"hashing alone was over the budget: bound lowered to {opts['hash_error']:g}"


def prune(
    source: LoadedModel | onnx.ModelProto | str | Path,
    *,
    passes: list[str] | None = None,
    exact: bool = False,
    shapes: dict[str, list[int]] | None = None,
    inputs: dict[str, np.ndarray] | str | Path | None = None,
    check: bool = True,
    samples: int = DEFAULT_SAMPLES,
    atol: float | None = None,
    rtol: float | None = None,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    target_macs: float | None = None,
    target: str = "ort-cpu",
    options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PruneResult:
    """Rewrite a model with the chosen passes and verify it against the original.

    With no passes named, the default pipeline runs and relaxed merging takes as many channels as
    the fidelity budget allows (output cosine >= 0.998 on the verification inputs unless a budget
    is given), or as ``target_macs`` asks; exact pipelines are held to atol 1e-6 / rtol 1e-4.
    ``target`` (see :data:`TARGETS`) decides the channel counts allowed and the objective; with
    ``ort-cpu`` a lossy result is written only if it runs measurably faster (:mod:`redonnx.speed`).
    """
    if target not in TARGETS:
        raise RedonnxError(f"--target must be one of {', '.join(TARGETS)}")
    t0 = time.perf_counter()
    if isinstance(source, onnx.ModelProto):
        source = LoadedModel(model=source)
    elif not isinstance(source, LoadedModel):
        source = load_model(source)
    try:
        inputs, shapes, sized = sizes_mod.settle(source.model, inputs, shapes)
    except RedonnxError:
        if check or not exact:
            raise
        sized = None  # --exact --no-verify: the lossless passes need no concrete sizes
    names = passes if passes is not None else _default_passes(exact, target)
    defaults = DEFAULT_OPTIONS if passes is None and not exact else {}
    options = {**defaults, **(options or {}), "shapes": shapes, "target": target}
    if target == "ort-cpu":
        options["cost_model"] = CostModel(shape_source=lambda: folded_graph(source.model, shapes or {})[1])
    chosen = passes_mod.resolve(names, exact=exact, options=options)
    lossy = any(not passes_mod.is_exact(m, options) for m in chosen)
    searching = (
        "merge-channels" in names
        and "alpha" not in options
        and not exact
        and (passes is None or target_macs is not None)
    )
    evidence = _evidence(source.model, inputs, shapes, options, lossy or searching)
    evidence.sizes = sized.describe() if sized is not None else ""
    options.update(input_model=evidence.inputs, corrections=evidence.corrections)
    tol = _tolerance(lossy or searching, atol, rtol, min_cosine, min_agreement, target_macs, searching,
                     evidence.cautious)  # fmt: skip
    if tol.min_cosine == CAUTIOUS_MIN_COSINE:
        evidence.tightened = tol.min_cosine
    before = model_cost(source.model, shapes)
    reference = (Reference(source.model, inputs=inputs, shapes=shapes, samples=samples, input_model=evidence.inputs)
                 if check or searching else None)  # fmt: skip
    search = speed = None
    if searching:
        model, results, search, finish = _budgeted(source.model, names, exact, options, reference, tol, target_macs,
                                                   progress)  # fmt: skip
        if target == "ort-cpu" and target_macs is None:
            feeds = evidence.inputs.draw(source.model, shapes, batch=1, seed=0)
            model, results, speed = _speed_gate(source.model, (model, results), search, finish, options, feeds)
    else:
        model, results = run_passes(source.model, names, exact, options)
    if "cost_model" in options:
        options["cost_model"].save()
    after = model_cost(model, shapes)
    verification = reference.check(model, tol) if check else None
    if verification is not None and sized is not None and sized.second:
        again = Reference(source.model, shapes=sized.second, samples=samples, input_model=evidence.inputs)
        verification = at_second_size(verification, again.check(model, tol), sized.second_picks)
    aligned = _alignment_note(before, after, merge_mod.channel_multiple(options))
    return PruneResult(
        model=model,
        source=source,
        passes=results,
        before=before,
        after=after,
        verification=verification,
        seconds=time.perf_counter() - t0,
        search=search,
        notes=[aligned] if aligned else [],
        evidence=evidence,
        speed=speed,
        target=target,
    )


#: What ``--target`` optimizes: ort-cpu (measured latency, channel counts in the measured block,
#: final speed gate), trt (MACs, counts in multiples of 8: TensorRT FP16 tensor cores), trt-int8
#: (multiples of 16), macs (MACs, any count, hashing for size).
TARGETS = ("ort-cpu", "trt", "trt-int8", "macs")


def _default_passes(exact: bool, target: str) -> list[str]:
    names = list(passes_mod.EXACT_PIPELINE if exact else passes_mod.DEFAULT_PIPELINE)
    if target != "macs":  # hashing saves no time and spends fidelity budget: only the size objective runs it
        names = [n for n in names if n != "hash-weights"]
    if target == "ort-cpu":  # forms onnxruntime's CPU kernels run faster (measured, see the pass)
        names.insert(names.index("cleanup"), "shortcut-conv")
    return names


ALIGN = 8


def _alignment_note(before: ModelCost, after: ModelCost, multiple: int) -> str | None:
    """Convolutions whose output channels were a multiple of 8 and no longer are: onnxruntime's
    CPU convolutions (blocked by 8) can run them slower than before despite fewer MACs."""
    if multiple % ALIGN == 0:
        return None
    old = {lay.name: lay.weight_shape[0] for lay in before.layers if lay.op == "Conv" and lay.weight_shape}
    broken = [(lay.name, old[lay.name], lay.weight_shape[0]) for lay in after.layers
              if lay.op == "Conv" and lay.weight_shape and lay.name in old and old[lay.name] % ALIGN == 0
              and lay.weight_shape[0] % ALIGN]  # fmt: skip
    if not broken:
        return None
    name, b, a = broken[0]
    return (
        f"{len(broken)} convolution(s) now have channel counts that are not multiples of {ALIGN} (e.g. {name}: "
        f"{b} -> {a}); onnxruntime's CPU kernels can run them slower than the original (measured on MobileNetV2: "
        f"2x slower with 3 % fewer MACs). Check with --bench; --channel-multiple {ALIGN} keeps counts aligned"
    )
