"""merge-channels: widened real models come back exactly; synthetic coupled graphs stay equal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import Builder
from conftest import MODELS, assert_equivalent, shared_model
from widen import widen

from redonnx.io.files import load_model
from redonnx.measure.cost import model_cost
from redonnx.passes import MergeChannels
from redonnx.pipeline import TARGETS, prune, run_passes


def exact_base(rel: str) -> onnx.ModelProto:
    return run_passes(load_model(shared_model(rel)).model, None, exact=True)[0]


def merged(model: onnx.ModelProto, **params):
    out, results = run_passes(model, [MergeChannels(**params), "cleanup"], exact=not params)
    return out, results[0]


def check_restored(base: onnx.ModelProto, wide: onnx.ModelProto, **kw) -> dict:
    assert_equivalent(base, wide, **kw)  # the widening really preserves the function
    assert model_cost(wide).params > model_cost(base).params
    res = prune(wide, passes=["merge-channels", "cleanup"], exact=True, target="macs", **kw)
    assert res.verification, res.verification.summary()
    assert res.after.params == model_cost(base).params
    assert res.after.macs == model_cost(base).macs
    assert_equivalent(base, res.model, **kw)
    return res.passes[0].counts


RESNET = "cifar10/resnet20_bn.onnx"


def test_resnet20_copy_inside_a_block() -> None:
    base = exact_base(RESNET)
    wide = widen(base, ["/layer3/layer3.1/conv1/Conv"], ["/layer3/layer3.1/conv2/Conv"], src=5)
    assert check_restored(base, wide) == {"identical channels merged": 1}


def test_resnet20_dead_filter_inside_a_block() -> None:
    base = exact_base(RESNET)
    wide = widen(base, ["/layer2/layer2.0/conv1/Conv"], ["/layer2/layer2.0/conv2/Conv"], src=0, dead=True)
    assert check_restored(base, wide) == {"zero channels removed": 1}


STAGE3 = [f"/layer3/layer3.{i}/conv2/Conv" for i in range(3)]
STREAM_READERS = ["/layer3/layer3.1/conv1/Conv", "/layer3/layer3.2/conv1/Conv", "/linear/Gemm"]


def test_resnet20_copy_on_the_residual_stream() -> None:
    """Channel 0 of stage 3 is zero padding on the option-A shortcut; its copy goes through three
    residual Adds, the shortcut Pad, two block convs, global pooling, Flatten and the classifier."""
    base = exact_base(RESNET)
    wide = widen(base, STAGE3, STREAM_READERS, src=0, pads=["/layer3/layer3.0/Pad"])
    assert check_restored(base, wide) == {"identical channels merged": 1}


def test_resnet20_dead_channel_on_the_residual_stream() -> None:
    base = exact_base(RESNET)
    wide = widen(base, STAGE3, STREAM_READERS, src=0, dead=True, pads=["/layer3/layer3.0/Pad"])
    assert check_restored(base, wide) == {"zero channels removed": 1}


MOBILE = "imagenet/mobilenetv2_features_bn.onnx"


def test_mobilenetv2_copy_through_depthwise() -> None:
    base = exact_base(MOBILE)
    wide = widen(base, ["features_2_conv_0_Conv"], ["features_2_conv_6_Conv"], src=7,
                 depthwise=["features_2_conv_3_Conv"])  # fmt: skip
    assert check_restored(base, wide, samples=2) == {"identical channels merged": 1}


def test_mobilenetv2_dead_filter_through_depthwise() -> None:
    base = exact_base(MOBILE)
    wide = widen(base, ["features_3_conv_0_Conv"], ["features_3_conv_6_Conv"], src=3, dead=True,
                 depthwise=["features_3_conv_3_Conv"])  # fmt: skip
    assert check_restored(base, wide, samples=2) == {"zero channels removed": 1}


def test_several_plantings_at_once() -> None:
    base = exact_base(RESNET)
    wide = widen(base, STAGE3, STREAM_READERS, src=0, pads=["/layer3/layer3.0/Pad"])
    wide = widen(wide, ["/layer1/layer1.0/conv1/Conv"], ["/layer1/layer1.0/conv2/Conv"], src=3)
    wide = widen(wide, ["/layer1/layer1.0/conv1/Conv"], ["/layer1/layer1.0/conv2/Conv"], src=9, dead=True)
    counts = check_restored(base, wide)
    assert counts == {"identical channels merged": 2, "zero channels removed": 1}


FIVE = ((3, False), (7, False), (3, False), (0, True), (5, True))  # (source channel, dead): 3 copies, 2 dead


def plant(model: onnx.ModelProto, where: list[tuple[list[str], list[str], list[str]]], sources=FIVE) -> onnx.ModelProto:
    """Five channels more (copies and dead filters) for each (producers, consumers, shortcut pads)."""
    for producers, consumers, pads in where:
        for src, dead in sources:
            model = widen(model, producers, consumers, src=src, dead=dead, pads=pads)
    return model


def conv_widths(model: onnx.ModelProto) -> list[int]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [shapes[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"]


def check_every_target(base: onnx.ModelProto, wide: onnx.ModelProto) -> None:
    """--exact under every target takes the widened model back to the base's channel counts and
    parameters (the same pipeline on the base: ort-cpu rewrites shortcuts as 1x1 convs)."""
    assert_equivalent(base, wide)
    assert conv_widths(wide) != conv_widths(base)
    for target in TARGETS:
        res = prune(wide, exact=True, target=target)
        ref = prune(base, exact=True, target=target)
        assert res.verification, res.verification.summary()
        assert conv_widths(res.model) == conv_widths(ref.model), target
        assert res.after.params == ref.after.params, target
        assert_equivalent(base, res.model)


def test_widened_digits_resnet_returns_to_its_counts_under_every_target() -> None:
    """16 -> 21 channels on the first stage's residual stream, 32 -> 37 inside a block and on the
    last stage's stream: the counts start off the block, and merging the planted channels brings
    them back onto it (removing 5 of 21 is not a multiple of 8, yet 16 remain). A dead filter is
    planted where no later planting writes columns into its layer: a row that reads a dead input
    channel with non-zero weights is dead only once that channel has gone (a second pass)."""
    base = run_passes(onnx.load(MODELS / "digits_resnet.onnx"), None, exact=True)[0]
    stream1 = ["/0/Conv", "/3/body/body.3/Conv", "/4/body/body.3/Conv"]
    readers1 = ["/3/body/body.0/Conv", "/4/body/body.0/Conv", "/5/body/body.0/Conv", "/5/shortcut/shortcut.0/Conv"]
    wide = plant(base, [(stream1, readers1, []), (["/5/body/body.0/Conv"], ["/5/body/body.3/Conv"], []),
                        (["/5/body/body.3/Conv", "/5/shortcut/shortcut.0/Conv"], ["/8/Gemm"], [])])  # fmt: skip
    check_every_target(base, wide)


def test_widened_resnet20_returns_to_its_counts_under_every_target() -> None:
    """16 -> 21 and 32 -> 37 inside blocks, 64 -> 69 on the residual stream (copies of and next to
    the option-A shortcut's zero channels)."""
    base = exact_base(RESNET)
    stream = ([f"/layer3/layer3.{i}/conv2/Conv" for i in range(3)], STREAM_READERS, ["/layer3/layer3.0/Pad"])
    wide = plant(base, [(["/layer1/layer1.0/conv1/Conv"], ["/layer1/layer1.0/conv2/Conv"], []),
                        (["/layer2/layer2.1/conv1/Conv"], ["/layer2/layer2.1/conv2/Conv"], [])])  # fmt: skip
    wide = plant(wide, [stream], sources=((0, False), (5, False), (60, False), (1, True), (50, True)))
    check_every_target(base, wide)


# ---------------------------------------------------------------- synthetic graphs


def conv_rows(b: Builder, cin: int, rows: np.ndarray, bias: np.ndarray, x: str, pad: int = 1) -> str:
    return b.op("Conv", [x, b.const(rows.astype(np.float32)), b.const(bias.astype(np.float32))],
                pads=[pad] * 4, kernel_shape=[rows.shape[2]] * 2)  # fmt: skip


def dup_rows(rng, cout: int, cin: int, k: int = 3, dups=((1, 0),), scale=None):
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    for dst, src in dups:
        s = 1.0 if scale is None else scale
        w[dst], b[dst] = w[src] * s, b[src] * s
    return w, b


def test_identical_rows_through_relu_and_concat() -> None:
    b = Builder()
    rng = np.random.default_rng(0)
    w1, b1 = dup_rows(rng, 4, 3, dups=((3, 1),))
    w2, b2 = dup_rows(rng, 3, 3, dups=((2, 0),))
    y1 = b.op("Relu", [conv_rows(b, 3, w1, b1, "x")])
    y2 = b.op("Relu", [conv_rows(b, 3, w2, b2, "x")])
    cat = b.op("Concat", [y1, y2], axis=1)
    m = b.model([("x", [2, 3, 6, 6])], [b.conv(cat, 7, 5)])
    out, res = merged(m)
    assert res.counts == {"identical channels merged": 2}
    assert model_cost(out).params == model_cost(m).params - 2 * (27 + 1) - 2 * 5 * 9
    assert_equivalent(m, out)


def test_positive_multiples_merge_through_relu_not_through_sigmoid() -> None:
    b = Builder()
    rng = np.random.default_rng(1)
    w, bias = dup_rows(rng, 4, 3, dups=((2, 0),), scale=2.5)
    relu = b.op("Relu", [conv_rows(b, 3, w, bias, "x")])
    sig = b.op("Sigmoid", [conv_rows(b, 3, w, bias, "x")])
    m = b.model([("x", [1, 3, 5, 5])], [b.conv(relu, 4, 2), b.conv(sig, 4, 2)])
    out, res = merged(m)
    assert res.counts == {"scaled channels merged": 1}
    assert_equivalent(m, out)


def test_split_and_se_gate_and_flatten_gemm() -> None:
    b = Builder()
    rng = np.random.default_rng(2)
    w, bias = dup_rows(rng, 6, 3, dups=((4, 1),))
    y = b.op("Relu", [conv_rows(b, 3, w, bias, "x")])
    gate = b.op("Sigmoid", [b.conv(b.op("GlobalAveragePool", [y]), 6, 6, k=1, pad=0)])
    y = b.op("Mul", [y, gate])  # squeeze-and-excitation
    s1, s2 = b.op("Split", [y, b.const(np.array([3, 3], np.int64))], n_out=2, axis=1)
    flat = b.op("Flatten", [b.op("MaxPool", [s2], kernel_shape=[5, 5])])
    m = b.model([("x", [2, 3, 5, 5])], [b.conv(s1, 3, 2), b.op("Gemm", [flat, b.rand(3, 4)])])
    out, res = merged(m)
    # channel 4 copies channel 1, but the gate's 1x1 conv reads them with different columns, so
    # their gates differ: nothing may merge. The analysis must see that through Mul.
    assert not res.counts
    assert_equivalent(m, out)


def test_flatten_gemm_columns_follow_channel_major_order() -> None:
    b = Builder()
    rng = np.random.default_rng(3)
    w, bias = dup_rows(rng, 5, 2, dups=((4, 0),))
    y = b.op("Relu", [conv_rows(b, 2, w, bias, "x")])
    flat = b.op("Flatten", [y])
    m = b.model([("x", [3, 2, 4, 4])], [b.op("Gemm", [flat, b.rand(5 * 16, 6), b.rand(6)])])
    out, res = merged(m)
    assert res.counts == {"identical channels merged": 1}
    assert model_cost(out).params == model_cost(m).params - 19 - 16 * 6
    assert_equivalent(m, out)


def test_pinned_channels_left_alone_with_reasons() -> None:
    b = Builder()
    rng = np.random.default_rng(4)
    w, bias = dup_rows(rng, 4, 3, dups=((1, 0),))
    y = conv_rows(b, 3, w, bias, "x")
    g = b.op("Conv", [y, b.rand(4, 2, 3, 3)], group=2, pads=[1] * 4)  # grouped conv reads it
    m = b.model([("x", [1, 3, 5, 5])], [g, b.op("Relu", [y])])
    out, res = merged(m)
    assert not res.counts
    reasons = " ".join(d.reason for d in res.declined)
    assert "grouped Conv" in reasons and "graph input" in reasons
    assert_equivalent(m, out)


def test_unknown_op_ends_the_group() -> None:
    b = Builder()
    rng = np.random.default_rng(5)
    w, bias = dup_rows(rng, 4, 3, dups=((1, 0),))
    y = b.op("Softmax", [conv_rows(b, 3, w, bias, "x")], axis=1)  # mixes channels
    m = b.model([("x", [1, 3, 5, 5])], [b.conv(y, 4, 2)])
    out, res = merged(m)
    assert not res.counts and any("Softmax" in d.reason for d in res.declined)
    assert_equivalent(m, out)


def test_constant_channel_absorbed_only_where_exact() -> None:
    b = Builder()
    rng = np.random.default_rng(6)
    w, bias = dup_rows(rng, 4, 3, dups=())
    w[2] = 0
    bias[2] = 0.7  # a constant channel 0.7 after ReLU
    y = b.op("Relu", [conv_rows(b, 3, w, bias, "x")])
    m_ok = b.model([("x", [1, 3, 6, 6])], [b.conv(y, 4, 3, k=3, pad=0)])
    out, res = merged(m_ok)
    assert res.counts == {"constant channels removed": 1}
    assert_equivalent(m_ok, out)
    b2 = Builder()
    y = b2.op("Relu", [conv_rows(b2, 3, w, bias, "x")])
    m_pad = b2.model([("x", [1, 3, 6, 6])], [b2.conv(y, 4, 3, k=3, pad=1)])
    out, res = merged(m_pad)
    assert not res.counts  # zero padding would see 0, not 0.7, at the borders
    assert_equivalent(m_pad, out)


def one_by_one(cg, members: list[tuple[str, int]]) -> tuple:
    """A class's summary from its own source vectors (what :func:`classes._summaries` makes for many)."""
    from redonnx.redundancy import classes as C

    scaled, fixed = C._source_vectors(cg, members)
    norm = float(np.linalg.norm(scaled))
    direction = C._digest(np.round(scaled / norm, 6), fixed) if norm > 0 else None
    has_rows = any(it.kind == "row" for t, _ in members for it in cg.items.get(t, []))
    constants = C._constants(cg, members) if has_rows else {}
    return C._digest(scaled, fixed), direction, norm, scaled.size, bool(np.any(scaled)), constants


@pytest.mark.parametrize(
    "rel,passes",
    [
        ("imagenet/mobilenetv2_features_bn.onnx", ["fold-constants"]),
        ("paddle/ppocr_mobile_v2_cls.onnx", ["fold-constants", "fold-batchnorm"]),
    ],
)
def test_classes_summarized_together_as_one_by_one(rel: str, passes: list[str], monkeypatch) -> None:
    """Classes over the same tensors are summarized from one matrix per layer: the same hashes,
    norms, sizes and constants as each class alone (BatchNorm, depthwise and Add parameters here),
    in chunks where the matrix would be large, and the per-channel parameter checks the same as
    channel by channel."""
    from redonnx.channels.coupling import analyze
    from redonnx.inputs.shapes import annotate_graph
    from redonnx.io.graph import to_graph
    from redonnx.redundancy import classes as C

    graph = to_graph(run_passes(load_model(shared_model(rel)).model, passes, False)[0])
    annotate_graph(graph)
    cg = analyze(graph)
    pinned = cg.pinned_roots()
    classes = [m for r, m in cg.classes().items() if r not in pinned and len({t for t, _ in m}) == len(m)]
    together = C._summaries(cg, classes, C._Rows())
    for members in classes:
        assert together[tuple(sorted(members))] == one_by_one(cg, members)
    monkeypatch.setattr(C, "SUMMARY_BYTES", 20_000)  # a few classes per chunk
    assert C._summaries(cg, classes, C._Rows()) == together
    params = [(it, t) for t, items in cg.items.items() for it in items if it.kind == "param"]
    assert params
    for it, t in params:
        whole = C._keeps_zero(it, cg.spaces[t].size)
        for c in range(cg.spaces[t].size):
            assert whole[c] == C._param_keeps_zero(it, cg, t, c)


def test_constant_channel_summarized_with_its_group() -> None:
    """A zero-weight row among others of its layer: the summary made with the group finds its constant."""
    from redonnx.channels.coupling import analyze
    from redonnx.inputs.shapes import annotate_graph
    from redonnx.io.graph import to_graph
    from redonnx.redundancy import classes as C

    b = Builder()
    w, bias = dup_rows(np.random.default_rng(6), 4, 3, dups=())
    w[2], bias[2] = 0, 0.7
    m = b.model([("x", [1, 3, 6, 6])], [b.conv(b.op("Relu", [conv_rows(b, 3, w, bias, "x")]), 4, 3, k=3, pad=0)])
    graph = to_graph(m)
    annotate_graph(graph)
    cg = analyze(graph)
    classes = list(cg.classes().values())
    together = C._summaries(cg, classes, C._Rows())
    consts = [v[5] for v in together.values() if v[5]]
    assert len(consts) == 1 and sorted(consts[0].values()) == pytest.approx([0.7, 0.7])
    for members in classes:
        assert together[tuple(sorted(members))] == one_by_one(cg, members)


def test_relaxed_merging_is_lossy_and_bounded() -> None:
    src = load_model(shared_model(RESNET)).model
    res = prune(src, passes=["fold-batchnorm", MergeChannels(alpha=0.1), "cleanup"], target="macs")
    assert res.after.params < res.before.params * 0.95
    assert res.verification is not None and res.verification.min_cosine == 0.99
    with pytest.raises(Exception, match="lossy"):
        run_passes(src, [MergeChannels(alpha=0.1)], exact=True)


def test_relaxed_merging_of_a_bias_free_matmul_chain() -> None:
    """Compensation gives a MatMul a new bias Add; when that layer's own outputs are cut in the same
    pass, the bias must be cut with them (it once kept its full length: onnxruntime refused it)."""
    b = Builder(3)
    x = "x"
    for i in range(4):
        x = b.op("MatMul", [x, b.const((b.rng.standard_normal((64, 64)) / 8).astype(np.float32))])
        if i < 3:
            x = b.op("Relu", [x])
    model = b.model([("x", ["N", 64])], [x])
    res = prune(model, passes=[MergeChannels(alpha=0.3)], target="macs")
    assert res.verification is not None and res.after.params < res.before.params
    adds = [n for n in res.model.graph.node if n.op_type == "Add"]
    assert adds, "compensation should have added biases"
    assert_equivalent(model, res.model, rtol=0.5, min_cosine=0.9)


def test_multiples_of_one_channel_fold_into_one() -> None:
    """a = 2 b and b = 3 c (through Relu): two channels go, their columns scaled into the kept one."""
    b = Builder(4)
    w = b.rng.standard_normal((8, 6)).astype(np.float32)
    w[:, 1] = 3 * w[:, 2]
    w[:, 0] = 2 * w[:, 1]
    h = b.op("Relu", [b.op("MatMul", ["x", b.const(w)])])
    y = b.op("MatMul", [h, b.rand(6, 5)])
    model = b.model([("x", ["N", 8])], [y])
    res = prune(model, passes=["merge-channels"], exact=True, target="macs")
    assert res.after.params == res.before.params - 2 * 8 - 2 * 5
    assert_equivalent(model, res.model)
