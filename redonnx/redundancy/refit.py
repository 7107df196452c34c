"""Refit pruned layers to calibration data by least squares, layer after layer.

With real inputs (``--calibration``), each Conv (group 1), Gemm and MatMul of the pruned model
is refitted, in graph order, so that on those inputs its output matches the original model's
output at the same tensor (the channels it kept):

    W', b' = argmin || [X' 1] [W'; b'] - Y ||^2 + ridge

where X' are the layer's input patches *in the pruned network as refitted so far* and Y the
original network's outputs. Each layer sees the activations its pruned predecessors really
produce, so errors do not accumulate along the depth (the compensation of merge-channels only
knows the statistics of the network before pruning). Positions are subsampled (at most
``ROWS`` per layer, seeded) and the ridge is relative to the inputs' energy. A refit is kept only
if a fit on three quarters of the rows beats the present weights on the last quarter (other
samples): with few calibration samples for a wide layer it would fit them and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from redonnx.io.graph import const_value, export, set_input_values, to_graph, to_model
from redonnx.measure.runtime import run, session, with_outputs
from redonnx.measure.segments import Stepper
from redonnx.redundancy.classes import out_axis

ROWS = 16384
RIDGE = 1e-4


@dataclass
class RefitResult:
    model: onnx.ModelProto
    layers: list[dict] = field(default_factory=list)


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    return {k: v for k, v in run(session(with_outputs(model, names)), feeds).items() if k in names}


def _patches(x: np.ndarray, node: gs.Node, kshape: list[int], pick: tuple[np.ndarray, ...]) -> np.ndarray:
    """Rows [R, C * prod(k)] of the conv input patches at output positions ``pick`` (n, i, j)."""
    strides = list(node.attrs.get("strides", [1, 1]))
    dil = list(node.attrs.get("dilations", [1, 1]))
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    n, i, j = pick
    cols = []
    for a in range(kshape[0]):
        for b in range(kshape[1]):
            cols.append(xp[n, :, i * strides[0] + a * dil[0], j * strides[1] + b * dil[1]])  # [R, C]
    return np.stack(cols, axis=2).reshape(len(n), -1)  # [R, C, k] -> C-major, as the weight's layout


def _rel(pred: np.ndarray, t: np.ndarray) -> float:
    return float(np.linalg.norm(pred - t) / max(float(np.linalg.norm(t)), 1e-30))


def _fit(a: np.ndarray, y: np.ndarray, intercept: bool = True) -> np.ndarray:
    """[D + 1, C_out]: weights, then the intercept (zero when the layer cannot take one)."""
    if intercept:
        a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    gram = a.T @ a
    lam = RIDGE * max(float(np.mean(np.diag(gram))), 1e-30)
    sol = np.linalg.solve(gram + lam * np.eye(len(gram)), a.T @ y)
    return sol if intercept else np.concatenate([sol, np.zeros((1, sol.shape[1]))])


def _width(node: gs.Node) -> int:
    """The layer's output features (channels)."""
    return int(node.inputs[1].shape[out_axis(node)])


def _takes_bias(node: gs.Node) -> bool:
    """Can the running model take a new bias for this layer (a bias input, or a MatMul's constant Add)?"""
    if node.op == "MatMul":
        add = next(iter(node.outputs[0].outputs), None)
        return add is not None and add.op == "Add" and any(isinstance(t, gs.Constant) for t in add.inputs)
    return len(node.inputs) > 2 and bool(node.inputs[2].name) and isinstance(node.inputs[2], gs.Constant)


