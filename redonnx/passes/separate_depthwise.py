"""separate-depthwise: uneven depthwise separation of ordinary convolutions (RED step 3).

For a Conv with group 1 and weight W [C_out, C_in, k...], take per input channel i the matrix
M_i = W[:, i] flattened to [C_out, prod(k)]. If rank(M_i) = r_i, then M_i = U_i V_i with V_i the
r_i basis kernels and U_i [C_out, r_i] the coefficients (SVD, U_i scaled by the singular values),
and the convolution is exactly

    y = Conv1x1(P) . DepthwiseConv(D) . Gather(x)

where the depthwise conv applies each basis kernel of channel i to channel i (strides, pads and
dilations unchanged) and the pointwise conv combines them with the coefficients and the bias.
Two exact ONNX forms, both standard ops in the original opset:

- ``multiplier``: a depthwise conv with channel multiplier m = max r_i (group = C_in), channels of
  lower rank padded with zero kernels; no Gather;
- ``gather``: input channels repeated r_i times by a Gather, then a depthwise conv with one
  kernel per basis vector (group = sum r_i): no padding waste;
- ``stacked``: m plain depthwise convs (multiplier 1, the j-th basis kernel of every channel,
  zero where r_i <= j) concatenated before the pointwise conv: the multiplier form's MACs, but
  every depthwise conv stays on onnxruntime's fast multiplier-1 path.

MACs per output position: C_out C_in prod(k) before, R prod(k) + C_out R after (R = C_in m or
sum r_i). The stacked form is the default: measured in onnxruntime on CPU it is the fastest (the
multiplier form leaves the fast depthwise path for m > 1, the Gather costs a copy). A conv is
rewritten only where MACs and parameters both go down. Rank is
counted above ``rank_tol`` x the largest singular value of M_i (exact up to rounding). With
``separate_error`` > 0 the pass truncates each M_i to the smallest rank whose relative Frobenius
error is within it (lossy) and reports that error per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.errors import RedonnxError
from redonnx.io.graph import tensor_map
from redonnx.passes.base import Pass, PassContext, PassResult

RANK_TOL = 1e-5


@dataclass
class Factors:
    """Per input channel: coefficients U_i [C_out, r_i] and basis kernels V_i [r_i, prod(k)]."""

    u: list[np.ndarray]
    v: list[np.ndarray]
    rel_error: float

    @property
    def ranks(self) -> list[int]:
        return [len(v) for v in self.v]


def factorize(w: np.ndarray, rank_tol: float = RANK_TOL, max_error: float = 0.0) -> Factors:
    """Per-input-channel SVD of a conv weight; exact ranks, or truncated to ``max_error``."""
    cout, cin = w.shape[:2]
    m = np.asarray(w, np.float64).reshape(cout, cin, -1).transpose(1, 0, 2)  # [C_in, C_out, K]
    uu, ss, vt = np.linalg.svd(m, full_matrices=False)
    total = float(np.sum(ss**2)) or 1.0
    us, vs, err = [], [], 0.0
    for i in range(cin):
        s = ss[i]
        r = rank_of(s, rank_tol, max_error)
        err += float(np.sum(s[r:] ** 2))
        us.append(uu[i][:, :r] * s[:r])
        vs.append(vt[i][:r])
    return Factors(us, vs, float(np.sqrt(err / total)))


def rank_of(s: np.ndarray, rank_tol: float = RANK_TOL, max_error: float = 0.0) -> int:
    """Rank kept from singular values ``s`` (descending): those above ``rank_tol`` x the largest, or
    the smallest rank leaving at most ``max_error`` of the energy out."""
    if max_error > 0:
        tail = np.append(np.cumsum((s**2)[::-1])[::-1], 0.0)
        return int(np.argmax(tail <= max_error**2 * float(np.sum(s**2))))
    return int(np.sum(s > rank_tol * max(float(s[0]), 1e-300))) if s.size else 0


def paying_rank(cout: int, cin: int, k: int) -> int:
    """The largest multiplier m at which the stacked and multiplier forms still lower both MACs and
    parameters: cin m (k + cout) < cout cin k."""
    return max(0, -(-cout * k // (k + cout)) - 1)


def first_unpaying_channel(
    w: np.ndarray, rank_tol: float = RANK_TOL, max_error: float = 0.0
) -> tuple[int, int, int] | None:
    """(input channel, rank, :func:`paying_rank`) of the first channel whose rank alone exceeds it, or
    None: the forms' m is the largest rank, so one such channel decides, before any full SVD (most
    trained 3x3 kernels are full rank: one small SVD per conv instead of C_in)."""
    cout, cin = w.shape[:2]
    k = int(np.prod(w.shape[2:]))
    limit = paying_rank(cout, cin, k)
    if limit >= min(cout, k):
        return None  # any rank pays
    m = np.asarray(w, np.float64).reshape(cout, cin, -1)
    for i in range(cin):
        r = rank_of(np.linalg.svd(m[:, i], compute_uv=False), rank_tol, max_error)
        if r > limit:
            return i, r, limit
    return None


def costs(cout: int, cin: int, k: int, ranks: list[int]) -> dict[str, tuple[int, int]]:
    """(MACs per output position, weight count) of the original and each separated form."""
    m, r = max(ranks) if ranks else 0, sum(ranks)
    return {
        "original": (cout * cin * k, cout * cin * k),
        "multiplier": (cin * m * k + cout * cin * m, cin * m * k + cout * cin * m),
        "gather": (r * k + cout * r, r * k + cout * r),
        "stacked": (cin * m * k + cout * cin * m, cin * m * k + cout * cin * m),
    }


@dataclass
class SeparateDepthwise(Pass):
    """Uneven depthwise separation of convolutions whose kernels have low rank per input channel."""

    name: ClassVar[str] = "separate-depthwise"
    max_error: float = 0.0  # relative Frobenius error allowed per kernel when truncating ranks (0: exact)
    form: str = "auto"  # auto (stacked), multiplier, gather or stacked

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error < 1.0:
            raise RedonnxError("--separate-error must be in [0, 1)")
        if self.form not in ("auto", "multiplier", "gather", "stacked"):
            raise RedonnxError("separate_form must be auto, multiplier, gather or stacked")

    @property
    def exact(self) -> bool:
        return self.max_error == 0.0

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        tags = _used_tags(graph)
        for node in list(graph.nodes):
            why = _reason(node)
            if why:
                if why != "skip":
                    res.decline(node, why)
                continue
            w = np.asarray(node.inputs[1].values)
            form = "stacked" if self.form == "auto" else self.form  # fastest in onnxruntime (benchmarks/separation.py)
            k = int(np.prod(w.shape[2:]))
            over = first_unpaying_channel(w, max_error=self.max_error) if form != "gather" else None
            if over is not None:
                res.decline(node, f"input channel {over[0]} has rank {over[1]}: separation would not lower MACs and "
                                  f"parameters above rank {over[2]}")  # fmt: skip
                continue
            f = factorize(w, max_error=self.max_error)
            c = costs(w.shape[0], w.shape[1], k, f.ranks)
            if c[form][0] >= c["original"][0] or c[form][1] >= c["original"][1]:
                res.decline(node, f"ranks {_rank_summary(f.ranks)}: separation would not lower MACs and parameters")
                continue
            slower = _measured_slower(node, f, form, ctx.cost_model)
            if slower:
                res.decline(node, f"ranks {_rank_summary(f.ranks)}: {slower}")
                continue
            _rewrite(graph, node, f, form, w.dtype, _new_tag(node, tags))
            res.count(f"convs separated ({form})")
            res.layers.append(
                {
                    "layer": node.name,
                    "form": form,
                    "ranks": _rank_summary(f.ranks),
                    "rel_error": f.rel_error,
                    "macs_per_position": [c["original"][0], c[form][0]],
                }
            )
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        return res


def _measured_slower(node: gs.Node, f: Factors, form: str, cost_model) -> str | None:
    """With a cost model (``--target ort-cpu``): why the separated form is not faster, timed alone
    against the original conv (cached by shape, form and multiplier), or None."""
    if cost_model is None:
        return None

    shape = cost_model.layer(node)
    if shape is None:
        return None
    key = f"separated {form} m={max(f.ranks)} " + shape.key()
    before = cost_model.ms(shape)
    after = cost_model.timed(key, lambda: _form_model(node, f, form, [1, shape.cin, *shape.spatial]))
    if after < SPEEDUP * before:
        return None
    return f"separated form measured at {after:.4f} ms against {before:.4f} ms in onnxruntime: not faster"


SPEEDUP = 0.95  # a separated form must be this much faster alone (in a model, reorders can eat small gains)


def _form_model(node: gs.Node, f: Factors, form: str, x_shape: list[int]):
    """The separated form of ``node`` alone, as a model with an input of ``x_shape`` for timing."""
    x = gs.Variable("x", dtype=np.float32, shape=x_shape)
    w = gs.Constant("w", np.asarray(node.inputs[1].values, np.float32))
    ins = [x, w] + ([gs.Constant("b", np.asarray(node.inputs[2].values, np.float32))]
                    if len(node.inputs) > 2 and node.inputs[2].name else [])  # fmt: skip
    y = gs.Variable("y", dtype=np.float32)
    conv = gs.Node("Conv", "conv", dict(node.attrs), ins, [y])
    g = gs.Graph(nodes=[conv], inputs=[x], outputs=[y], opset=17)
    _rewrite(g, conv, f, form, np.dtype(np.float32), "timed")
    g.cleanup().toposort()
    model = gs.export_onnx(g)
    model.ir_version = 8
    return model, {"x": np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)}


def _rank_summary(ranks: list[int]) -> str:
    values, counts = np.unique(ranks, return_counts=True)
    return ", ".join(f"{c}x rank {v}" for v, c in zip(values, counts, strict=True))


def _reason(node: gs.Node) -> str | None:
    if node.op != "Conv":
        return "skip"
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant):
        return "weight is not a constant"
    if int(node.attrs.get("group", 1)) != 1:
        return "skip"
    if len(w.shape) < 3 or int(np.prod(w.shape[2:])) == 1:
        return "skip"  # 1x1: nothing to separate
    if np.asarray(w.values).dtype.kind != "f" or not np.all(np.isfinite(w.values)):
        return "weight is not finite floating point"
    return None


def _used_tags(graph: gs.Graph) -> set[str]:
    """Every ``..._sepK`` prefix of a tensor or node name already in the graph."""
    names = [*tensor_map(graph), *(n.name for n in graph.nodes)]
    return {name[: m.end()] for name in names for m in re.finditer(r"_sep\d+(?=_)", name)}


def _new_tag(node: gs.Node, used: set[str]) -> str:
    """``NAME_sepK`` with the smallest K not in the graph: the same names in every run (a counter
    kept by the process named them after the calls before)."""
    base, k = node.name or node.inputs[1].name, 0
    while f"{base}_sep{k}" in used:
        k += 1
    used.add(f"{base}_sep{k}")
    return f"{base}_sep{k}"


def _rewrite(graph: gs.Graph, node: gs.Node, f: Factors, form: str, dtype: np.dtype, tag: str) -> None:
    w = node.inputs[1]
    cout, cin = w.shape[0], w.shape[1]
    kshape = list(w.shape[2:])
    if form == "stacked" and max(f.ranks) > 1:
        _rewrite_stacked(graph, node, f, dtype, tag, kshape)
        return
    if form in ("multiplier", "stacked"):
        m = max(f.ranks)
        d = np.zeros((cin * m, int(np.prod(kshape))))
        p = np.zeros((cout, cin * m))
        for i, (u, v) in enumerate(zip(f.u, f.v, strict=True)):
            d[i * m : i * m + len(v)] = v
            p[:, i * m : i * m + len(v)] = u
        src, groups = node.inputs[0], cin
    else:
        d = np.concatenate(f.v)
        p = np.concatenate(f.u, axis=1)
        idx = np.repeat(np.arange(cin), f.ranks).astype(np.int64)
        src = gs.Variable(f"{tag}_gathered", dtype=node.inputs[0].dtype)
        graph.nodes.append(
            gs.Node("Gather", f"{tag}_gather", {"axis": 1}, [node.inputs[0], gs.Constant(f"{tag}_idx", idx)], [src])
        )
        groups = len(idx)
    mid = gs.Variable(f"{tag}_depthwise", dtype=node.outputs[0].dtype)
    dw_attrs = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
    dw_attrs.update(group=int(groups), kernel_shape=kshape)
    dw_w = gs.Constant(f"{tag}_dw_weight", d.reshape(len(d), 1, *kshape).astype(dtype))
    graph.nodes.append(gs.Node("Conv", f"{tag}_dw", dw_attrs, [src, dw_w], [mid]))
    _pointwise(graph, node, mid, p, dtype, tag, len(kshape))


def _pointwise(graph: gs.Graph, node: gs.Node, src: gs.Variable, p: np.ndarray, dtype, tag: str, dims: int) -> None:
    """The 1x1 conv with coefficients ``p`` and the original bias takes over ``node``'s output."""
    cout = p.shape[0]
    pw_inputs = [src, gs.Constant(f"{tag}_pw_weight", p.reshape(cout, -1, *([1] * dims)).astype(dtype))]
    if len(node.inputs) > 2 and node.inputs[2].name:
        pw_inputs.append(node.inputs[2])
    out = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.append(gs.Node("Conv", f"{tag}_pw", {"kernel_shape": [1] * dims}, pw_inputs, [out]))


