"""Input shape hints (``--shape name=1,3,224,224``) and static shape inference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from redonnx.errors import RedonnxError
from redonnx.io.graph import tensor_map

Shape = list[int | str | None]


def parse_shape_args(args: list[str] | None) -> dict[str, list[int]]:
    """Parse ``name=d0,d1,...`` strings into a dict."""
    shapes: dict[str, list[int]] = {}
    for arg in args or []:
        name, sep, dims = arg.rpartition("=")
        if not sep or not name:
            raise RedonnxError(f"--shape {arg!r}: expected name=d0,d1,... (e.g. input=1,3,224,224)")
        try:
            values = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise RedonnxError(f"--shape {arg!r}: dimensions must be integers") from None
        if not values or any(v <= 0 for v in values):
            raise RedonnxError(f"--shape {arg!r}: dimensions must be positive integers")
        shapes[name] = values
    return shapes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def declared_shape(vi: onnx.ValueInfoProto) -> Shape | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def resolve_input_shapes(
    model: onnx.ModelProto, hints: dict[str, list[int]] | None, batch: int = 1
) -> dict[str, list[int]]:
    """Concrete shapes for every real input: hints first, then declared dims.

    A symbolic leading dimension defaults to ``batch``; any other symbolic dimension needs a hint.
    """
    hints = dict(hints or {})
    names = {vi.name for vi in graph_inputs(model)}
    unknown = sorted(set(hints) - names)
    if unknown:
        raise RedonnxError(f"--shape names unknown input {unknown[0]!r} (inputs: {', '.join(sorted(names))})")
    out: dict[str, list[int]] = {}
    for vi in graph_inputs(model):
        dims = declared_shape(vi)
        if vi.name in hints:
            if dims is not None and len(dims) != len(hints[vi.name]):
                raise RedonnxError(
                    f"--shape {vi.name}: rank {len(hints[vi.name])} does not match the model's rank {len(dims)}"
                )
            for axis, (d, h) in enumerate(zip(dims or [], hints[vi.name], strict=False)):
                if isinstance(d, int) and d > 0 and d != h:
                    raise RedonnxError(f"--shape {vi.name}: dimension {axis} is fixed at {d} in the model, not {h}")
            out[vi.name] = hints[vi.name]
            continue
        if dims is None:
            raise RedonnxError(f"input {vi.name!r} has no declared shape; pass --shape {vi.name}=d0,d1,...")
        concrete = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                concrete.append(d)
            elif axis == 0:
                concrete.append(batch)
            else:
                spec = ",".join(str(x) if isinstance(x, int) and x > 0 else "?" for x in dims)
                raise RedonnxError(f"input {vi.name!r} has dynamic dimensions [{spec}]; pass --shape {vi.name}=...")
        out[vi.name] = concrete
    return out


def infer_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes of every tensor onnx can infer (empty for models it cannot handle)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # onnx raises many types; inference is best effort
        return {}
    shapes: dict[str, Shape] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        s = declared_shape(vi)
        if s is not None:
            shapes[vi.name] = s
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


SKELETON_ELEMENTS = 4096  # constants larger than this enter shape inference as typed inputs only


def _infer_skeleton(graph: gs.Graph) -> onnx.GraphProto | None:
    """onnx shape inference over ``graph``, or None if it fails.

    Large constants are swapped for graph inputs of the same type and shape while the graph is
    exported, so inference sees no weight data and nothing large is copied."""
    swaps = swap_constants(graph, lambda _node, t: int(np.prod(t.shape)) > SKELETON_ELEMENTS)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
        model.ir_version = max(model.ir_version, 7)  # IR < 4 inference would not read initializers
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True).graph
    except Exception:  # best effort: callers work without shapes
        return None
    finally:
        restore_constants(graph, swaps)


def graph_shapes(graph: gs.Graph) -> dict[str, Shape]:
    """Shapes of every tensor onnx can infer in ``graph`` (empty if inference fails)."""
    g = _infer_skeleton(graph)
    if g is None:
        return {}
    shapes: dict[str, Shape] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        s = declared_shape(vi)
        if s is not None:
            shapes[vi.name] = s
    for t in tensor_map(graph).values():
        if isinstance(t, gs.Constant):
            shapes[t.name] = list(t.shape)
    return shapes


def annotate_graph(graph: gs.Graph) -> int:
    """Fill in missing shapes and dtypes of ``graph``'s variables from onnx shape inference (none
    missing: nothing to infer, and inference, the costly part, is not run)."""
    variables = [t for t in tensor_map(graph).values() if isinstance(t, gs.Variable)]
    if all(t.shape is not None and t.dtype is not None for t in variables):
        return 0
    g = _infer_skeleton(graph)
    if g is None:
        return 0
    infos = {vi.name: vi for vi in [*g.value_info, *g.output]}
    filled = 0
    for name, tensor in tensor_map(graph).items():
        vi = infos.get(name)
        if vi is None or not isinstance(tensor, gs.Variable):
            continue
        if tensor.shape is None and vi.type.tensor_type.HasField("shape"):
            tensor.shape = [d if d is not None else None for d in declared_shape(vi) or []]
            filled += 1
        if tensor.dtype is None and vi.type.tensor_type.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return filled


Swap = tuple[gs.Node, int, gs.Constant, gs.Variable]


def swap_constants(graph: gs.Graph, pick, rename: bool = False) -> list[Swap]:
    """Replace the constant inputs that ``pick(node, constant)`` selects by graph inputs of the same
    type and shape (named like the constant, or freshly when ``rename``); undo with
    :func:`restore_constants`."""
    proxies: dict[int, gs.Variable] = {}
    swaps = []
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and pick(node, t):
                proxy = proxies.get(id(t))
                if proxy is None:
                    name = f"{t.name}_placeholder_{len(proxies)}" if rename else t.name
                    proxy = proxies[id(t)] = gs.Variable(name, dtype=t.dtype, shape=list(t.shape))
                    graph.inputs.append(proxy)
                node.inputs[i] = proxy
                swaps.append((node, i, t, proxy))
    return swaps


def restore_constants(graph: gs.Graph, swaps: list[Swap]) -> None:
    proxies = {id(p) for *_, p in swaps}
    for node, i, const, _ in swaps:
        node.inputs[i] = const
    graph.inputs[:] = [t for t in graph.inputs if id(t) not in proxies]
