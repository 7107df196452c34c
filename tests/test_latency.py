"""The latency cost model, the channel counts the planner may choose, and the final speed gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import Builder
from conftest import MODELS
from onnx import helper, numpy_helper

from redonnx.measure import latency
from redonnx.measure.latency import Cache, CostModel, LayerShape, compare
from redonnx.passes import MergeChannels, PassContext
from redonnx.pipeline import prune, run_passes
from redonnx.planner import speed


def fake_timer(block: int):
    """Latency proportional to the work, a count that is not a multiple of ``block`` twice as slow."""

    def ms(shape: LayerShape) -> float:
        k = int(np.prod(shape.kernel or (1,)))
        work = shape.cin * shape.cout * k / max(shape.group, 1) * int(np.prod(shape.spatial or (1,))) * 1e-6
        slow = shape.cin % block or shape.cout % block
        return work * (2.0 if slow else 1.0) + 0.001

    return ms


def conv_net(width: int = 32) -> onnx.ModelProto:
    b = Builder(7)
    h = b.op("Relu", [b.conv("x", 3, width)])
    h = b.op("Relu", [b.conv(h, width, width)])
    return b.model([("x", ["N", 3, 16, 16])], [b.conv(h, width, 4, k=1, pad=0)])


def conv_counts(model: onnx.ModelProto) -> list[tuple[int, int]]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [shapes[n.input[1]][:2] for n in model.graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("block,width", [(8, 32), (16, 32), (8, 36)])
def test_block_is_measured_and_the_planner_keeps_to_it(block: int, width: int) -> None:
    """The planner never picks a count the cost model marks slow: the channels that remain are
    whole blocks (36 channels go to 32 first, not to 28)."""
    cm = CostModel(Cache("off"), timer=fake_timer(block))
    assert cm.block() == block
    model = conv_net(width)
    for budget in (0.01, 0.1, 1.0, 10.0):
        out, _ = run_passes(
            model, [MergeChannels(error_budget=budget)], False, PassContext(target="ort-cpu", cost_model=cm)
        )
        for cout, _ in conv_counts(out)[:2]:
            assert cout % block == 0 or cout == width, (budget, conv_counts(out))
    assert any(c[0] < width for c in conv_counts(out)[:2])  # the largest budget did remove channels


def one_duplicate(width: int) -> onnx.ModelProto:
    """8 input channels -> ``width`` (the last a copy of channel 3) -> 8: one channel merges exactly."""
    b = Builder(2)
    w = np.random.default_rng(0).standard_normal((width, 8, 3, 3)).astype(np.float32)
    w[width - 1] = w[3]
    h = b.op("Relu", [b.op("Conv", ["x", b.const(w)], pads=[1] * 4, kernel_shape=[3, 3])])
    return b.model([("x", ["N", 8, 8, 8])], [b.conv(h, width, 8, k=1, pad=0)])


def exact_width(model: onnx.ModelProto, timer) -> tuple[int, int]:
    """Width of the first conv after --exact merge-channels under ort-cpu (timed by ``timer``) and under macs."""
    cm = CostModel(Cache("off"), timer=timer)
    fast, _ = run_passes(model, ["merge-channels"], True, PassContext(target="ort-cpu", cost_model=cm))
    small, (res,) = run_passes(model, ["merge-channels"], True, PassContext(target="macs"))
    assert res.counts == {"identical channels merged": 1}
    return conv_counts(fast)[0][0], conv_counts(small)[0][0]


def test_exact_merge_that_leaves_the_block_is_undone_when_measured_slower() -> None:
    """8 -> 7 channels leaves the block of 8 and the cost model times 7 slower: the copy stays."""
    assert exact_width(one_duplicate(8), fake_timer(8)) == (8, 7)


def test_exact_merge_back_onto_the_block_always_goes() -> None:
    """9 -> 8: the channels that remain are a whole block, though the one removed is not."""
    assert exact_width(one_duplicate(9), fake_timer(8)) == (8, 8)


def test_exact_merge_that_leaves_the_block_goes_when_measured_faster() -> None:
    """A runtime whose block of 8 only slows wide layers: 8 -> 7 is timed faster, so it goes."""
    slow_when_wide = fake_timer(8)

    def ms(shape: LayerShape) -> float:
        return slow_when_wide(shape) if max(shape.cin, shape.cout) > 16 else fake_timer(1)(shape)

    assert CostModel(Cache("off"), timer=ms).block() == 8
    assert exact_width(one_duplicate(8), ms) == (7, 7)


def test_cost_model_caches_on_disk(tmp_path) -> None:
    calls = []

    def timer(shape: LayerShape) -> float:
        calls.append(shape)
        return 0.5

    shape = LayerShape("Conv", 16, 16, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8), "Relu")
    first = CostModel(Cache(tmp_path), timer=timer)
    assert first.ms(shape) == 0.5 and first.ms(shape) == 0.5 and len(calls) == 1
    first.save()
    again = CostModel(Cache(tmp_path), timer=timer)
    assert again.ms(shape) == 0.5 and len(calls) == 1  # read back, not timed again
    assert list(tmp_path.glob("latency-*.json"))


def test_a_saving_is_timed_as_one_comparison_and_cached(tmp_path) -> None:
    """With a pair timer, a layer and its smaller form are timed together (one call, both models)
    and the saving is read back from disk; without one, each alone."""
    pairs = []

    def pair_timer(a, b) -> tuple[float, float, float]:
        pairs.append((a, b))
        return 2.0, 1.5, 0.4  # the paired difference, not 2.0 - 1.5

    shape = LayerShape("Conv", 16, 16, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8), "Relu")
    smaller = shape.with_channels(cout=12)
    first = CostModel(Cache(tmp_path), timer=lambda s: s.cout / 8, pair_timer=pair_timer)
    assert first.saved(shape, smaller) == 0.4 and first.saved(shape, smaller) == 0.4 and len(pairs) == 1
    (a, _), (b, _) = pairs[0]
    assert [numpy_helper.to_array(t).shape[0] for m in (a, b) for t in m.graph.initializer if t.name == "w"] == [16, 12]
    first.save()
    assert CostModel(Cache(tmp_path), pair_timer=pair_timer).saved(shape, smaller) == 0.4 and len(pairs) == 1
    assert CostModel(Cache("off"), timer=lambda s: s.cout / 8).saved(shape, smaller) == 0.5  # each alone


def test_time_pair_measures_what_the_smaller_layer_saves() -> None:
    """A 256 -> 1024 MatMul against its half: both timed in one comparison, the half saves time."""
    full = LayerShape("MatMul", 256, 1024, spatial=(1, 16))
    a, b, diff = latency.time_pair(latency.layer_model(full), latency.layer_model(full.with_channels(cout=512)))
    assert 0 < b < a and 0 < diff < a


def test_identical_models_compare_as_equal() -> None:
    model = onnx.load(MODELS / "digits_resnet.onnx")
    feeds = {"input": np.zeros((1, 1, 8, 8), np.float32)}
    t = compare([model, model], feeds, max_seconds=3).against(1, 0)
    assert 0.9 < t.ratio < 1.1 and t.ratio_low <= t.ratio <= t.ratio_high


def redundant_mlp() -> onnx.ModelProto:
    """256 -> 1024 -> 64 whose hidden units are 8 noisy copies of 128: half of them go almost free."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((256, 128)).astype(np.float32) * 0.1
    w1 = np.concatenate([base + 0.001 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(8)], 1)
    b = Builder(4)
    h = b.op("Relu", [b.op("MatMul", ["x", b.const(w1)])])
    return b.model([("x", ["N", 256])], [b.op("MatMul", [h, b.rand(1024, 64, scale=0.05)])])


