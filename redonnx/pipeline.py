"""The prune pipeline: load -> graph -> passes (sized by the planner) -> verify, and the result.

``prune`` settles the inputs once (sizes, input model: :class:`redonnx.inputs.sizes.Settled`), resolves the
passes (names or configured instances), sets up the context they share (the settled inputs, cost
model, BatchNorm corrections where channel statistics are taken, calibration inputs),
sizes a default pipeline with :class:`redonnx.planner.Planner` or runs the passes as given, and
verifies the result against the original with onnxruntime (at a second size where dynamic).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnx

from redonnx import passes as passes_mod
from redonnx.errors import RedonnxError
from redonnx.inputs import model as input_model
from redonnx.inputs import realism as realism_mod
from redonnx.inputs import sizes as sizes_mod
from redonnx.io import weights
from redonnx.io.files import LoadedModel, load_model
from redonnx.measure.cost import ModelCost, cost_and_shapes, model_cost
from redonnx.measure.latency import CostModel, time_pair
from redonnx.measure.runtime import in_background
from redonnx.measure.verify import (
    BUDGET_MIN_COSINE,
    CAUTIOUS_MIN_COSINE,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
    LOSSY_MIN_COSINE,
    LOSSY_RTOL,
    AcrossConventions,
    AtTwoSizes,
    Checker,
    Reference,
    Tolerance,
)
from redonnx.passes.base import Pass, PassContext, PassResult
from redonnx.passes.merge_channels import MergeChannels
from redonnx.planner import Planner, searched
from redonnx.planner import precision as precision_mod
from redonnx.redundancy import statistics as R
from redonnx.redundancy.blocks import channel_multiple
from redonnx.report.result import Evidence, PruneResult

__all__ = ["TARGETS", "Evidence", "PruneResult", "prune", "run_passes"]


def _evidence(model: onnx.ModelProto, inputs: sizes_mod.Settled, calibration: bool, lossy: bool,
              statistics: bool) -> Evidence:  # fmt: skip
    """The input model, and where a decision uses them (channel statistics, the default budget) the
    realism of its draws and their BatchNorm corrections."""
    im = inputs.input_model
    ev = Evidence(im, inputs.given is not None, calibration=calibration, lossy=lossy, sizes=inputs.describe())
    if not statistics or im.missing_values() or not realism_mod.bn_points(model):
        ev.unmeasured = "not measured: no pass here takes channel statistics" if lossy and not statistics else ""
        return ev
    try:
        feeds = R.stats_feeds(inputs, batch=REALISM_BATCH, seed=REALISM_SEED)
        ev.realism = realism_mod.assess(model, feeds)
    except RedonnxError:
        raise
    except Exception:
        ev.realism = None
    return ev


REALISM_SEED = 1  # draws for the realism check: neither the statistics' nor verification's samples
REALISM_BATCH = 32  # images (at most) the realism check and its corrections run on


def run_passes(
    model: onnx.ModelProto,
    passes: Sequence[str | Pass] | None,
    exact: bool = False,
    ctx: PassContext | None = None,
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Apply passes (names or configured instances; the lossless or default pipeline when None) to
    a copy of ``model``; returns the new model and each pass's result."""
    return passes_mod.apply(model, passes_mod.resolve(passes, exact=exact), ctx)


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
    """Unset tolerances follow the passes (see :mod:`redonnx.measure.verify`); the default budget is
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


def prune(
    source: LoadedModel | onnx.ModelProto | str | Path,
    *,
    passes: Sequence[str | Pass] | None = None,
    configured: Iterable[Pass] = (),
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
    calibration: dict[str, np.ndarray] | None = None,
    refit: bool = True,
    progress: Callable[[str], None] | None = None,
    precision: str | None = None,
) -> PruneResult:
    """Rewrite a model with the chosen passes and verify it against the original.

    ``passes``: names or configured :class:`Pass` instances; ``configured`` instances stand in for
    the passes of their names (the CLI's flags). With no passes named, the default pipeline runs and
    the planner sizes it to the fidelity budget (output cosine >= 0.998 on the verification inputs
    unless a budget is given), or as ``target_macs`` asks; exact pipelines are held to atol 1e-6 /
    rtol 1e-4. ``target`` (see :data:`TARGETS`) decides the channel counts allowed and the
    objective; with ``ort-cpu`` a lossy result is written only if it runs measurably faster
    (:mod:`redonnx.planner.speed`). ``calibration``: real inputs for the statistics (and, with ``refit``, a
    least-squares refit of the pruned layers). ``precision`` (see :mod:`redonnx.planner.precision`):
    ``auto`` (default under ort-cpu) adds INT8 where it fits the budget and is measurably faster,
    ``int8`` wherever the budget allows, ``fp32`` keeps float.
    """
    if target not in TARGETS:
        raise RedonnxError(f"--target must be one of {', '.join(TARGETS)}")
    t0 = time.perf_counter()
    source = _loaded(source)
    # --exact --no-verify: the lossless passes need no concrete sizes
    settled = sizes_mod.settle_inputs(source.model, inputs, shapes, lenient=exact and not check)
    chosen = passes_mod.resolve(passes, exact=exact, configured=configured, target=target)
    searching = searched(chosen, exact) and (passes is None or target_macs is not None)
    prec = precision_mod.resolve(precision, target, exact)
    quantizing = prec == "int8" or (prec == "auto" and searching and target_macs is None)
    lossy = any(not p.exact for p in chosen) or quantizing
    ctx = PassContext.of(settled, target=target, calibration=calibration)
    before, counted = cost_and_shapes(source.model, settled.hints)
    if target == "ort-cpu":
        ctx.cost_model = CostModel(shape_source=lambda: counted, pair_timer=time_pair)
    statistics = searching or quantizing or any(p.uses_statistics for p in chosen)  # INT8 ranges use corrections
    evidence = _evidence(source.model, settled, calibration is not None, lossy or searching, statistics)
    ctx.corrections = evidence.corrections
    tol = _tolerance(lossy or searching, atol, rtol, min_cosine, min_agreement, target_macs, searching or quantizing,
                     evidence.cautious)  # fmt: skip
    if tol.min_cosine == CAUTIOUS_MIN_COSINE:
        evidence.tightened = tol.min_cosine
    reference = _reference(source.model, settled, samples, not target.startswith("trt")) if check or searching else None
    search = speed = after = quant = second = None
    gate = target == "ort-cpu" and target_macs is None
    feeds = settled.draw(batch=1, seed=0) if gate and (searching or quantizing) else None
    deflating = _deflating(source.model)  # beside the passes' Python (onnxruntime's runs above use both cores)
    if searching:
        planned = Planner(reference, tol, ctx, target_macs, refit, progress).plan(source.model, chosen, feeds)
        model, results, search, speed, after = planned.model, planned.results, planned.search, planned.speed, \
            planned.cost  # fmt: skip
        second = planned.lossless
    else:
        model, results = run_passes(source.model, chosen, exact, ctx)
    if not quantizing:  # the written model: its deflate runs beside what follows
        deflating += _deflating(model)
    after = after if after is not None else model_cost(model, settled.hints)
    if quantizing and reference is not None:
        model, results, quant, checked = _precision(source.model, model, results, speed, prec, target, reference, tol,
                                           evidence, ctx, feeds, settled, second[:2] if second else None)  # fmt: skip
        deflating += _deflating(model)
    if second is not None and quant is not None and quant.chosen is not None and quant.chosen.of:
        after = second[2]  # INT8 of the lossless result: its layers (counted by the speed gate)
    elif second is not None:
        weights.discard(second[0])  # a lean lossless result's scratch weights
    if ctx.cost_model is not None:
        ctx.cost_model.save()
    verification = (checked if quant is not None else reference.check(model, tol)) if check else None
    merge = next((p for p in chosen if isinstance(p, MergeChannels)), None)
    multiple = channel_multiple(target, ctx.cost_model, merge.channel_multiple if merge is not None else None)
    aligned = _alignment_note(before, after, multiple, target)
    return PruneResult(model=model, source=source, passes=results, before=before, after=after,
                       verification=verification, seconds=time.perf_counter() - t0, search=search,
                       notes=[aligned] if aligned else [], evidence=evidence, speed=speed, target=target,
                       precision=quant, deflating=deflating)  # fmt: skip


def _deflating(model: onnx.ModelProto) -> list[tuple[onnx.ModelProto, Future[int]]]:
    """The report's deflated size of ``model``, started now on a thread of its own (zlib frees the
    GIL: it runs while the process is busy in Python); only for models of at most
    ``weights.DEFLATE_EXACT_BYTES``, whose serialized copy is small beside the pruning's memory."""
    if weights.model_nbytes(model) > weights.DEFLATE_EXACT_BYTES:
        return []
    return [(model, in_background(lambda: weights.deflated_size(model)))]


