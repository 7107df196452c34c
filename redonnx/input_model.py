"""What each input of a model holds, inferred from the graph without data, and how to draw it.

Every lossy decision and every synthetic verification runs on drawn inputs, so they must look like
the model's data. Each graph input gets a *kind*, a range and the evidence for them:

- **images** (4-D floats): smooth noise (random at 1/4 resolution, upsampled, blurred) with the
  colour channels correlated as in natural images (0.9), at the scale the model expects. The
  scale is a convention (normalized N(0, 1), pixels in 0..1, -1..1 or raw 0..255). Where the
  model has BatchNorm, the convention whose activations at the first BatchNorm layers best match
  their running mean and variance wins (:mod:`redonnx.realism`); otherwise the gain of the first
  weighted layer decides, measured through whatever reaches it (Transpose, Mul/Sub/Div by
  constants, Keras Rescaling): a trained layer's gain is 0.2-1.7 on normalized inputs and ~0.02
  on raw pixels, so below 0.1 the inputs are raw pixels.
- **vectors** (other floats): N(0, 1), or a convention chosen by BatchNorm evidence as above.
- **token ids** (integers that index a Gather of a constant table, through Cast, Reshape,
  Unsqueeze...): uniform in [0, rows of the smallest table); tables of <= 2 rows: type ids.
- **masks** (integers or booleans cast to float for arithmetic, or compared, with several
  elements): ones on a prefix of each row at least half its length.
- **values the graph branches on** (a single number compared, used by If/Loop, or as a shape: a
  flag, a sample rate): cannot be drawn; the error names the input and asks for ``--inputs``.

Given inputs (``--inputs``) replace the inference: :func:`from_given` fits the same kinds to the
arrays (their value sets, scales and shapes), so synthetic samples drawn for statistics are valid
and distinct from the samples verification uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from redonnx import realism as RL
from redonnx.errors import RedonnxError
from redonnx.segments import Stepper
from redonnx.shapes import declared_shape, graph_inputs, resolve_input_shapes

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_,
}  # fmt: skip


@dataclass(frozen=True)
class Convention:
    name: str
    mean: float
    std: float
    low: float | None = None
    high: float | None = None


NORMALIZED = Convention("normalized (mean 0, std 1)", 0.0, 1.0)
RAW_PIXELS = Convention("raw pixels 0..255", 115.0, 64.0, 0.0, 255.0)
CONVENTIONS = (
    NORMALIZED,
    Convention("pixels 0..1", 0.45, 0.25, 0.0, 1.0),
    Convention("pixels -1..1", 0.0, 0.5, -1.0, 1.0),
    RAW_PIXELS,
)
PIXEL_GAIN = 0.1  # first-layer gain below which inputs are raw 0..255 pixels (see module doc)
COLOUR_CORRELATION = 0.9  # between the RGB channels of natural images (0.79-0.91 on the CIFAR-10 images)
SCALE_PROBES = 16  # images drawn to compare conventions


@dataclass
class InputSpec:
    """One input: its kind, how to draw it, and why we think so."""

    name: str
    dtype: str
    kind: str  # image | vector | token ids | type ids | mask | integers | booleans | needs value | given
    evidence: str
    mean: float = 0.0
    std: float = 1.0
    low: float | None = None
    high: float | None = None  # integers: exclusive
    channel_axis: int | None = None
    convention: str | None = None
    values: np.ndarray | None = field(default=None, repr=False)  # given: the observed values (or rows)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "values" and v is not None}
        return d

    def describe(self) -> str:
        rng = ""
        if self.kind in ("token ids", "type ids", "integers"):
            rng = f" in [{self.low:g}, {self.high:g})"
        elif self.convention:
            rng = f", {self.convention}"
        elif self.kind in ("image", "vector"):
            rng = f", mean {self.mean:.3g} std {self.std:.3g}"
        return f"{self.name}: {self.kind}{rng} ({self.evidence})"


@dataclass
class InputModel:
    """How to draw every input of a model."""

    specs: dict[str, InputSpec]
    source: str  # "inferred from the graph" or "fitted to the given inputs"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "inputs": [s.to_dict() for s in self.specs.values()]}

    def describe(self) -> str:
        return "; ".join(s.describe() for s in self.specs.values())

    def npz_hint(self) -> str:
        return ", ".join(f"{s.name}: {s.dtype}" for s in self.specs.values())

    def missing_values(self) -> list[InputSpec]:
        return [s for s in self.specs.values() if s.kind == "needs value"]

    def draw(self, model: onnx.ModelProto, shapes: dict[str, list[int]] | None, batch: int, seed: int,
             white: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
        """Seeded inputs of the right shapes, dtypes, kinds and ranges; ``white``: images as white
        noise at the same scale (a second kind of sample for verification)."""
        need = self.missing_values()
        if need:
            raise RedonnxError(need_values_message(need))
        concrete = resolve_input_shapes(model, shapes, batch=batch)
        if batch_is_leading(model):  # a hint fixes the sample's shape, not how many samples
            concrete = {k: [batch, *v[1:]] if v else v for k, v in concrete.items()}
        rng = np.random.default_rng(seed)
        return {name: _draw(spec, concrete[name], rng, white) for name, spec in self.specs.items()}


def batch_is_leading(model: onnx.ModelProto) -> bool:
    """Does every input have a dynamic leading dimension (the batch, shared by all)? Models whose
    state inputs carry the batch elsewhere (RNN states [layers, batch, hidden]) are drawn at the
    hinted shapes."""
    dims = [vi.type.tensor_type.shape.dim for vi in graph_inputs(model)]
    return bool(dims) and all(d and not d[0].HasField("dim_value") for d in dims)


def need_values_message(specs: list[InputSpec]) -> str:
    s = specs[0]
    return (f"input {s.name!r} needs a real value: {s.evidence}; synthetic values would not exercise the model as "
            f"it is used. Pass --inputs file.npz with an array named {s.name!r} (and the other inputs)")  # fmt: skip


# ------------------------------------------------------------------ drawing


def _draw(spec: InputSpec, shape: list[int], rng: np.random.Generator, white: bool = False) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if spec.kind in ("token ids", "type ids", "integers"):
        if spec.values is not None:  # given: the values seen
            return rng.choice(spec.values, size=shape).astype(dtype)
        return rng.integers(int(spec.low or 0), int(spec.high or 8), size=shape).astype(dtype)
    if spec.kind == "mask":
        return _mask(shape, rng, spec.values).astype(dtype)
    if spec.kind == "booleans":
        return rng.random(shape) < 0.5
    if spec.kind == "given":  # e.g. a sample rate: exactly as given
        return np.broadcast_to(spec.values, shape).astype(dtype) if spec.values is not None else np.zeros(shape, dtype)
    if spec.kind == "image" and len(shape) == 4 and spec.channel_axis is not None and not white:
        z = smooth_noise(shape, spec.channel_axis, rng)
    else:
        z = rng.standard_normal(shape)
    x = spec.mean + spec.std * z
    if spec.low is not None or spec.high is not None:
        x = np.clip(x, spec.low, spec.high)
    return x.astype(dtype)


def _mask(shape: list[int], rng: np.random.Generator, rows: np.ndarray | None) -> np.ndarray:
    if rows is not None and rows.ndim == len(shape) and list(rows.shape[1:]) == list(shape[1:]):
        return rows[rng.integers(0, len(rows), size=shape[0])]
    m = np.ones(shape)
    if len(shape) == 2 and shape[1] > 1:
        for i, n in enumerate(rng.integers(-(-shape[1] // 2), shape[1] + 1, size=shape[0])):
            m[i, n:] = 0
    return m


def smooth_noise(shape: list[int], channel_axis: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-variance noise with the coarse spatial structure and correlated colour
    channels of natural images (random at 1/4 resolution, upsampled and blurred)."""
    spatial = [ax for ax in range(1, 4) if ax != channel_axis]
    low = [d if ax not in spatial else max(d // 4, 1) for ax, d in enumerate(shape)]
    y = rng.standard_normal(low)
    channels = shape[channel_axis]
    if channels in (3, 4):
        lum_shape = list(low)
        lum_shape[channel_axis] = 1
        y = np.sqrt(1 - COLOUR_CORRELATION) * y + np.sqrt(COLOUR_CORRELATION) * rng.standard_normal(lum_shape)
    for ax in spatial:
        y = np.repeat(y, -(-shape[ax] // y.shape[ax]), axis=ax).take(range(shape[ax]), axis=ax)
        if shape[ax] >= 3:
            y = (y + np.roll(y, 1, ax) + np.roll(y, -1, ax)) / 3.0
    return (y - y.mean()) / max(float(y.std()), 1e-12)


# ------------------------------------------------------------------ inference from the graph

PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Transpose", "Expand", "Tile",
                "Slice", "Concat", "Gather", "CastLike"}  # fmt: skip
BRANCHING = {"If", "Loop", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
             "Where"}  # fmt: skip
SHAPE_SLOTS = {"Reshape": 1, "Expand": 1, "Tile": 1, "Range": 0, "ConstantOfShape": 0, "OneHot": 1, "TopK": 1,
               "Slice": 1, "Resize": 1, "Pad": 1, "Upsample": 1, "Squeeze": 1, "Unsqueeze": 1}  # fmt: skip


@dataclass
class _Uses:
    tables: list[int] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    arithmetic: list[str] = field(default_factory=list)
    layouts: list[list[int]] = field(default_factory=list)  # Transpose perms on the way


Constants = dict[str, tuple[tuple[int, ...], str]]


def _uses(model: onnx.ModelProto, name: str, constants: Constants) -> _Uses:
    """Where an input's values go, following pass-through ops."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    uses, frontier, seen = _Uses(), [name], {name}
    while frontier:
        t = frontier.pop()
        for n in readers.get(t, []):
            slots = [i for i, x in enumerate(n.input) if x == t]
            if n.op_type in ("Gather", "GatherElements", "GatherND") and 1 in slots and n.input[0] in constants:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                uses.tables.append(int(constants[n.input[0]][0][axis]))
                continue
            if n.op_type in BRANCHING:
                uses.branches.append(n.op_type)
                continue
            if any(SHAPE_SLOTS.get(n.op_type, -1) <= s and s > 0 for s in slots) or (
                n.op_type in ("Range", "ConstantOfShape")
            ):
                uses.shapes.append(n.op_type)
                continue
            if n.op_type == "Transpose":
                uses.layouts.append([a for a in next(a.ints for a in n.attribute if a.name == "perm")] or [])
            if n.op_type in PASS_THROUGH or (n.op_type in ("Add", "Sub") and _is_int_cast_chain(n, constants)):
                for o in n.output:
                    if o and o not in seen:
                        seen.add(o)
                        frontier.append(o)
            else:
                uses.arithmetic.append(n.op_type)
    return uses


def _is_int_cast_chain(n: onnx.NodeProto, constants: Constants) -> bool:
    """Adding an integer constant keeps ids ids (position offsets)."""
    other = [x for x in n.input if x in constants]
    return bool(other) and constants[other[0]][1] in "iu"


def infer(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> InputModel:
    """The input model of ``model`` from its graph alone (see the module doc)."""
    specs = infer_kinds_only(model)
    _choose_scales(model, specs, shapes)
    return InputModel(specs, "inferred from the graph")


def constant_info(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and numpy kind ('f', 'i', ...) of every initializer and Constant node, without reading data."""
    out = {}
    for t in model.graph.initializer:
        out[t.name] = (tuple(t.dims), np.dtype(_NP.get(t.data_type, np.float32)).kind)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value":
            t = n.attribute[0].t
            out[n.output[0]] = (tuple(t.dims), np.dtype(_NP.get(t.data_type, np.float32)).kind)
    return out


def _single(dims: list) -> bool:
    return all(isinstance(d, int) and d == 1 for d in dims)


def _float_spec(model: onnx.ModelProto, name: str, dtype: str, dims: list, constants: Constants) -> InputSpec:
    uses = _uses(model, name, constants)
    if _single(dims) and (uses.branches or uses.shapes):
        return InputSpec(name, dtype, "needs value", f"a single number that reaches {(uses.branches + uses.shapes)[0]}")
    if len(dims) == 4:
        return InputSpec(name, dtype, "image", "4-D float input", channel_axis=_channel_axis(model, name, dims))
    return InputSpec(name, dtype, "vector", f"{len(dims)}-D float input")


def _channel_axis(model: onnx.ModelProto, name: str, dims: list) -> int:
    """NCHW unless a Transpose to NCHW follows the input (tf2onnx) or only the last dim looks like colours."""
    uses = _uses(model, name, {})
    for perm in uses.layouts:
        if list(perm) == [0, 3, 1, 2]:
            return 3
    colours = (1, 3, 4)
    if len(dims) == 4 and dims[3] in colours and dims[1] not in colours:
        return 3
    return 1


def _discrete_spec(
    model: onnx.ModelProto, name: str, dtype: str, dims: list, elem: int, constants: Constants
) -> InputSpec:
    uses = _uses(model, name, constants)
    if uses.tables:
        rows = min(uses.tables)
        kind = "type ids" if rows <= 2 else "token ids"
        return InputSpec(name, dtype, kind, f"indexes a table of {rows} rows (Gather)", low=0, high=rows)
    single = _single(dims) or not dims
    if single and (uses.branches or uses.shapes):
        what = (uses.branches + uses.shapes)[0]
        why = f"a single number that reaches {what} (a flag, size or sample rate)"
        return InputSpec(name, dtype, "needs value", why)
    if uses.arithmetic or uses.branches:
        how = f"cast to float and used in {uses.arithmetic[0]}" if uses.arithmetic else "compared"
        return InputSpec(name, dtype, "mask", f"{how} (0/1 values)", low=0, high=2)
    if uses.shapes:
        return InputSpec(name, dtype, "needs value", f"used as a shape by {uses.shapes[0]}")
    if elem == onnx.TensorProto.BOOL:
        return InputSpec(name, dtype, "booleans", "boolean input")
    return InputSpec(name, dtype, "integers", "nothing in the graph bounds it", low=0, high=8)


# ------------------------------------------------------------------ scale of float inputs


def _choose_scales(model: onnx.ModelProto, specs: dict[str, InputSpec], shapes: dict[str, list[int]] | None) -> None:
    floats = [s for s in specs.values() if s.kind in ("image", "vector")]
    if not floats:
        return
    points = RL.bn_points(model)
    first = _first_points(model, points) if points else []
    for spec in floats:
        if first and len(floats) == 1:
            try:
                _by_batchnorm(model, specs, spec, first, shapes)
                continue
            except Exception:
                pass
        _by_gain(model, specs, spec, shapes)


def _first_points(model: onnx.ModelProto, points: list[RL.BNPoint]) -> list[RL.BNPoint]:
    """BN layers with no other BN upstream: the ones an input's scale decides directly."""
    by_tensor = {p.tensor: p for p in points}
    above: dict[str, bool] = {}  # tensor -> has a BN output upstream (or is one)
    for n in model.graph.node:
        up = any(above.get(x, False) for x in n.input)
        for o in n.output:
            above[o] = up or o in by_tensor
    bn_inputs_clean = [p for p in points if not above.get(p.input, False)]
    return bn_inputs_clean


def _probe_feeds(model, specs, spec, shapes, conv: Convention, seed: int = 7) -> dict[str, np.ndarray]:
    trial = {k: (InputSpec(**{**v.__dict__}) if k != spec.name else
                 InputSpec(**{**v.__dict__, "mean": conv.mean, "std": conv.std, "low": conv.low, "high": conv.high}))
             for k, v in specs.items()}  # fmt: skip
    per_sample = max(int(np.prod([d for d in resolve_input_shapes(model, shapes)[spec.name][1:]])), 1)
    batch = int(np.clip(2**19 // per_sample, 2, SCALE_PROBES if spec.kind == "image" else 64))
    return InputModel(trial, "").draw(model, shapes, batch=batch, seed=seed)


def _by_batchnorm(model, specs, spec: InputSpec, first: list[RL.BNPoint], shapes) -> None:
    scores = {}
    for conv in CONVENTIONS:
        feeds = _probe_feeds(model, specs, spec, shapes, conv)
        scores[conv.name] = RL.assess(model, feeds, first, correct=False, prefix=True).overall or 0.0
    best = max(CONVENTIONS, key=lambda c: scores[c.name])
    others = ", ".join(f"{c.name} {scores[c.name]:.2f}" for c in CONVENTIONS if c is not best)
    _set(spec, best, f"the first BatchNorm layers' running statistics: realism {scores[best.name]:.2f} ({others})")


def _set(spec: InputSpec, conv: Convention, evidence: str) -> None:
    spec.mean, spec.std, spec.low, spec.high = conv.mean, conv.std, conv.low, conv.high
    spec.convention = conv.name
    spec.evidence = evidence


LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _first_layer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    """The first weighted layer the input reaches, its weight not computed from any input."""
    from_input = {name}
    from_any = {vi.name for vi in graph_inputs(model)}
    for n in model.graph.node:
        if n.op_type in LAYERS and len(n.input) > 1 and n.input[0] in from_input and n.input[1] not in from_any:
            return n
        if any(x in from_input for x in n.input):
            from_input.update(o for o in n.output if o)
        if any(x in from_any for x in n.input):
            from_any.update(o for o in n.output if o)
    return None


def _by_gain(model, specs, spec: InputSpec, shapes) -> None:
    """The first layer's gain on unit white noise, through whatever leads to it."""
    if spec.kind != "image":
        spec.convention = NORMALIZED.name
        spec.evidence += "; no BatchNorm statistics to fit a scale: N(0, 1)"
        return
    layer = _first_layer(model, spec.name)
    if layer is None:
        _set(spec, NORMALIZED, "no weighted layer found to judge the scale: assumed normalized")
        return
    try:
        stepper = Stepper(model, [layer.output[0]])
        probe = InputModel({k: InputSpec(**v.__dict__) for k, v in specs.items()}, "")
        probe.specs[spec.name].kind = "vector"  # white noise, unit variance: the gain's definition
        probe.specs[spec.name].low = probe.specs[spec.name].high = None
        probe.specs[spec.name].mean, probe.specs[spec.name].std = 0.0, 1.0
        feeds = probe.draw(model, shapes, batch=2, seed=5)
        y = stepper.run(feeds, until=layer.output[0])[layer.output[0]].astype(np.float64)
        zero = {k: (np.zeros_like(v) if k == spec.name else v) for k, v in feeds.items()}
        y0 = stepper.run(zero, until=layer.output[0])[layer.output[0]].astype(np.float64)
    except Exception:
        _set(spec, NORMALIZED, "the first layer could not be run alone: assumed normalized")
        return
    d = np.moveaxis(y - y0, 1 if layer.op_type != "MatMul" else -1, -1)
    gain = float(np.sqrt(np.mean(d.reshape(-1, d.shape[-1]).var(0))))
    conv = RAW_PIXELS if gain < PIXEL_GAIN else NORMALIZED
    _set(spec, conv, f"no BatchNorm statistics; first layer {layer.name or layer.op_type} has gain {gain:.3g} on unit "
                     f"noise ({'<' if gain < PIXEL_GAIN else '>='} {PIXEL_GAIN}: "
                     f"{'raw pixels' if conv is RAW_PIXELS else 'normalized inputs'})")  # fmt: skip


# ------------------------------------------------------------------ fitted to given inputs


def from_given(model: onnx.ModelProto, given: dict[str, np.ndarray]) -> InputModel:
    """The input model of arrays the user gave: same kinds, their values and scales."""
    inferred = infer_kinds_only(model)
    specs: dict[str, InputSpec] = {}
    for name, x in given.items():
        base = inferred.get(name)
        x = np.asarray(x)
        dtype = x.dtype.name
        if x.dtype.kind == "f":
            kind = base.kind if base is not None and base.kind in ("image", "vector") else "vector"
            axis = base.channel_axis if base is not None else None
            spec = InputSpec(name, dtype, kind, f"fitted to the {len(x) if x.ndim else 1} given samples",
                             mean=float(x.mean()), std=float(x.std()) or 1.0, low=float(x.min()), high=float(x.max()),
                             channel_axis=axis if kind == "image" else None)  # fmt: skip
        elif x.size <= 1 or (base is not None and base.kind == "needs value"):
            spec = InputSpec(name, dtype, "given", "used exactly as given", values=x.reshape(-1)[:1])
        elif base is not None and base.kind == "mask" and x.ndim >= 1:
            spec = InputSpec(name, dtype, "mask", "rows of the given masks", values=x)
        elif x.dtype == np.bool_:
            spec = InputSpec(name, dtype, "booleans", "given booleans")
        else:
            vals = np.unique(x)
            kind = base.kind if base is not None and base.kind in ("token ids", "type ids") else "integers"
            spec = InputSpec(name, dtype, kind, f"the {len(vals)} distinct values given", low=float(vals.min()),
                             high=float(vals.max()) + 1, values=vals)  # fmt: skip
        specs[name] = spec
    return InputModel(specs, "fitted to the given inputs")


def infer_kinds_only(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """Kinds from the graph, without the scale measurement (no onnxruntime run)."""
    constants = constant_info(model)
    out = {}
    for vi in graph_inputs(model):
        elem = vi.type.tensor_type.elem_type
        dtype = np.dtype(_NP.get(elem, np.float32)).name
        dims = declared_shape(vi) or []
        out[vi.name] = (_float_spec(model, vi.name, dtype, dims, constants) if elem in FLOATS
                        else _discrete_spec(model, vi.name, dtype, dims, elem, constants))  # fmt: skip
    return out


def given_shapes(model: onnx.ModelProto, given: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Shape hints from given arrays: one sample's shape (a dynamic leading dimension becomes 1)."""
    out = {}
    for vi in graph_inputs(model):
        if vi.name in given:
            shape = list(np.shape(given[vi.name]))
            dims = vi.type.tensor_type.shape.dim
            if shape and dims and not dims[0].HasField("dim_value"):
                shape[0] = 1
            out[vi.name] = shape
    return out
