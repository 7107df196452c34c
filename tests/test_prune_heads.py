"""prune-heads: attention heads of an exported BERT-style encoder (torch export, tests/fixtures)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from conftest import ROOT

from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.passes import PassContext
from redonnx.passes import prune_heads as H
from redonnx.pipeline import prune, run_passes
from redonnx.planner.stages import score_heads

FIXTURES = ROOT / "tests" / "fixtures"


def inputs() -> dict[str, np.ndarray]:
    data = np.load(FIXTURES / "bert_tiny_inputs.npz")
    return {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def attention_shapes(model: onnx.ModelProto) -> list[tuple[int, int]]:
    """(heads, Q width) of every attention block."""
    atts, _ = H.find(gs.import_onnx(run_passes(model, ["fold-constants"], True)[0]))
    return [(a.heads, a.q.w.shape[1]) for a in atts]


def test_both_attention_blocks_are_matched() -> None:
    model = load_model(FIXTURES / "bert_tiny.onnx").model
    assert attention_shapes(model) == [(4, 32), (4, 32)]


def test_exact_removes_the_planted_duplicate_head_and_dead_neurons() -> None:
    """Acceptance: --exact removes exactly the duplicated head and the 8 dead MLP neurons, outputs
    equal within 1e-4."""
    src = load_model(FIXTURES / "bert_tiny_planted.onnx").model
    res = prune(src, exact=True, target="macs", inputs=inputs())
    counts = {k: v for p in res.passes for k, v in p.counts.items()}
    assert counts["duplicate heads merged"] == 1 and counts.get("heads removed", 0) == 0
    assert counts["zero channels removed"] + counts.get("identical channels merged", 0) == 8
    assert attention_shapes(res.model) == [(3, 24), (4, 32)]
    ref = run(session(src), inputs())["embedding"]
    out = run(session(res.model), inputs())["embedding"]
    assert np.max(np.abs(ref - out)) <= 1e-4 * np.max(np.abs(ref)) and res.verification
    clean = prune(load_model(FIXTURES / "bert_tiny.onnx").model, exact=True, target="macs", inputs=inputs())
    assert not any(p.name == "prune-heads" and p.modified for p in clean.passes)


def test_a_head_with_zero_values_goes_exactly() -> None:
    """V columns zero: the head outputs its V bias whatever it attends to; that moves into bo."""
    model = load_model(FIXTURES / "bert_tiny.onnx").model
    folded, _ = run_passes(model, ["fold-constants", "fold-batchnorm"], True)
    g = gs.import_onnx(folded)
    att = H.find(g)[0][1]
    w = np.array(att.v.w, copy=True)
    w[:, att.cols(2)] = 0
    att.v.matmul.inputs[1].values = w
    zeroed = gs.export_onnx(g)
    out, (res,) = run_passes(zeroed, ["prune-heads"], True)
    assert res.counts == {"constant heads removed": 1}
    a = run(session(zeroed), inputs())["embedding"]
    b = run(session(out), inputs())["embedding"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_default_removes_heads_within_the_budget() -> None:
    """Random weights make heads cheap to lose: the head stage removes some, verified on the inputs."""
    res = prune(load_model(FIXTURES / "bert_tiny.onnx").model, target="macs", inputs=inputs())
    assert res.report()["budget"]["heads"]["removed"] >= 1 and res.verification
    assert sum(h for h, _ in attention_shapes(res.model)) < 8


def gated_mlp(form: str) -> onnx.ModelProto:
    """x -> MatMul (5 dead neurons) -> activation -> MatMul, the activation in an exporter's form."""
    from builders import Builder

    b = Builder(4)
    w1 = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    w1[:, :5] = 0
    h = b.op("MatMul", ["x", b.const(w1)])
    k = lambda v: b.const(np.array(v, np.float32))  # noqa: E731
    if form == "tanh-gelu":  # 0.5 h (1 + tanh(0.7979 (h + 0.044715 h^3)))
        inner = b.op("Mul", [b.op("Add", [h, b.op("Mul", [b.op("Pow", [h, k(3.0)]), k(0.044715)])]), k(0.79788456)])
        a = b.op("Mul", [b.op("Mul", [h, k(0.5)]), b.op("Add", [b.op("Tanh", [inner]), k(1.0)])])
    else:  # SiLU: h sigmoid(h)
        a = b.op("Mul", [h, b.op("Sigmoid", [h])])
    return b.model([("x", ["N", 16])], [b.op("MatMul", [a, b.rand(32, 4)])])