def _precision(source: onnx.ModelProto, model: onnx.ModelProto, results: list[PassResult], speed, prec: str,
               target: str, reference, tol: Tolerance, evidence: Evidence, ctx: PassContext,
               feeds: dict[str, np.ndarray] | None, settled: sizes_mod.Settled,
               lossless: tuple[onnx.ModelProto, list[PassResult]] | None = None):  # fmt: skip
    """The INT8 stage on the float result, held to the same budget against the original; the
    written model's check (the float result's, or the one the stage made of the INT8 model it kept)."""
    from redonnx.inputs.specs import batch_is_leading
    from redonnx.planner.precision import PrecisionStage
    from redonnx.quantize import StageInputs
    from redonnx.quantize.quantizer import LAYER_OPS

    cost = ctx.cost_model

    def layer_shapes(prepared: onnx.ModelProto) -> dict:
        import onnx_graphsurgeon as gs

        g = gs.import_onnx(prepared)
        return {n.name: cost.layer(n) for n in g.nodes if n.op in LAYER_OPS}

    inputs = StageInputs(
        source=source, check=lambda m: reference.check(m, tol),
        draw=lambda batch, seed: settled.draw(batch=batch, seed=seed),
        batched=batch_is_leading(source), calibration=ctx.calibration, corrections=evidence.corrections,
        cost_model=cost, layer_shapes=layer_shapes if cost is not None else None,
        image=any(len(i.type.tensor_type.shape.dim) == 4 for i in source.graph.input),
        budget=_budget_key(tol, ctx.calibration), checker=reference)  # fmt: skip
    stage = PrecisionStage(prec, target, inputs, feeds, cost.cache if cost is not None else None)
    float_check = reference.check(model, tol)
    model, results, quant = stage.run(model, results, speed, float_check.worst_cosine, lossless)
    chosen = quant.chosen
    return model, results, quant, chosen.verification if chosen is not None else float_check