def slow_down(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same outputs after a large useless MatMul on the input (multiplied by zero): a slow form."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    name = g.output[0].name
    big = numpy_helper.from_array(np.ones((512, 512), np.float32), "slow_w")
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "slow_zero")
    g.initializer.extend([big, zero])
    for n in g.node:
        n.output[:] = [f"{name}_fast" if o == name else o for o in n.output]
    g.node.extend([helper.make_node("ReduceSum", [g.input[0].name], ["slow_x"], keepdims=0),  # not foldable
                   helper.make_node("Mul", ["slow_w", "slow_x"], ["slow_a"]),
                   helper.make_node("MatMul", ["slow_a", "slow_w"], ["slow_b"]),
                   helper.make_node("ReduceSum", ["slow_b"], ["slow_s"], keepdims=0),
                   helper.make_node("Mul", ["slow_s", "slow_zero"], ["slow_z"]),
                   helper.make_node("Add", [f"{name}_fast", "slow_z"], [name])])  # fmt: skip
    return out


def test_timing_stops_once_the_decision_it_serves_is_made() -> None:
    """The decision accepts when every ratio is under its threshold: a model 4x the work is
    rejected after the first 30 rounds, whatever its other ratio (one that never settles);
    accepted ones settle too; without a decision, rounds go on until the ratio is within the
    precision (or the time runs out)."""
    small, large = conv_net(8), conv_net(64)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    unsettled = (1, 1, 1.0)  # a model against itself: always 1, never on one side of 1
    rejected = compare([small, large], feeds, precision=1e-9, max_seconds=5, decide=((1, 0, 0.97), unsettled))
    assert rejected.rounds == 30 and rejected.against(1, 0).ratio_low > 0.97
    accepted = compare([large, small], feeds, precision=1e-9, max_seconds=5, decide=((1, 0, 0.97),))
    assert accepted.rounds == 30 and accepted.against(1, 0).ratio_high < 0.97
    undecided = compare([small, large], feeds, precision=1e-9, max_seconds=1)
    assert undecided.rounds > 30