def test_dead_neurons_through_tanh_gelu_and_silu_go_exactly() -> None:
    for form in ("tanh-gelu", "silu"):
        res = prune(gated_mlp(form), exact=True, target="macs")
        merge = next(p for p in res.passes if p.name == "merge-channels")
        assert merge.counts == {"zero channels removed": 5}, form
        assert res.verification


def test_layernorm_pins_the_residual_stream_and_says_so() -> None:
    res = prune(load_model(FIXTURES / "bert_tiny.onnx").model, exact=True, target="macs", inputs=inputs())
    merge = next(p for p in res.passes if p.name == "merge-channels")
    assert any("normalized over its channels by LayerNormalization" in d.reason for d in merge.declined)


def test_a_head_predictable_from_the_others_goes_with_least_squares() -> None:
    """Head 2 planted as head 0 with its values scaled by -3: its context is -3 x head 0's, so its
    least-squares prediction from the kept heads is exact and the block's output does not move;
    removing head 1 (not predictable) the same way moves it."""
    model = load_model(FIXTURES / "bert_tiny.onnx").model
    folded, _ = run_passes(model, ["fold-constants", "fold-batchnorm"], True)
    g = gs.import_onnx(folded)
    att = H.find(g)[0][0]
    for p, scale in ((att.q, 1.0), (att.k, 1.0), (att.v, -3.0)):
        w = np.array(p.w, copy=True)
        w[:, att.cols(2)] = scale * w[:, att.cols(0)]
        p.matmul.inputs[1].values = w
        b = np.array(p.b, copy=True)
        b[att.cols(2)] = scale * b[att.cols(0)]
        p.bias.inputs[[isinstance(t, gs.Constant) for t in p.bias.inputs].index(True)].values = b
    block_out = att.out.bias.outputs[0].name
    planted = gs.export_onnx(g)
    planted.graph.output.append(onnx.helper.make_empty_tensor_value_info(block_out))
    shapes = {k: list(v.shape) for k, v in inputs().items()}  # statistics on 256 drawn sequences
    stats, _ = score_heads(planted, H.find(gs.import_onnx(planted))[0], PassContext(shapes=shapes))
    ref = run(session(planted), inputs())[block_out]

    def moved(head: int) -> float:
        out, (res,) = run_passes(planted, [H.PruneHeads(drop={att.key: [head]}, stats=stats)], False)
        assert res.counts == {"heads removed with least-squares compensation": 1}
        assert attention_shapes(out)[0] == (3, 24)
        return float(np.max(np.abs(run(session(out), inputs())[block_out] - ref)) / np.max(np.abs(ref)))

    assert moved(2) < 1e-3 < moved(1)


def test_duplicate_neurons_through_onnxruntime_fastgelu_with_bias_merge() -> None:
    """FastGelu(h, bias) (com.microsoft, as onnxruntime's transformer optimizer writes it): 6
    neurons duplicated in W1 and the bias merge exactly, the bias cut with them."""
    from builders import Builder

    b = Builder(4)
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    w1[:, 26:], bias[26:] = w1[:, :6], bias[:6]
    h = b.op("MatMul", ["x", b.const(w1)])
    b.nodes.append(onnx.helper.make_node("FastGelu", [h, b.const(bias)], ["act"], domain="com.microsoft"))
    m = b.model([("x", ["N", 16])], [b.op("MatMul", ["act", b.rand(32, 4)])])
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    res = prune(m, exact=True, target="macs", shapes={"x": [8, 16]})
    merge = next(p for p in res.passes if p.name == "merge-channels")
    assert merge.counts == {"identical channels merged": 6} and res.verification


def test_fused_attention_is_declined_with_its_reason() -> None:
    x = gs.Variable("x", np.float32, [1, 8, 32])
    y = gs.Variable("y", np.float32, [1, 8, 32])
    w = gs.Constant("w", np.zeros((32, 96), np.float32))
    node = gs.Node("Attention", inputs=[x, w], outputs=[y], attrs={"num_heads": 4}, domain="com.microsoft")
    found, declined = H.find(gs.Graph(nodes=[node], inputs=[x], outputs=[y]))
    assert not found and "fused Attention op" in declined[0][1]
