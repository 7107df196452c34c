"""Input kinds inferred from the graph alone: where each input's values go (Gather tables,
branches, shapes, arithmetic), hence token ids, masks, images, vectors, values the graph compares
with constants, or values that must be given (see :mod:`redonnx.inputs.model`).

A single number the graph only compares with constants (silero-vad's ``sr``: ``Equal(sr, 16000)``
choosing the 16 kHz or the 8 kHz branch of an If) affects the outputs through the outcomes of
those comparisons alone, so a few values cover every outcome: each constant, and one value in
each interval around them (half the smallest positive one below, the midpoint between two, twice
the largest above), keeping the first value of each distinct outcome: for ``sr`` 16000 and 8000.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx

from redonnx.inputs.shapes import declared_shape, graph_inputs
from redonnx.inputs.specs import InputSpec

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_,
}  # fmt: skip


# ------------------------------------------------------------------ inference from the graph

PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Transpose", "Expand", "Tile",
                "Slice", "Concat", "Gather", "CastLike"}  # fmt: skip
BRANCHING = {"If", "Loop", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
             "Where"}  # fmt: skip
SHAPE_SLOTS = {"Reshape": 1, "Expand": 1, "Tile": 1, "Range": 0, "ConstantOfShape": 0, "OneHot": 1, "TopK": 1,
               "Slice": 1, "Resize": 1, "Pad": 1, "Upsample": 1, "Squeeze": 1, "Unsqueeze": 1}  # fmt: skip


COMPARISONS = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
VALUE_KEEPING = {"Cast", "CastLike", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Transpose", "Expand",
                 "Tile", "Gather", "Slice"}  # fmt: skip  # their first input's values pass unchanged (or some of them)


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
        return _value_spec(model, name, dtype, f"a single number that reaches {(uses.branches + uses.shapes)[0]}")
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
        return _value_spec(model, name, dtype, f"a single number that reaches {what} (a flag, size or sample rate)")
    if uses.arithmetic or uses.branches:
        how = f"cast to float and used in {uses.arithmetic[0]}" if uses.arithmetic else "compared"
        return InputSpec(name, dtype, "mask", f"{how} (0/1 values)", low=0, high=2)
    if uses.shapes:
        return InputSpec(name, dtype, "needs value", f"used as a shape by {uses.shapes[0]}")
    if elem == onnx.TensorProto.BOOL:
        return InputSpec(name, dtype, "booleans", "boolean input")
    return InputSpec(name, dtype, "integers", "nothing in the graph bounds it", low=0, high=8)


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


# ------------------------------------------------------------------ values the graph compares with


def _value_spec(model: onnx.ModelProto, name: str, dtype: str, why: str) -> InputSpec:
    """A single number the graph branches on or sizes with: drawn from the constants it is compared
    with when that is all the graph does with it (module doc), else it must be given."""
    found = compared_values(model, name, np.dtype(dtype))
    if isinstance(found, str):
        return InputSpec(name, dtype, "needs value", f"{why}; {found}")
    values, compared = found
    return InputSpec(name, dtype, "compared values", f"a single number the graph only compares with {compared}: "
                     "one value per outcome of those comparisons, each verified", values=values)  # fmt: skip


def compared_values(model: onnx.ModelProto, name: str, dtype: np.dtype) -> tuple[np.ndarray, str] | str:
    """(values taking every outcome of the comparisons, what they are compared with), or why not."""
    if dtype.kind == "b":
        return "a boolean"
    comparisons = _comparisons(model, name)
    if isinstance(comparisons, str):
        return comparisons
    if not comparisons:
        return "it is compared with no constant"
    candidates = _candidates(sorted({float(c) for _, cs, _ in comparisons for c in cs}), dtype.kind in "iub")
    seen: dict[tuple[bool, ...], float] = {}
    for v in candidates:
        seen.setdefault(_outcomes(v, comparisons), v)
    compared = " and ".join(sorted({f"{', '.join(f'{c:g}' for c in cs)} ({op})" for op, cs, _ in comparisons}))
    return np.array(list(seen.values())).astype(dtype), compared


Comparison = tuple[str, np.ndarray, bool]  # op, constants, whether the input is the left operand


def _comparisons(model: onnx.ModelProto, name: str) -> list[Comparison] | str:
    """Every comparison of ``name`` with a constant (through ops that keep its values, in subgraphs
    too), or why its values are used otherwise."""
    nodes = list(_all_nodes(model.graph))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    values = _constant_values(model.graph)
    out: list[Comparison] = []
    frontier, seen = [name], {name}
    while frontier:
        t = frontier.pop()
        for n in readers.get(t, []):
            slots = [i for i, x in enumerate(n.input) if x == t]
            if n.op_type in COMPARISONS and len(n.input) == 2 and len(slots) == 1:
                other = n.input[1 - slots[0]]
                if other not in values:
                    return f"it is compared with {other!r}, not a constant"
                out.append((n.op_type, values[other].reshape(-1), slots[0] == 0))
                continue
            if n.op_type not in VALUE_KEEPING or slots != [0]:
                return f"it also reaches {n.op_type}"
            for o in n.output:
                if o and o not in seen:
                    seen.add(o)
                    frontier.append(o)
    return out


def _all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _all_nodes(g)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Small numeric constants (initializers, Constant nodes) of a graph and its subgraphs."""
    from onnx import numpy_helper

    out = {}
    for g in [graph, *(a.g for n in _all_nodes(graph) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)]:
        for t in g.initializer:
            if np.prod(t.dims, dtype=np.int64) <= 64:
                out[t.name] = numpy_helper.to_array(t)
    for n in _all_nodes(graph):
        value = n.attribute[0] if n.op_type == "Constant" and n.output and n.attribute else None
        if value is not None and value.name == "value" and np.prod(value.t.dims, dtype=np.int64) <= 64:
            out[n.output[0]] = numpy_helper.to_array(value.t)
    return {k: v for k, v in out.items() if v.dtype.kind in "iufb"}


def _candidates(points: list[float], integral: bool) -> list[float]:
    """The constants, then one value in each interval they leave: below, between, above."""
    lo, hi = points[0], points[-1]
    below = lo / 2 if lo > 0 else lo - 1
    between = [(a + b) / 2 for a, b in itertools.pairwise(points)]
    above = hi * 2 if hi > 0 else hi + 1
    out = [*points, below, *between, above]
    if integral:
        out = [float(np.floor(v)) for v in out]
    return out


def _outcomes(v: float, comparisons: list[Comparison]) -> tuple[bool, ...]:
    ops = {"Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
           "GreaterOrEqual": np.greater_equal}  # fmt: skip
    out: list[bool] = []
    for op, cs, left in comparisons:
        x = np.full(cs.shape, v)
        out += [bool(b) for b in (ops[op](x, cs) if left else ops[op](cs, x))]
    return tuple(out)