def _rewrite_stacked(graph: gs.Graph, node: gs.Node, f: Factors, dtype: np.dtype, tag: str, kshape: list[int]) -> None:
    cout, cin = node.inputs[1].shape[0], node.inputs[1].shape[1]
    m = max(f.ranks)
    dw_attrs = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
    dw_attrs.update(group=int(cin), kernel_shape=kshape)
    outs, p = [], np.zeros((cout, m * cin))
    for j in range(m):
        d = np.zeros((cin, int(np.prod(kshape))))
        for i, (u, v) in enumerate(zip(f.u, f.v, strict=True)):
            if j < len(v):
                d[i] = v[j]
                p[:, j * cin + i] = u[:, j]
        out = gs.Variable(f"{tag}_dw{j}_out", dtype=node.outputs[0].dtype)
        w = gs.Constant(f"{tag}_dw{j}_weight", d.reshape(cin, 1, *kshape).astype(dtype))
        graph.nodes.append(gs.Node("Conv", f"{tag}_dw{j}", dict(dw_attrs), [node.inputs[0], w], [out]))
        outs.append(out)
    cat = gs.Variable(f"{tag}_stacked", dtype=node.outputs[0].dtype)
    graph.nodes.append(gs.Node("Concat", f"{tag}_concat", {"axis": 1}, outs, [cat]))
    _pointwise(graph, node, cat, p, dtype, tag, len(kshape))
