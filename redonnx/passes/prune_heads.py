"""prune-heads: remove attention heads of exported transformer encoders.

Multi-head self-attention as exporters write it (torch, tf2onnx):

    Q = x Wq + bq    K = x Wk + bk    V = x Wv + bv                 (MatMul + Add, [B, S, H*D])
    Qh, Kh, Vh = transpose(reshape(., [B, S, H, D]))                (Reshape, Transpose)
    P = softmax(scale(Qh Kh^T) + mask)    C = P Vh                   (MatMul, Div/Mul, Add, Softmax, MatMul)
    y = reshape(transpose(C), [B, S, H*D]) Wo + bo

Head h is the D columns h*D..(h+1)*D of Wq, Wk, Wv (and biases) and the D rows of Wo: removing it
drops all of them and rewrites the Reshape constants (H and H*D). Its output C_h enters y only as
C_h Wo_h, so:

- a head whose V columns are all zero outputs C_h = bv_h whatever the attention (each row of P sums
  to 1): it goes exactly, bo += bv_h Wo_h;
- a head identical to another (Q, K, V columns and biases equal) has the same output: it goes
  exactly, Wo_keep += Wo_h;
- any other head (lossy, chosen by the planner: parameter ``drop``) goes with its context replaced by
  its least-squares prediction from the kept heads' contexts, C_h ~ C_K B + c, fitted on the
  statistics of the H*D features (parameter ``stats``, :mod:`redonnx.redundancy.statistics`): Wo_K += B Wo_h,
  bo += c Wo_h (B = 0 would be mean replacement; the fit can only do better on those inputs).

Matching is separate from rewriting; an attention block that is not in this form is left alone
with the reason (fused Attention ops, grouped-query layouts with fewer K/V heads, scaling applied
to Q before the Reshape are declined, not guessed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.io.graph import add_to_bias, const_value, set_input_values
from redonnx.passes.base import Pass, PassContext, PassResult
from redonnx.redundancy.statistics import Stats, regression


@dataclass
class Proj:
    """x W + b feeding one Reshape: the MatMul, its weight, and the bias Add (if any)."""

    matmul: gs.Node
    bias: gs.Node | None = None

    @property
    def w(self) -> np.ndarray:
        return np.asarray(self.matmul.inputs[1].values)

    @property
    def b(self) -> np.ndarray | None:
        if self.bias is None:
            return None
        return next(np.asarray(t.values) for t in self.bias.inputs if isinstance(t, gs.Constant))


@dataclass
class Attention:
    softmax: gs.Node
    q: Proj
    k: Proj
    v: Proj
    reshapes: list[gs.Node]  # of Q, K, V: targets [.., H, D]
    ctx: gs.Tensor  # P V, [B, H, S, D]
    out_reshape: gs.Node  # target [.., H*D]
    out: Proj
    heads: int
    dim: int
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.softmax.name or self.softmax.outputs[0].name

    def cols(self, h: int) -> slice:
        return slice(h * self.dim, (h + 1) * self.dim)


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None


def _sole(t: gs.Tensor) -> gs.Node | None:
    """The only reader of ``t`` that is not a Shape (exporters read B and S off the projections)."""
    readers = [n for n in t.outputs if n.op != "Shape"]
    return readers[0] if len(readers) == 1 else None


def _transpose(t: gs.Tensor, perm: list[int]) -> gs.Tensor | None:
    node = _producer(t)
    if node is None or node.op != "Transpose" or list(node.attrs.get("perm", [])) != perm:
        return None
    return node.inputs[0]


def _proj(t: gs.Tensor) -> Proj | None:
    node = _producer(t)
    bias = None
    if node is not None and node.op == "Add":
        consts = [x for x in node.inputs if isinstance(x, gs.Constant)]
        other = [x for x in node.inputs if isinstance(x, gs.Variable)]
        if len(consts) != 1 or len(other) != 1 or const_value(consts[0]).ndim != 1:
            return None
        bias, node = node, _producer(other[0])
    if node is None or node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant):
        return None
    if np.asarray(node.inputs[1].values).ndim != 2:
        return None
    return Proj(node, bias)


def _target(reshape: gs.Node) -> list[int | None] | None:
    """The Reshape's target with known entries (a Concat of computed B, S and constant H, D pieces)."""
    t = reshape.inputs[1]
    v = const_value(t)
    if v is not None:
        return [int(x) for x in v]
    node = _producer(t)
    if node is None or node.op != "Concat":
        return None
    out: list[int | None] = []
    for x in node.inputs:
        c = const_value(x)
        out += [int(a) for a in c.reshape(-1)] if c is not None else [None]
    return out


