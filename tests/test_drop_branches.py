"""drop-branches: residual branches removed whole (depth pruning)."""

from __future__ import annotations

import numpy as np
from builders import Builder
from conftest import assert_equivalent

from redonnx.passes.drop_branches import find_branches
from redonnx.pipeline import prune, run_passes


def residual_net(scale: float = 0.5, zero: bool = False, extra_reader: bool = False):
    """x -> conv -> [conv, relu, conv] + x -> relu -> conv; the second conv of the branch scaled."""
    b = Builder(11)
    x = b.op("Relu", [b.conv("x", 3, 16)])
    h = b.op("Relu", [b.conv(x, 16, 16)])
    w = np.random.default_rng(1).standard_normal((16, 16, 3, 3)).astype(np.float32) * scale
    bias = np.random.default_rng(2).standard_normal(16).astype(np.float32) * scale
    if zero:
        w[:], bias[:] = 0, 0.25  # f(x) = 0.25 everywhere: a constant branch
    f = b.op("Conv", [h, b.const(w), b.const(bias)], pads=[1] * 4, kernel_shape=[3, 3])
    y = b.op("Relu", [b.op("Add", [f, x])])
    outs = [b.conv(y, 16, 4, k=1, pad=0)]
    if extra_reader:
        outs.append(b.op("Sigmoid", [h]))
    return b.model([("x", ["N", 3, 8, 8])], outs)


def test_branches_found_and_outside_readers_declined() -> None:
    import onnx_graphsurgeon as gs

    found, _ = find_branches(gs.import_onnx(residual_net()))
    assert len(found) == 1 and len(found[0].layers()) == 2
    found, declined = find_branches(gs.import_onnx(residual_net(extra_reader=True)))
    assert not found and "read outside the branch" in declined[0][1]


def test_exactly_constant_branch_removed_by_exact() -> None:
    """Acceptance: depth pruning of a residual branch that is exactly constant is lossless."""
    model = residual_net(zero=True)
    out, results = run_passes(model, ["drop-branches", "cleanup"], exact=True)
    assert results[0].counts == {"constant branches removed": 1}
    assert sum(n.op_type == "Conv" for n in out.graph.node) == 2
    assert_equivalent(model, out, rtol=1e-6)
    res = prune(model, exact=True, target="macs")
    assert res.after.macs < res.before.macs and res.verification


def test_planner_removes_a_branch_that_barely_matters() -> None:
    model = residual_net(scale=1e-3)
    res = prune(model, target="trt")
    rep = res.report()
    assert rep["budget"]["depth"]["removed"] == 1, rep["budget"]["depth"]
    assert sum(n.op_type == "Conv" for n in res.model.graph.node) == 2 and res.verification
    assert any("residual branch" in n for n in res.search.notes)


def test_planner_keeps_a_branch_that_matters() -> None:
    res = prune(residual_net(scale=0.5), target="trt")
    assert res.report()["budget"]["depth"]["removed"] == 0
    assert sum(n.op_type == "Conv" for n in res.model.graph.node) == 4


def test_ancestry_bit_sets_match_a_plain_walk() -> None:
    """The ancestor sets computed once per graph are each tensor's walk back to the inputs."""
    import onnx
    import onnx_graphsurgeon as gs
    from conftest import SHARED

    from redonnx.io.graph import to_graph
    from redonnx.passes.drop_branches import _Ancestry

    resnet = SHARED / "cifar10" / "resnet20_bn.onnx"
    for model in [residual_net(extra_reader=True)] + ([onnx.load(str(resnet))] if resnet.exists() else []):
        graph = to_graph(model)
        ancestry = _Ancestry()
        for t in [t for t in graph.tensors().values() if isinstance(t, gs.Variable)][::-1]:
            seen, stack = set(), [t]
            while stack:
                cur = stack.pop()
                if id(cur) not in seen:
                    seen.add(id(cur))
                    stack.extend(x for n in cur.inputs for x in n.inputs if isinstance(x, gs.Variable))
            bits = ancestry.of(t)
            members = {id(x) for x in graph.tensors().values() if bits & ancestry.bit(x)}
            assert members == seen & {id(x) for x in graph.tensors().values()}, t.name