def _design(node: gs.Node, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple | None:
    """Input rows and target rows for the layer's least squares, or None when not refittable."""
    w = np.asarray(node.inputs[1].values)
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and w.ndim == 4 and y.ndim == 4:
        n, _c, oh, ow = y.shape
        total = n * oh * ow
        pick = np.unravel_index(np.sort(rng.choice(total, min(ROWS, total), replace=False)), (n, oh, ow))
        return _patches(x.astype(np.float64), node, list(w.shape[2:]), pick), y[pick[0], :, pick[1], pick[2]]
    if node.op in ("Gemm", "MatMul") and w.ndim == 2 and not node.attrs.get("transA", 0):
        a, t = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if len(a) > ROWS:
            keep = np.sort(rng.choice(len(a), ROWS, replace=False))
            a, t = a[keep], t[keep]
        return a.astype(np.float64), t
    return None


def _apply(graph: gs.Graph, node: gs.Node, sol: np.ndarray) -> list[gs.Constant]:
    """Weights from the solution's rows, its last row the bias (into the layer, or an Add after a
    MatMul, which must exist: the running model cannot gain nodes); returns the changed constants."""
    w = np.asarray(node.inputs[1].values)
    new, bias = sol[:-1], sol[-1]
    if node.op == "Conv":
        set_input_values(node, 1, new.T.reshape(w.shape).astype(w.dtype))
    else:
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        trans = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        set_input_values(node, 1, ((new.T if trans else new) / alpha).astype(w.dtype))
    if node.op == "MatMul":  # the target is the MatMul's own output: its bias is the Add after it
        add = next(iter(node.outputs[0].outputs), None)
        j = 1 if add is not None and add.inputs[0] is node.outputs[0] else 0
        if add is None or add.op != "Add" or not isinstance(add.inputs[j], gs.Constant):
            return [node.inputs[1]]
        old = np.asarray(add.inputs[j].values)
        set_input_values(add, j, (old.astype(np.float64) + bias.reshape(old.shape)).astype(old.dtype))
        return [node.inputs[1], add.inputs[j]]
    old = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if old is None:
        return [node.inputs[1]]  # no bias input to change while the model runs: weights only
    scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    set_input_values(node, 2, (bias / scale).reshape(np.asarray(old).shape).astype(np.asarray(old).dtype))
    return [node.inputs[1], node.inputs[2]]


def _current(node: gs.Node, a: np.ndarray) -> np.ndarray:
    """The layer's present output on design rows ``a`` (to keep a refit only where it helps)."""
    w = np.asarray(node.inputs[1].values, np.float64)
    if node.op == "Conv":
        m = w.reshape(w.shape[0], -1).T
    else:
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        m = (w.T if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w) * alpha
    out = a @ m
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        out = out + scale * np.asarray(const_value(node.inputs[2]), np.float64).reshape(-1)
    return out


HELD_OUT = 4  # one row in this many (the last rows: other samples) checks a fit made on the rest


def _generalizes(node: gs.Node, a: np.ndarray, t: np.ndarray) -> bool:
    """Does a fit on the first rows beat the present weights on the held-out last rows? With few
    calibration rows for a wide layer (48 sentences against 1536 MLP neurons) least squares fits
    the rows it sees and worsens every other input."""
    cut = len(a) - max(len(a) // HELD_OUT, 1)
    if cut < 1:
        return False
    sol = _fit(a[:cut], t[:cut], _takes_bias(node))
    held = np.concatenate([a[cut:], np.ones((len(a) - cut, 1))], 1) @ sol
    return _rel(held, t[cut:]) < _rel(_current(node, a[cut:]), t[cut:])


def refit(
    pruned: onnx.ModelProto,
    original: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    kept: dict[str, list[int]] | None = None,
    seed: int = 0,
    cache: dict | None = None,
) -> RefitResult:
    """Refit every refittable layer of ``pruned`` whose output tensor the original also has
    (``cache`` keeps the original's outputs between calls: the budget search refits every trial).

    One piecewise run of the pruned model (:class:`redonnx.measure.segments.Stepper`): at each layer's
    input the layer is refitted, and the pieces after it, built only when they first run, read
    the new weights."""
    kept = kept or {}
    graph = to_graph(pruned)
    orig_names = {o for n in original.graph.node for o in n.output}
    layers = [n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul") and isinstance(n.inputs[1], gs.Constant)
              and n.outputs[0].name in orig_names and not isinstance(n.inputs[0], gs.Constant)]  # fmt: skip
    if not layers:
        return RefitResult(pruned)
    names = [n.outputs[0].name for n in layers]
    cache = {} if cache is None else cache
    missing = [n for n in names if n not in cache]
    if missing:
        cache.update(_outputs(original, feeds, missing))
    targets = cache
    rng = np.random.default_rng(seed)
    out = RefitResult(pruned)
    model = export(graph)
    del model.graph.value_info[:]
    readers: dict[str, list[gs.Node]] = {}
    for node in layers:
        readers.setdefault(node.inputs[0].name, []).append(node)
    stepper = Stepper(model, list(readers))

    def at_input(name: str, x: np.ndarray) -> None:
        for node in readers[name]:
            y = targets[node.outputs[0].name]
            if node.outputs[0].name in kept:
                y = np.take(y, kept[node.outputs[0].name], axis=1 if node.op == "Conv" else -1)
            design = _design(node, x, y, rng)
            if design is None or design[1].shape[-1] != _width(node):  # cut by a pass that did not say how
                continue
            a, t = design
            t = t.astype(np.float64)
            if not _generalizes(node, a, t):
                continue
            before = _rel(_current(node, a), t)
            sol = _fit(a, t, _takes_bias(node))
            after = _rel(np.concatenate([a, np.ones((len(a), 1))], 1) @ sol, t)
            changed = _apply(graph, node, sol)
            for tensor in changed:  # later pieces are built from these initializers
                stepper.set_initializer(tensor.name, np.asarray(tensor.values))
            out.layers.append({"layer": node.name, "error_before": round(before, 6), "error_after": round(after, 6)})

    stepper.run(feeds, at_input)
    tag = next((p.value for p in pruned.metadata_props if p.key == "redonnx"), "")
    out.model = to_model(graph, pruned, note=(tag.split(": ", 1)[1] + "," if ": " in tag else "") + "refit")
    return out