def _set_target(reshape: gs.Node, index: int, value: int) -> None:
    """Set entry ``index`` of a Reshape target (a constant, or a constant piece of a Concat)."""
    t = reshape.inputs[1]
    v = const_value(t)
    if v is not None:
        new = np.array(v, copy=True)
        new[index] = value
        set_input_values(reshape, 1, new)
        return
    node = _producer(t)
    pos = 0
    for i, x in enumerate(node.inputs):
        c = const_value(x)
        size = c.size if c is not None else 1
        if pos <= index < pos + size:
            new = np.array(c, copy=True).reshape(-1)
            new[index - pos] = value
            set_input_values(node, i, new.reshape(c.shape))
            return
        pos += size


def _scores(t: gs.Tensor) -> gs.Node | None:
    """Back from the Softmax input through a mask Add and a constant scale to the Q K^T MatMul."""
    for _ in range(4):
        node = _producer(t)
        if node is None:
            return None
        if node.op == "MatMul":
            return node
        if node.op in ("Div", "Mul") and isinstance(node.inputs[1], gs.Constant):
            t = node.inputs[0]
        elif node.op == "Add":
            t = node.inputs[0]  # scores + mask: exporters put the scores first
        else:
            return None
    return None


def match(softmax: gs.Node) -> Attention | str:
    """The attention block around ``softmax``, or why it is not one we can cut ("" if not attention)."""
    axis = int(softmax.attrs.get("axis", -1))
    scores = _scores(softmax.inputs[0])
    if scores is None or axis not in (-1, 3):
        return ""
    qr = _transpose(scores.inputs[0], [0, 2, 1, 3])
    kr = _transpose(scores.inputs[1], [0, 2, 3, 1])
    pv = _sole(softmax.outputs[0])
    if qr is None or kr is None or pv is None or pv.op != "MatMul" or pv.inputs[0] is not softmax.outputs[0]:
        return ""
    vr = _transpose(pv.inputs[1], [0, 2, 1, 3])
    back = _sole(pv.outputs[0])
    if vr is None or back is None or back.op != "Transpose" or list(back.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return "attention not in the Reshape/Transpose form (fused or other layout)"
    out_reshape = _sole(back.outputs[0])
    out_mm = _sole(out_reshape.outputs[0]) if out_reshape is not None and out_reshape.op == "Reshape" else None
    if out_mm is None or out_mm.op != "MatMul" or not isinstance(out_mm.inputs[1], gs.Constant):
        return "the heads' context does not reach an output projection"
    reshapes = [_producer(t) for t in (qr, kr, vr)]
    if any(r is None or r.op != "Reshape" for r in reshapes):
        return "Q, K or V is not reshaped into heads"
    projs = [_proj(r.inputs[0]) for r in reshapes]
    if any(p is None for p in projs):
        return "Q, K or V is not a projection with a constant weight (scaled or fused before the Reshape)"
    targets = [_target(r) for r in reshapes]
    if any(t is None or len(t) != 4 or t[2] is None or t[3] is None for t in targets):
        return "the head count is computed, not a constant"
    heads, dim = targets[0][2], targets[0][3]
    if any((t[2], t[3]) != (heads, dim) for t in targets):
        return "Q, K and V have different head layouts (grouped-query attention)"
    out_t = _target(out_reshape)
    if out_t is None or len(out_t) != 3 or out_t[2] not in (heads * dim, -1):
        return "the heads are not flattened back to H*D features"
    if any(p.w.shape[1] != heads * dim for p in projs) or out_mm.inputs[1].shape[0] != heads * dim:
        return "projection widths do not match H*D"
    for p, r in zip(projs, reshapes, strict=True):
        t = p.bias.outputs[0] if p.bias is not None else p.matmul.outputs[0]
        if _sole(t) is not r:
            return f"{t.name} is read outside the attention block"
    out = _proj_after(out_mm)
    return Attention(softmax, *projs, reshapes, pv.outputs[0], out_reshape, out, heads, dim)


def _proj_after(mm: gs.Node) -> Proj:
    reader = _sole(mm.outputs[0])
    if reader is not None and reader.op == "Add" and any(
        isinstance(t, gs.Constant) and const_value(t).ndim == 1 for t in reader.inputs
    ):  # fmt: skip
        return Proj(mm, reader)
    return Proj(mm)


FUSED = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
         "DecoderMaskedMultiHeadAttention"}  # fmt: skip


def find(graph: gs.Graph) -> tuple[list[Attention], list[tuple[gs.Node, str]]]:
    found, declined = [], []
    for node in graph.nodes:
        if node.op in FUSED:
            declined.append((node, f"fused {node.op} op (onnxruntime's transformer optimizer): heads are not cut; "
                                   "prune the model exported before that optimizer"))  # fmt: skip
        elif node.op == "Softmax":
            m = match(node)
            if isinstance(m, Attention):
                found.append(m)
            elif m:
                declined.append((node, m))
    return found, declined


def _head_block(att: Attention, h: int) -> list[np.ndarray]:
    s = att.cols(h)
    parts = []
    for p in (att.q, att.k, att.v):
        parts.append(p.w[:, s])
        if p.b is not None:
            parts.append(p.b[s])
    return parts