def test_a_decision_on_slow_models_is_first_looked_at_sooner(monkeypatch) -> None:
    """Where 30 rounds would take over FIRST_LOOK_SECONDS (here made tiny, so these small models
    count as slow), a decision is first looked at after FIRST_LOOK_ROUNDS rounds: settled there, it
    stops; a comparison that serves no decision, or an unsettled one, goes on as before."""
    small, large = conv_net(8), conv_net(64)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    assert latency._first_look(30, 0.001) == 30 and latency._first_look(30, 1.0) == latency.FIRST_LOOK_ROUNDS
    assert latency._first_look(30, 0.1) == 20  # 2 s of 0.1 s rounds
    monkeypatch.setattr(latency, "FIRST_LOOK_SECONDS", 1e-6)
    rejected = compare([small, large], feeds, precision=1e-9, max_seconds=5, decide=((1, 0, 0.97),))
    assert rejected.rounds == latency.FIRST_LOOK_ROUNDS < 30 and rejected.against(1, 0).ratio_low > 0.97
    unsettled = compare([small, small], feeds, precision=1e-9, max_seconds=5, decide=((1, 1, 1.0),))
    assert unsettled.rounds > latency.FIRST_LOOK_ROUNDS
    plain = compare([small, large], feeds, precision=1e-9, max_seconds=1)
    assert plain.rounds > 30


def test_gate_falls_back_when_the_lossy_result_is_slower(monkeypatch, tmp_path) -> None:
    """Every lossy candidate made slow: the lossless result is written, and the report says why."""
    monkeypatch.setenv("REDONNX_CACHE", str(tmp_path))
    real = speed.gate

    def slow_candidates(source, exact, candidates, feeds, cache, target):
        candidates = list(candidates)  # the planner builds them as the gate draws them
        for c in candidates:
            c.model = slow_down(c.model)
        return real(source, exact, candidates, feeds, cache, target)

    monkeypatch.setattr(speed, "gate", slow_candidates)
    model = redundant_mlp()
    lossless = prune(model, exact=True)
    res = prune(model, precision="fp32")  # the float gate alone (INT8 has its own, tests/test_quantize.py)
    assert res.speed is not None and res.speed.kept == "lossless result"
    assert res.speed.measured and not any(m["accepted"] for m in res.speed.measured)
    assert res.model.SerializeToString() == lossless.model.SerializeToString()
    assert "not faster than the lossless result" in res.summary()


def test_gate_keeps_a_faster_result(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("REDONNX_CACHE", str(tmp_path))
    res = prune(redundant_mlp())
    assert res.speed.kept.startswith("budget's choice") and res.speed.final_vs_input["ratio"] < 0.9
    assert res.after.macs < 0.8 * res.before.macs and res.verification


def test_gate_keeps_a_faster_result_whose_macs_cannot_be_counted(monkeypatch, tmp_path) -> None:
    """Where MACs cannot be counted (ddddocr's OCR net: a graph cost counting does not follow), the
    gate tries every candidate and the kept one still has its cost (it was never counted: a
    KeyError ended the run on a machine where the lossy result was faster)."""
    from redonnx import planner as P
    from redonnx.measure.cost import model_cost

    monkeypatch.setenv("REDONNX_CACHE", str(tmp_path))

    def uncounted(model, shapes=None):
        cost = model_cost(model, shapes)
        cost.macs = None
        return cost

    monkeypatch.setattr(P, "model_cost", uncounted)
    res = prune(redundant_mlp(), precision="fp32")
    assert res.speed.kept.startswith("budget's choice") and res.after.params < 0.8 * res.before.params


def test_layer_shape_of_graph_nodes() -> None:
    import onnx_graphsurgeon as gs

    from redonnx.inputs.shapes import annotate_graph

    g = gs.import_onnx(conv_net())
    g.inputs[0].shape = [1, 3, 16, 16]
    annotate_graph(g)
    shapes = [latency.layer_shape(n) for n in g.nodes if n.op == "Conv"]
    assert shapes[0] == LayerShape("Conv", 3, 32, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (16, 16), "Relu")
    assert shapes[1].with_channels(cout=24).cout == 24 and shapes[2].activation == ""


def test_dynamic_layers_are_timed_at_the_chosen_sizes() -> None:
    """A [batch, seq, 384] MatMul has no concrete shape in the graph: the cost model reads it from
    the chosen sizes (the transformer MLPs of issue 14 were costed at 0 ms before)."""
    import onnx_graphsurgeon as gs

    from redonnx.measure.cost import folded_graph

    x = gs.Variable("x", np.float32, ["batch", "seq", 16])
    w = gs.Constant("w", np.ones((16, 64), np.float32))
    y = gs.Variable("y", np.float32, ["batch", "seq", 64])
    g = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, w], outputs=[y])], inputs=[x], outputs=[y], opset=17)
    node = g.nodes[0]
    assert latency.layer_shape(node) is None
    model = gs.export_onnx(g)
    cm = CostModel(cache=latency.Cache("off"), timer=lambda s: 1.0,
                   shape_source=lambda: folded_graph(model, {"x": [1, 37, 16]})[1])  # fmt: skip
    assert cm.layer(node) == LayerShape("MatMul", 16, 64, spatial=(1, 37))