def _budget_key(tol: Tolerance, calibration: dict[str, np.ndarray] | None) -> str:
    """The tolerance and the calibration inputs' digest: what an INT8 verdict depends on beside the model."""
    import hashlib

    h = hashlib.sha1(repr(tol).encode())
    for name in sorted(calibration or {}):
        h.update(name.encode())
        h.update(np.ascontiguousarray(calibration[name]).tobytes())
    return h.hexdigest()


def _reference(model: onnx.ModelProto, inputs: sizes_mod.Settled, samples: int, on_ort: bool) -> Checker:
    """The original's outputs on the verification inputs; where sizes were chosen for dynamic
    dimensions, at the second size too; where more than one input convention is plausible, in each
    (synthetic inputs only): the planner's trials and the final check hold on all. ``on_ort``: the
    target runtime is onnxruntime, so INT8 candidates run as it deploys them (its int8 kernels)."""

    def at_sizes(im: input_model.InputModel) -> Reference | AtTwoSizes:
        first = Reference(model, inputs=inputs.given, shapes=inputs.hints, samples=samples, input_model=im,
                          int8_as_deployed=on_ort)  # fmt: skip
        sized = inputs.chosen
        if sized is None or not sized.second:
            return first
        second = Reference(model, shapes=sized.second, samples=samples, input_model=im, int8_as_deployed=on_ort)
        return AtTwoSizes(first, second, sized.second_picks)

    chosen = at_sizes(inputs.input_model)
    others = input_model.alternatives(inputs.input_model) if inputs.given is None else []
    return AcrossConventions(chosen, [(n, c, at_sizes(im)) for n, c, im in others]) if others else chosen


def _loaded(source: LoadedModel | onnx.ModelProto | str | Path) -> LoadedModel:
    if isinstance(source, onnx.ModelProto):
        return LoadedModel(model=source)
    return source if isinstance(source, LoadedModel) else load_model(source)


#: What ``--target`` optimizes: ort-cpu (measured latency, channel counts in the measured block,
#: final speed gate), trt (MACs, counts in multiples of 8: TensorRT FP16 tensor cores), trt-int8
#: (multiples of 16), macs (MACs, any count, hashing for size).
TARGETS = ("ort-cpu", "trt", "trt-int8", "macs")


ALIGN = 8


def _alignment_note(before: ModelCost, after: ModelCost, multiple: int, target: str) -> str | None:
    """Convolutions whose output channels were a multiple of 8 and no longer are: onnxruntime's
    CPU convolutions (blocked by 8) can run them slower than before despite fewer MACs. Not under
    ``ort-cpu``: there the counts were chosen by timing them (cost model, speed gate)."""
    if multiple % ALIGN == 0 or target == "ort-cpu":
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