def exact_plan(att: Attention) -> tuple[dict[int, int], list[int]]:
    """Heads that go exactly: duplicates (head -> the head it equals) and constant heads."""
    dup: dict[int, int] = {}
    const: list[int] = []
    seen: list[int] = []
    for h in range(att.heads):
        if not np.any(att.v.w[:, att.cols(h)]):
            const.append(h)
            continue
        block = _head_block(att, h)
        same = next((g for g in seen if all(np.array_equal(a, b) for a, b in zip(_head_block(att, g), block,
                                                                             strict=True))), None)  # fmt: skip
        if same is None:
            seen.append(h)
        else:
            dup[h] = same
    if len(dup) + len(const) >= att.heads:  # keep one head
        keep = next(h for h in range(att.heads) if h not in dup)
        const = [h for h in const if h != keep]
    return dup, const


def remove(graph: gs.Graph, att: Attention, dup: dict[int, int], means: dict[int, np.ndarray],
           fitted: list[int] = (), stats: Stats | None = None) -> np.ndarray:  # fmt: skip
    """Drop the heads in ``dup`` (added into the head they equal), ``means`` (their context replaced
    by a constant [D] vector) and ``fitted`` (their context replaced by its least-squares prediction
    from the kept heads' contexts under ``stats``), and rewrite weights and Reshape targets.
    Returns the Q, K, V columns kept."""
    wo = np.array(att.out.w, dtype=np.float64)
    delta = np.zeros(wo.shape[1])
    for h, keep in dup.items():
        wo[att.cols(keep)] += wo[att.cols(h)]
    for h, m in means.items():
        delta += np.asarray(m, np.float64) @ wo[att.cols(h)]
    gone = set(dup) | set(means) | set(fitted)
    kept = [h for h in range(att.heads) if h not in gone]
    idx = np.concatenate([np.arange(att.cols(h).start, att.cols(h).stop) for h in kept])
    if fitted:
        cut = np.concatenate([np.arange(att.cols(h).start, att.cols(h).stop) for h in fitted])
        coef, const = regression(stats, list(cut), list(idx))  # ctx[cut] ~ coef ctx[idx] + const
        wo[idx] += coef.T @ wo[cut]
        delta += const @ wo[cut]
    for p in (att.q, att.k, att.v):
        set_input_values(p.matmul, 1, np.ascontiguousarray(p.w[:, idx]))
        if p.bias is not None:
            j = next(i for i, t in enumerate(p.bias.inputs) if isinstance(t, gs.Constant))
            set_input_values(p.bias, j, np.ascontiguousarray(p.b[idx]))
    set_input_values(att.out.matmul, 1, wo[idx].astype(att.out.w.dtype))
    if np.any(delta):
        add_to_bias(graph, att.out.matmul, delta)
    for r in att.reshapes:
        _set_target(r, 2, len(kept))
    if _target(att.out_reshape)[2] != -1:
        _set_target(att.out_reshape, 2, len(kept) * att.dim)
    return idx


@dataclass
class PruneHeads(Pass):
    """Removes attention heads: duplicate and zero-value heads exactly, and those the planner names."""

    name: ClassVar[str] = "prune-heads"
    drop: dict[str, list[int]] = field(default_factory=dict)  # attention block -> heads the planner removes
    stats: dict[str, Stats] = field(default_factory=dict)  # block -> statistics of its output projection's inputs

    @property
    def exact(self) -> bool:
        return not self.drop

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        chosen, head_stats = self.drop, self.stats
        found, declined = find(graph)
        for node, why in declined:
            res.decline(node, why)
        if found:
            res.stats["attention blocks"] = len(found)
            res.stats["heads"] = sum(a.heads for a in found)
        for att in found:
            dup, const = exact_plan(att)
            means = {h: att.v.b[att.cols(h)] if att.v.b is not None else np.zeros(att.dim) for h in const}
            fitted = [h for h in chosen.get(att.key, []) if h not in dup and h not in means]
            fitted = fitted[: max(att.heads - 1 - len(dup) - len(means), 0)]
            if not dup and not means and not fitted:
                continue
            cols = remove(graph, att, dup, means, fitted, head_stats.get(att.key) if fitted else None).tolist()
            for p in (att.q, att.k, att.v):  # the projections' outputs keep these columns (for --calibration refits)
                res.kept[p.matmul.outputs[0].name] = cols
            for what, n in (("duplicate heads merged", len(dup)), ("constant heads removed", len(const)),
                            ("heads removed with least-squares compensation", len(fitted))):  # fmt: skip
                if n:
                    res.count(what, n)
            res.layers.append(
                {
                    "attention": att.key,
                    "heads": att.heads,
                    "kept": att.heads - len(dup) - len(means) - len(fitted),
                    "duplicates": sorted(dup),
                    "constant": const,
                    "removed": sorted(fitted),
                }
            )
        if res.modified:
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        return res
