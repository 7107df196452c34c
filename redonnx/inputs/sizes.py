"""Sizes for dynamic dimensions, chosen without hints: the smallest that onnxruntime runs.

Verification and MAC counting need concrete input shapes; the rewrites do not, and the written
model keeps its dynamic dimensions. A dynamic leading dimension is the batch (1). Every other
dynamic dimension takes, from a short ladder that suits its role, the smallest size with which
onnxruntime runs the model on validly drawn inputs; dimensions sharing a symbolic name share the
size. Roles: a non-leading dimension of an integer input (token ids, masks) is a sequence
(16, 64, 128); the last dimension of a 2-D or 3-D float input a signal (16 to 4096 samples in
multiples of its 1-D convolutions' stride: an audio chunk); a spatial dimension of a 4-D float
input an image side (32, 64, 128, 224, 320,
640), kept to multiples of the graph's total stride along that axis (the product of the strides of
the convs and pools on the deepest path: a feature pyramid that upsamples and concatenates needs
sides its stride divides) and at least 4 strides (a deepest feature map of 1 or 2 is all border: a
detector's outputs are then near zero and comparing them says nothing), led by a size the model's
metadata or doc string names ("224x224", "640");
anything else 16, 32, 64, 128. A dimension named like an input's batch is 1 wherever it appears
(an RNN state [layers, batch, hidden]). When no ladder size runs, every size from 1 to 64 is tried (a fixed
Reshape or Gemm after the features can allow one only), then the ladder again with the dimensions of no
known role at 1 (silero-vad's state [2, ?, 128], whose batch has no name). Where an input is drawn from
the values the graph compares it with (a sample rate), a size must run with each of them. The next
size that also runs is kept as a second size: where a dimension is dynamic, verification runs at both,
so that a rewrite valid at one size only (a shape folded into a constant) is caught. ``--shape`` overrides every choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from redonnx.errors import RedonnxError, first_line
from redonnx.inputs.shapes import declared_shape, graph_inputs, resolve_input_shapes

if TYPE_CHECKING:
    from redonnx.inputs.specs import InputModel

SEQUENCE = (16, 64, 128)
SIGNAL = (16, 64, 256, 512, 1024, 4096)  # 1-D float signals (audio chunks), in multiples of their stride
MIN_MAPS = 4  # image sides start at this many times the stride (the deepest feature map 4 wide)
SMALL = 64  # when no ladder size runs: every size from 1 to this (a fixed Reshape or Gemm may need one)
MAX_TRIES = 80
IMAGE = (32, 64, 128, 224, 320, 640)
OTHER = (16, 32, 64, 128)


@dataclass
class Chosen:
    """Shapes for every input, and what was chosen for whom."""

    shapes: dict[str, list[int]]
    picks: dict[str, int] = field(default_factory=dict)  # symbol -> size chosen
    tried: list[str] = field(default_factory=list)
    second: dict[str, list[int]] | None = None  # shapes at the next size that runs (verification)
    second_picks: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.picks:
            return ""
        sizes = ", ".join(f"{k}={v}" for k, v in self.picks.items())
        also = ", ".join(f"{k}={v}" for k, v in self.second_picks.items())
        return (
            f"dynamic sizes chosen: {sizes} (the first of the ladder with which onnxruntime runs the model"
            + (f"; verified at {also} too" if also else "")
            + "; --shape overrides; the written model keeps its dynamic dimensions)"
        )


def _open(model: onnx.ModelProto, hints: dict[str, list[int]]):
    """(input, declared dims) of every input the hints leave to us."""
    for vi in graph_inputs(model):
        dims = declared_shape(vi)
        if vi.name not in hints and dims is not None:
            yield vi, dims


def _symbol(vi: onnx.ValueInfoProto, axis: int, d) -> str:
    """A dimension's symbolic name ("seq" is shared by every input that has it); anonymous ones
    ("?", "-1", unnamed: paddle2onnx names them all "?") by input and axis."""
    return d if isinstance(d, str) and d.strip("?-1 ") else f"{vi.name}:{axis}"


def batch_names(model: onnx.ModelProto) -> set[str]:
    """Symbolic names of the inputs' leading dimensions: the batch, wherever else it appears (an RNN
    state [layers, batch, hidden]) it is 1 too."""
    names = set()
    for vi in graph_inputs(model):
        dims = declared_shape(vi)
        if dims and isinstance(dims[0], str) and dims[0].strip("?-1 "):
            names.add(dims[0])
    return names


def _symbols(model: onnx.ModelProto, hints: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """Each dynamic non-leading dimension (by symbolic name, or input:axis), with its ladder."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    out: dict[str, tuple[int, ...]] = {}
    strides: list[int] | None = None
    batch = batch_names(model)
    for vi, dims in _open(model, hints):
        integer = vi.type.tensor_type.elem_type not in floats
        nhwc = len(dims) == 4 and dims[-1] in (1, 3, 4) and dims[1] not in (1, 3, 4)
        for axis, d in enumerate(dims):
            if axis == 0 or (isinstance(d, int) and d > 0) or d in batch:
                continue
            strides = strides or total_strides(model)
            side = axis - (1 if nhwc else 2)  # 0: height, 1: width
            if integer:
                ladder = SEQUENCE
            elif len(dims) == 4 and side in (0, 1):
                ladder = image_ladder(model, strides[side])
            elif axis == len(dims) - 1 and len(dims) in (2, 3):  # a signal: audio samples, a 1-D sequence
                ladder = tuple(sorted({-(-v // strides[2]) * strides[2] for v in SIGNAL}))
            else:
                ladder = OTHER
            out.setdefault(_symbol(vi, axis, d), ladder)
    return out


def total_strides(model: onnx.ModelProto) -> list[int]:
    """The largest product of strides (Conv, pooling) from an input to any tensor, per axis of 2-D
    convolutions (height, width) and for 1-D ones (a signal): the factor a side must be a multiple of."""
    factor: dict[str, tuple[float, float, float]] = {vi.name: (1.0, 1.0, 1.0) for vi in graph_inputs(model)}
    best = [1.0, 1.0, 1.0]
    for n in model.graph.node:
        seen = [factor[x] for x in n.input if x in factor]
        if not seen:
            continue
        f = [max(v[k] for v in seen) for k in range(3)]
        strides = next((list(a.ints) for a in n.attribute if a.name == "strides"), [])
        if n.op_type in ("Conv", "MaxPool", "AveragePool", "ConvInteger", "LpPool"):
            if len(strides) == 2:
                f = [f[0] * max(strides[0], 1), f[1] * max(strides[1], 1), f[2]]
            elif len(strides) == 1:
                f = [f[0], f[1], f[2] * max(strides[0], 1)]
        for o in n.output:
            factor[o] = (f[0], f[1], f[2])
        best = [max(b, v) for b, v in zip(best, f, strict=True)]
    return [int(min(b, 1024)) for b in best]


def total_stride(model: onnx.ModelProto) -> int:
    return max(total_strides(model)[:2])


def _named_size(model: onnx.ModelProto) -> int | None:
    """A square input side the model's metadata or doc string names ("224x224", "input_size: 640")."""
    import re

    text = " ".join([model.doc_string, model.graph.doc_string, *(p.value for p in model.metadata_props)])
    m = re.search(r"\b(\d{2,4})\s*[x*]\s*(\d{2,4})\b", text)
    m = m or re.search(r"(?:size|shape|resolution)\D{0,4}(\d{2,4})", text)
    return int(m.group(1)) if m and 8 <= int(m.group(1)) <= 4096 else None


def image_ladder(model: onnx.ModelProto, stride: int) -> tuple[int, ...]:
    """Image sides to try: a size the model names first, then the ladder in multiples of the stride,
    from 4 strides up (the deepest feature map at least 4 wide: at 1 or 2 a detector's outputs are
    all border and near zero, and comparing them says nothing), then 3, 2 and 1 strides."""
    stride = max(stride, 1)
    sides = sorted({-(-v // stride) * stride for v in IMAGE})
    big = [v for v in sides if v >= MIN_MAPS * stride]
    # then fewer strides, down to one (a text recognizer whose height must shrink to exactly 1)
    sides = big + [k * stride for k in range(MIN_MAPS - 1, 0, -1) if k * stride not in big]
    named = _named_size(model)
    return tuple(([named] if named else []) + [v for v in sides if v != named])


def _shapes_for(model: onnx.ModelProto, hints: dict[str, list[int]], picks: dict[str, int]) -> dict[str, list[int]]:
    out = dict(hints)
    batch = batch_names(model)
    for vi, dims in _open(model, hints):
        out[vi.name] = [d if isinstance(d, int) and d > 0 else 1 if axis == 0 or d in batch
                        else picks[_symbol(vi, axis, d)] for axis, d in enumerate(dims)]  # fmt: skip
    return out


def choose(model: onnx.ModelProto, hints: dict[str, list[int]] | None, draw) -> Chosen:
    """Shapes for every input: ``hints`` first, then the ladders (see the module doc).
    ``draw(shapes) -> feeds`` makes valid inputs at given shapes (a list: a size must run on each)."""
    hints = dict(hints or {})
    symbols = _symbols(model, hints)
    if not symbols:
        return Chosen(hints)
    from redonnx.measure.runtime import session

    sess = session(model)
    steps = max(len(v) for v in symbols.values())
    ladder = [{k: lad[min(i, len(lad) - 1)] for k, lad in symbols.items()} for i in range(steps)]
    small = [dict.fromkeys(symbols, v) for v in range(1, SMALL + 1)]  # sizes a fixed Reshape or Gemm allows
    held = [{k: 1 if symbols[k] == OTHER else v for k, v in picks.items()} for picks in ladder]  # an unnamed batch
    tried: list[str] = []
    last = ""
    for candidates in (ladder, small, held if held != ladder else []):
        found: Chosen | None = None
        for picks in candidates:
            if (found is not None and picks == found.picks) or len(tried) > MAX_TRIES:
                break
            shapes = _shapes_for(model, hints, picks)
            tried.append(", ".join(f"{k}={v}" for k, v in picks.items()))
            error = _runs(sess, draw(shapes))
            if error:
                last = error
                continue
            if found is None:
                found = Chosen(shapes, picks, list(tried))
                continue
            found.second, found.second_picks = shapes, picks
            break
        if found is not None:
            return found
    names = ", ".join(sorted({vi.name for vi in graph_inputs(model) if vi.name not in hints}))
    shown = "; ".join(tried[: len(ladder)]) + (f"; then 1 to {SMALL}" if len(tried) > len(ladder) else "")
    raise RedonnxError(
        f"no size for the dynamic dimensions of {names} runs in onnxruntime (tried {shown}; last error: "
        f"{last}); pass --shape NAME=d0,d1,... or --inputs file.npz"
    )


def _runs(sess, feeds: dict | list[dict]) -> str:
    """'' when onnxruntime runs the model on ``feeds`` (each of them, if several), else its first error line."""
    from redonnx.measure.runtime import run

    try:
        for one in feeds if isinstance(feeds, list) else [feeds]:
            run(sess, one)
    except Exception as exc:  # onnxruntime refuses this size
        return first_line(exc)
    return ""


def settle(
    model: onnx.ModelProto, inputs: dict[str, np.ndarray] | str | Path | None, hints: dict[str, list[int]] | None
) -> tuple[dict[str, np.ndarray] | None, dict[str, list[int]], Chosen | None]:
    """The given inputs (loaded from a file if need be) and the shapes to verify and count MACs
    at: the given arrays' shapes, else the hints completed by :func:`choose`."""
    from redonnx.inputs.model import InputModel, given_shapes, infer_kinds_only
    from redonnx.measure.runtime import load_npz_inputs

    if isinstance(inputs, (str, Path)):
        inputs = load_npz_inputs(inputs, model)
    if inputs is not None:
        return inputs, dict(hints or {}) or given_shapes(model, inputs), None
    kinds = InputModel(infer_kinds_only(model), "")
    cases = range(kinds.cases())  # a size must run with every value of the compared inputs (a sample rate)
    chosen = choose(model, hints, lambda sh: [kinds.draw(model, sh, batch=1, seed=0, case=k) for k in cases])
    return None, chosen.shapes, chosen


@dataclass(frozen=True, eq=False)
class Settled:
    """A run's inputs, settled once (:func:`settle_inputs`) and carried by the pass context: the
    shape hints (every input's, where sizes were chosen), the concrete shapes at batch 1, the sizes
    chosen for dynamic dimensions (with the second size verification also runs at), the given
    arrays, and the input model that draws synthetic ones. Draws need no model: the shapes at any
    batch follow from the settled ones (:meth:`at`)."""

    hints: dict[str, list[int]] | None  # what functions taking ``shapes`` take
    shapes: dict[str, list[int]] | None  # every input at batch 1; None: unknown (``error`` says why)
    input_model: InputModel
    given: dict[str, np.ndarray] | None = None
    chosen: Chosen | None = None
    batch_free: bool = False  # every input's leading dimension is dynamic: a draw sets it
    lead: frozenset[str] = frozenset()  # inputs whose dynamic leading dimension no hint fixes
    error: str = ""

    @classmethod
    def of(cls, model: onnx.ModelProto, hints: dict[str, list[int]] | None, input_model: InputModel,
           given: dict[str, np.ndarray] | None = None, chosen: Chosen | None = None) -> Settled:  # fmt: skip
        """The inputs of ``model`` at ``hints`` (as :func:`redonnx.inputs.shapes.resolve_input_shapes`
        completes them), drawn by ``input_model``."""
        from redonnx.inputs.specs import batch_is_leading

        try:
            shapes, error = resolve_input_shapes(model, hints, batch=1), ""
        except RedonnxError as exc:
            shapes, error = None, str(exc)
        lead = set()
        for vi in graph_inputs(model):
            dims = declared_shape(vi)
            if vi.name not in (hints or {}) and dims and not (isinstance(dims[0], int) and dims[0] > 0):
                lead.add(vi.name)
        return cls(hints, shapes, input_model, given, chosen, batch_is_leading(model), frozenset(lead), error)

    def at(self, batch: int) -> dict[str, list[int]]:
        """Every input's shape for ``batch`` samples (as :meth:`InputModel.draw` resolves them)."""
        if self.shapes is None:
            raise RedonnxError(self.error)
        out = {k: [batch, *v[1:]] if k in self.lead and v else list(v) for k, v in self.shapes.items()}
        if self.batch_free:  # a hint fixes the sample's shape, not how many samples
            out = {k: [batch, *v[1:]] if v else v for k, v in out.items()}
        return out

    def draw(self, batch: int, seed: int, white: bool = False) -> dict[str, np.ndarray]:
        """Seeded synthetic inputs: the same arrays as ``input_model.draw(model, hints, batch, seed)``."""
        self.input_model.check_values()
        return self.input_model.draw_at(self.at(batch), seed, white)

    def values_per_sample(self) -> int:
        """Input values of one sample, all inputs together."""
        return max(sum(int(np.prod(v[1:])) for v in (self.shapes or {}).values()), 1)

    def describe(self) -> str:
        return self.chosen.describe() if self.chosen is not None else ""


def settle_inputs(
    model: onnx.ModelProto,
    inputs: dict[str, np.ndarray] | str | Path | None,
    hints: dict[str, list[int]] | None,
    lenient: bool = False,
) -> Settled:
    """:func:`settle`, then the input model: fitted to the given arrays, else inferred from the
    graph at the settled shapes. ``lenient``: sizes that cannot be settled are left unknown (the
    lossless passes need none) instead of an error; drawing then raises it."""
    from redonnx.inputs import model as im

    try:
        given, shapes, chosen = settle(model, inputs, hints)
    except RedonnxError:
        if not lenient:
            raise
        given, shapes, chosen = (inputs if isinstance(inputs, dict) else None), hints, None
    model_of_inputs = im.from_given(model, given) if given is not None else im.infer(model, shapes)
    return Settled.of(model, shapes, model_of_inputs, given, chosen)
