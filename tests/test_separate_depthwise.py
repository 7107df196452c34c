"""separate-depthwise: exact separation of low-rank convs, both ONNX forms, real ResNet-20 variants."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from builders import Builder
from conftest import assert_equivalent, shared_model

from redonnx.io.files import load_model
from redonnx.measure.cost import model_cost
from redonnx.passes import PassContext, SeparateDepthwise
from redonnx.passes.separate_depthwise import costs, factorize, first_unpaying_channel
from redonnx.pipeline import prune, run_passes


def low_rank(w: np.ndarray, ranks: list[int]) -> np.ndarray:
    """Truncate W[:, i] (flattened kernels over outputs) to rank ranks[i] (independent SVD)."""
    out = np.array(w, dtype=np.float64)
    cout, cin = w.shape[:2]
    for i in range(cin):
        m = out[:, i].reshape(cout, -1)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        out[:, i] = ((u[:, : ranks[i]] * s[: ranks[i]]) @ vt[: ranks[i]]).reshape(out[:, i].shape)
    return out.astype(w.dtype)


def separated(m: onnx.ModelProto, **params):
    exact = not params.get("max_error")
    out, (res, _) = run_passes(m, [SeparateDepthwise(**params), "cleanup"], exact=exact)
    return out, res


def test_factorize_recovers_ranks() -> None:
    rng = np.random.default_rng(0)
    w = low_rank(rng.standard_normal((8, 5, 3, 3)).astype(np.float32), [1, 2, 3, 1, 2])
    f = factorize(w)
    assert f.ranks == [1, 2, 3, 1, 2] and f.rel_error < 1e-6
    assert costs(8, 5, 9, f.ranks)["gather"] == (9 * 9 + 8 * 9, 9 * 9 + 8 * 9)


@pytest.mark.parametrize(("ranks", "form"), [([1, 1, 1, 1], "multiplier"), ([2, 2, 2, 2], "multiplier"),
                                              ([1, 3, 1, 1], "gather"), ([1, 1, 1, 1], "stacked")])  # fmt: skip
def test_exact_forms_keep_outputs(ranks: list[int], form: str) -> None:
    b = Builder()
    rng = np.random.default_rng(1)
    w = low_rank(rng.standard_normal((16, 4, 3, 3)).astype(np.float32), ranks)
    y = b.op("Conv", ["x", b.const(w), b.rand(16)], pads=[1, 1, 1, 1], strides=[2, 2], kernel_shape=[3, 3])
    m = b.model([("x", [2, 4, 9, 9])], [b.op("Relu", [y])])
    out, res = separated(m, form=form)
    assert res.counts == {f"convs separated ({form})": 1}
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Gather") == (form == "gather") and ops.count("Conv") == 2
    assert model_cost(out).macs < model_cost(m).macs
    assert_equivalent(m, out)


def test_full_rank_declined() -> None:
    b = Builder()
    m = b.model([("x", [1, 4, 6, 6])], [b.conv("x", 4, 8)])
    out, res = separated(m)
    assert not res.counts and "would not lower" in res.declined[0].reason
    assert_equivalent(m, out)


@pytest.mark.parametrize("seed", range(6))
def test_the_early_rank_bound_decides_as_the_full_factorization(seed: int) -> None:
    """One channel of too high a rank declines the conv before the full SVD: the verdict must be
    the one the full factorization and its cost count reach, whichever channel it is."""
    rng = np.random.default_rng(seed)
    cout, cin = int(rng.integers(4, 24)), int(rng.integers(1, 6))
    ranks = [int(r) for r in rng.integers(0, 4, cin)]
    if seed % 2:
        ranks[int(rng.integers(cin))] = 9  # one full-rank channel, anywhere
    w = low_rank(rng.standard_normal((cout, cin, 3, 3)), ranks)
    f = factorize(w)
    c = costs(cout, cin, 9, f.ranks)
    pays = c["stacked"][0] < c["original"][0] and c["stacked"][1] < c["original"][1]
    over = first_unpaying_channel(w)
    assert (over is None) == pays
    if over is not None:
        assert over[1] == f.ranks[over[0]] and over[0] == next(i for i, r in enumerate(f.ranks) if r == over[1])


def test_1d_conv_and_dilation() -> None:
    b = Builder()
    rng = np.random.default_rng(2)
    w = low_rank(rng.standard_normal((12, 3, 5)).astype(np.float32)[..., None], [1, 1, 1])[..., 0]
    y = b.op("Conv", ["x", b.const(w)], pads=[4, 4], dilations=[2], kernel_shape=[5])
    m = b.model([("x", [2, 3, 20])], [y])
    out, res = separated(m)
    assert res.counts
    assert_equivalent(m, out)


def test_truncation_is_lossy_and_reports_error() -> None:
    b = Builder()
    m = b.model([("x", [1, 4, 8, 8])], [b.conv("x", 4, 32)])
    with pytest.raises(Exception, match="lossy"):
        run_passes(m, [SeparateDepthwise(max_error=0.5)], exact=True)
    _out, res = separated(m, max_error=0.6)
    assert res.counts and 0 < res.layers[0]["rel_error"] <= 0.6


def resnet_variant(rank: int) -> onnx.ModelProto:
    base = run_passes(load_model(shared_model("cifar10/resnet20_bn.onnx")).model, None, exact=True)[0]
    g = gs.import_onnx(base)
    for n in g.nodes:
        if n.op == "Conv" and n.inputs[1].shape[2:] == [3, 3] and n.inputs[1].shape[1] > 3:
            w = n.inputs[1]
            w.values = low_rank(w.values, [rank] * w.shape[1])
    return gs.export_onnx(g)


@pytest.mark.parametrize(("rank", "min_saving"), [(1, 0.60), (2, 0.35)])
def test_resnet20_low_rank_variants(rank: int, min_saving: float) -> None:
    m = resnet_variant(rank)
    res = prune(m, passes=["separate-depthwise", "cleanup"], exact=True, target="macs")  # no latency gate
    assert res.verification, res.verification.summary()
    assert res.after.macs <= (1 - min_saving) * res.before.macs
    assert res.after.params < res.before.params
    opsets = [(o.domain, o.version) for o in res.model.opset_import]
    assert opsets == [(o.domain, o.version) for o in m.opset_import]
    assert all(n.domain == "" and onnx.defs.has(n.op_type) for n in res.model.graph.node)
    onnx.checker.check_model(res.model, full_check=True)  # standard ops, valid at the model's opset


@pytest.mark.parametrize("ranks", [[2, 2, 2, 2], [1, 3, 1, 2]])
def test_stacked_form_keeps_outputs(ranks: list[int]) -> None:
    b = Builder()
    rng = np.random.default_rng(3)
    w = low_rank(rng.standard_normal((16, 4, 3, 3)).astype(np.float32), ranks)
    y = b.op("Conv", ["x", b.const(w), b.rand(16)], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    m = b.model([("x", [2, 4, 7, 7])], [y])
    out, res = separated(m, form="stacked")
    assert res.counts == {"convs separated (stacked)": 1}
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Conv") == max(ranks) + 1 and "Concat" in ops
    assert_equivalent(m, out)


def rank_one_conv(c: int = 16):
    b = Builder(0)
    a = np.random.default_rng(0).standard_normal((c, c))
    v = np.random.default_rng(1).standard_normal((c, 9))
    w = (a[:, :, None] * v[None, :, :]).reshape(c, c, 3, 3).astype(np.float32)
    return b.model([("x", ["N", c, 16, 16])], [b.op("Conv", ["x", b.const(w)], pads=[1] * 4, kernel_shape=[3, 3])])


def test_separation_gated_on_a_measurement() -> None:
    """With a cost model (--target ort-cpu) a separated form that times slower is declined, saying so."""
    from redonnx.measure.latency import Cache, CostModel

    slow_forms = CostModel(Cache("off"), timer=lambda shape: 1.0, model_timer=lambda model, feeds: 2.0)
    fast_forms = CostModel(Cache("off"), timer=lambda shape: 1.0, model_timer=lambda model, feeds: 0.5)
    model = rank_one_conv()
    _, (kept,) = run_passes(model, ["separate-depthwise"], True, PassContext(cost_model=slow_forms))
    assert not kept.modified and "measured at 2.0000 ms against 1.0000 ms" in kept.declined[0].reason
    out, (done,) = run_passes(model, ["separate-depthwise"], True, PassContext(cost_model=fast_forms))
    assert done.counts == {"convs separated (stacked)": 1}
    assert_equivalent(model, out, rtol=1e-4)
