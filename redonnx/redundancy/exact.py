"""The exact criterion: channels that are identical, a positive multiple of another through
positively homogeneous ops, or provably constant (zero, or a constant absorbed into the readers'
biases) are merged or removed without changing any output.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.channels.coupling import ChannelGraph, Item
from redonnx.redundancy.classes import HOMOGENEOUS, ClassInfo, Plan


def _homogeneous(info: ClassInfo) -> bool:
    """Does scaling the class's layer rows by s > 0 scale its values everywhere by s?"""
    for n in info.nodes:
        if n.op in ("Conv", "ConvTranspose") and int(n.attrs.get("group", 1)) > 1:
            return False  # depthwise: its bias would not scale
        if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Concat", "Split", "Slice", "Pad"):
            continue
        if n.op not in HOMOGENEOUS:
            return False
        n_act = sum(isinstance(t, gs.Variable) for t in n.inputs)
        if n.op in ("Mul", "Div") and n_act > 1:
            return False
        if n.op in ("Add", "Sub", "Sum") and n_act < sum(1 for t in n.inputs if t.name):
            return False  # adds a constant: affine, not homogeneous
    return True


def _constant_removal(cg: ChannelGraph, info: ClassInfo) -> list[tuple[Item, int, float]] | None:
    """Sink bias updates that remove a constant channel exactly, or None when it cannot go."""
    if info.zero_ok:
        return []
    updates = []
    for t, c in info.members:
        for it in cg.items.get(t, []):
            if it.kind != "sink":
                continue
            k = info.constants.get(t)
            if k is None:
                return None
            if k != 0:
                if not _absorbs(it.node):
                    return None
                updates.append((it, c, k))
    return updates


def _absorbs(node: gs.Node) -> bool:
    """Can a layer take a constant input channel into its bias exactly (no zero padding)?"""
    if node.op in ("Gemm", "MatMul"):
        return True
    if node.op == "Conv":
        pads = any(int(p) for p in node.attrs.get("pads", [0]))
        return not pads and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    return False


def exact_merges(cg: ChannelGraph, members: list[ClassInfo], plan: Plan) -> None:
    keep_by_sig: dict[bytes, ClassInfo] = {}
    for info in sorted(members, key=lambda i: i.root):
        if not info.sourced:
            continue
        absorb = _constant_removal(cg, info)
        if absorb is not None:
            plan.merges.append((info.root, None, 0.0))
            plan.absorb[info.root] = absorb
            plan.exact[info.root] = "constant channels removed" if absorb else "zero channels removed"
            continue
        keep = keep_by_sig.get(info.sig)
        if keep is not None and _same_vectors(keep, info):
            plan.merges.append((info.root, keep.root, 1.0))
            plan.exact[info.root] = "identical channels merged"
            continue
        keep_by_sig.setdefault(info.sig, info)
    _scaled_merges(list(keep_by_sig.values()), plan)


def _same_vectors(a: ClassInfo, b: ClassInfo) -> bool:
    """Confirm a hash match: equal rows and parameters."""
    return all(np.array_equal(x, y) for x, y in zip(a.vectors(), b.vectors(), strict=True))


def _scaled_merges(infos: list[ClassInfo], plan: Plan) -> None:
    """Channels whose rows are positive multiples of another's, through homogeneous ops only.

    Candidates meet on their unit-norm rows rounded to 6 decimals (linear time, where comparing
    all pairs would cost C^2 d); each pair is then confirmed to 1e-6."""
    by_dir: dict[bytes, ClassInfo] = {}
    for info in infos:
        if info.direction is None or not _homogeneous(info):
            continue
        keep = by_dir.setdefault(info.direction, info)
        if keep is info:
            continue
        s = info.norm / keep.norm
        (a, fa), (b, fb) = info.vectors(), keep.vectors()
        if np.allclose(a, s * b, rtol=1e-6, atol=1e-9 * info.norm) and np.array_equal(fa, fb):
            plan.merges.append((info.root, keep.root, float(s)))
            plan.exact[info.root] = "scaled channels merged"
