"""Each layer alone in INT8, scored without a whole run of the model per layer: the float model's
run is resumed where that layer's INT8 form first changes a tensor.

The INT8 stage ranks layers by the output deviation with each alone in INT8, on the verification
samples (worst output cosine against the original, every reference of the check: both sizes,
every plausible convention). With a layer's INT8 form cut into the float model
(:meth:`redonnx.quantize.cut.Cutter.alone`) a check builds a session of the whole model and runs
every node, though the nodes before the first tensor the layer changes compute what the float model
computes. Here the float model is cut into pieces (:class:`redonnx.measure.segments.Stepper`) at
the tensors the layers read and change, run once per reference and sample batch, and each layer's
run resumes from the piece making the first tensor it changes: its INT8 part
(:meth:`~redonnx.quantize.cut.Cutter.part`) runs on the float tensors it reads, and every reader
downstream reads what the part writes (a pair's DequantizeLinear, the layer's output), as in the
cut model. The part runs as the check runs a quantized candidate (as deployed: onnxruntime's int8
kernels); the float pieces with graph optimizations too, each within itself, so a score is the
check's up to float round-off in the other layers (ResNet-20: the same deviations to six digits,
the same ranking and bytes). The pieces' sessions are built once for every layer: all-MiniLM-L6-v2
scores its 36 layers in 5 s where 36 checks took 16 s (most of it building a session of the 90 MB
model per check); MobileNetV2 in 3.4 s where 52 checks took 6 s (its first layers' runs cost a
whole run: the pieces' boundaries cost what the skipped pieces save).

A layer whose part reads a tensor made after the first one it changes is left to a whole check.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from redonnx.measure.runtime import in_order, run
from redonnx.measure.segments import Stepper
from redonnx.measure.verify import _stack, compare_arrays
from redonnx.quantize.cut import Cutter, Part

#: the activations the base runs keep for every layer to resume from (every tensor of every sample
#: of every reference, at most): beyond it the layers are checked whole (a run at a time)
KEPT_BYTES = 1 << 30


def _kept_bytes(model: onnx.ModelProto, leaves: list, batched: bool) -> float:
    """Every tensor of every reference's samples, from one sample each (0: cannot tell)."""
    from redonnx.quantize.calibration import sample_bytes, sample_count

    total, per_shapes = 0.0, {}  # one run per input shapes (the conventions' references share them)
    for leaf in leaves:
        first = leaf.batches[0]
        shapes = tuple(sorted((k, v.shape[1:] if batched else v.shape, v.dtype.str) for k, v in first.items()))
        if shapes not in per_shapes:
            per_shapes[shapes] = sample_bytes(model, first, batched)
        per = per_shapes[shapes]
        if not per:
            return 0.0
        samples = sum(sample_count(b) for b in leaf.batches) if batched else sample_count(first) * len(leaf.batches)
        total += per * samples
    return total


@dataclass
class _Layer:
    part: Part
    resume: str | None  # the stop its run resumes from (None: from the start: it replaces or reads a graph input)
    session: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def worst_cosines(float_model: onnx.ModelProto, cutter: Cutter, names: list[str], checker: Any,
                  batched: bool) -> dict[str, float]:  # fmt: skip
    """Each layer's worst output cosine with it alone in INT8 against ``checker``'s references
    (layers left out: not resumable, or their part failed; none where the runs' kept activations
    would exceed :data:`KEPT_BYTES`: check them whole). ``batched``: the inputs' first dimension
    is the batch."""
    made_at = {o: i for i, n in enumerate(float_model.graph.node) for o in n.output if o}
    layers: dict[str, _Layer] = {}
    for name in names:
        part = cutter.part(name)
        if part is None:
            continue
        first_change = min(made_at.get(t, -1) for t in part.replaces)
        if max((made_at.get(t, -1) for t in part.reads), default=-1) > first_change:
            continue
        first = min([*part.reads, *part.replaces], key=lambda t: made_at.get(t, -1))
        layers[name] = _Layer(part, first if first in made_at else None)
    leaves = checker.leaves()
    if not layers or not 0 < _kept_bytes(float_model, leaves, batched) <= KEPT_BYTES:
        return {}
    stops = {t for lay in layers.values() for t in [*lay.part.reads, *lay.part.replaces] if t in made_at}
    stepper = Stepper(float_model, stops, optimize=True)
    runs = [feeds for leaf in leaves for feeds in leaf.batches]  # every reference's batches, in order
    kept: list[list] = [[] for _ in runs]  # each run's states before each piece

    def base(i: int) -> None:
        stepper.run(runs[i], keep=kept[i])

    try:
        list(in_order(base, range(len(runs))))
    except Exception:  # onnxruntime refused a piece: whole checks decide
        return {}

    def score(name: str) -> float | None:
        lay = layers[name]
        try:
            outs = [_resumed(stepper, lay, checker, feeds, keep) for feeds, keep in zip(runs, kept, strict=True)]
        except Exception:  # onnxruntime refused the part: a whole check decides
            return None
        worst, at = 1.0, 0
        for leaf in leaves:
            mine = outs[at : at + len(leaf.batches)]
            at += len(leaf.batches)
            for out, ref in leaf.outputs.items():
                cand = _stack([np.asarray(o[out]) for o in mine])
                worst = min(worst, compare_arrays(out, ref, cand, 0.0, 0.0).cosine)
        return worst

    scored = dict(zip(layers, in_order(score, list(layers)), strict=True))
    return {k: v for k, v in scored.items() if v is not None}


def _resumed(stepper: Stepper, lay: _Layer, checker: Any, feeds: dict[str, np.ndarray], keep: list) -> dict:
    """The model's outputs on ``feeds`` with ``lay``'s INT8 part in place of its float node."""
    part = lay.part
    values: dict[str, np.ndarray] = {}
    written: dict[str, np.ndarray] = {}

    def part_outputs() -> dict[str, np.ndarray]:
        if not written:
            with lay.lock:
                if lay.session is None:
                    dtypes = {r: onnx.helper.np_dtype_to_tensor_dtype(values[r].dtype) for r in part.reads}
                    lay.session = checker.candidate_session(part.model(dtypes))[0]
            written.update(run(lay.session, {r: values[r] for r in part.reads}))
        return written

    def hook(name: str, v: np.ndarray) -> np.ndarray | None:
        if name in part.reads:
            values.setdefault(name, v)  # the float value the part reads
        if name in part.replaces:
            return part_outputs()[part.replaces[name]]
        return None

    if lay.resume is None:  # a graph input read or replaced: from the start, the feeds replaced first
        feeds = dict(feeds)
        values.update({r: feeds[r] for r in part.reads if r in feeds})
        for t, out in part.replaces.items():
            if t in feeds:
                feeds[t] = part_outputs()[out]
        return stepper.run(feeds, hook)
    return stepper.run(feeds, hook, keep=keep, resume=lay.resume)
