"""Reports: the per-layer table pairs each layer before and after by what it is, not by its output's
name (unnamed exports), and the budget table shows only what the trials counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, assert_equivalent
from onnx import TensorProto, helper, numpy_helper

from redonnx.pipeline import prune
from redonnx.report.tables import layer_table, write_html


def unnamed_chain(duplicate: bool = False) -> onnx.ModelProto:
    """Conv-BatchNorm-Relu x2 then a 1x1 Conv, as PyTorch 1.2 exported them: no node names, every
    tensor a number. ``duplicate``: the first conv's filter 7 (and its BatchNorm) copies filter 3."""
    rng = np.random.default_rng(0)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    count = iter(range(1, 1000))

    def const(values: np.ndarray) -> str:
        name = str(next(count))
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv(x: str, cin: int, cout: int, k: int, copy: bool) -> str:
        w, b = rng.standard_normal((cout, cin, k, k)), rng.standard_normal(cout)
        bn = [rng.random(cout) + 0.5, rng.standard_normal(cout), rng.standard_normal(cout), rng.random(cout) + 0.2]
        if copy:
            w[7], b[7] = w[3], b[3]
            for p in bn:
                p[7] = p[3]
        ins = [x, const(w), const(b)]
        y = str(next(count))
        nodes.append(helper.make_node("Conv", ins, [y], kernel_shape=[k, k], pads=[k // 2] * 4))
        z = str(next(count))
        nodes.append(helper.make_node("BatchNormalization", [y, *(const(p) for p in bn)], [z], epsilon=1e-5))
        r = str(next(count))
        nodes.append(helper.make_node("Relu", [z], [r]))
        return r

    h = conv("0", 3, 8, 3, duplicate)
    h = conv(h, 8, 8, 3, False)
    out = str(next(count))
    nodes.append(helper.make_node("Conv", [h, const(rng.standard_normal((4, 8, 1, 1))), const(np.zeros(4))], [out],
                                  kernel_shape=[1, 1]))  # fmt: skip
    x = helper.make_tensor_value_info("0", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "torch-jit-export", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], producer_name="pytorch")
    model.ir_version = 4
    assert not any(n.name for n in model.graph.node)
    return model


def test_folding_batchnorm_keeps_unnamed_layers_paired(tmp_path: Path) -> None:
    """The fold hands each conv its BatchNorm's output tensor ("4" -> "9"): every conv must still
    show 0 % removed, with its parameters and MACs, in the JSON and HTML tables."""
    model = unnamed_chain()
    res = prune(model, passes=["fold-batchnorm"], target="macs")
    assert res.passes[0].counts == {"BatchNormalization folded": 2}
    rows = layer_table(res.report())
    assert [r["op"] for r in rows] == ["Conv"] * 3
    for r in rows:
        assert r["removed_pct"] == 0.0 and r["params_after"] == r["params_before"] > 0, r
        assert r["macs_after"] == r["macs_before"] > 0, r
    assert res.report()["layers"] == rows
    table = write_html(res.report(), tmp_path / "r.html").read_text().split("<h2>Layers</h2>")[1]
    assert table.count("<td>0.0 %</td>") == 3 and "100.0 %" not in table


def test_merged_channels_of_unnamed_layers_are_counted_where_they_go() -> None:
    """A copied filter merges away after the fold: the first conv loses one filter (27 weights and
    a bias), the second one input column (8 x 9 weights), the last nothing."""
    model = unnamed_chain(duplicate=True)
    res = prune(model, exact=True, target="macs")
    assert_equivalent(model, res.model)
    first, second, last = layer_table(res.report())
    assert first["params_before"] - first["params_after"] == 3 * 9 + 1
    assert second["params_before"] - second["params_after"] == 8 * 9
    assert last["params_after"] == last["params_before"] and last["removed_pct"] == 0.0


def test_budget_table_shows_macs_only_where_the_trials_counted_them(tmp_path: Path) -> None:
    """The fidelity search does not count each trial's MACs: no column of dashes; --target-macs does."""
    resnet = MODELS / "digits_resnet.onnx"
    budget = prune(resnet, target="macs", samples=4)
    assert budget.search is not None and all(t.macs_removed_pct is None for t in budget.search.trials)
    text = write_html(budget.report(), tmp_path / "budget.html").read_text()
    assert "<th>MACs removed</th>" not in text.split("<h2>Budget")[1].split("</table>")[0]
    macs = prune(resnet, target="macs", target_macs=20, samples=4)
    assert macs.search is not None and all(t.macs_removed_pct is not None for t in macs.search.trials)
    table = write_html(macs.report(), tmp_path / "macs.html").read_text().split("<h2>Budget")[1].split("</table>")[0]
    assert "<th>MACs removed</th>" in table and "<td>-</td>" not in table


@pytest.mark.parametrize("name", ["conv", ""])
def test_separated_layers_are_summed_into_their_origin(name: str) -> None:
    """separate-depthwise names its parts after the layer (or, unnamed, after its weight)."""
    model = unnamed_chain()
    for n in model.graph.node:
        n.name = f"{name}{n.output[0]}" if name else ""
    rank1 = numpy_helper.to_array(model.graph.initializer[0])  # a rank-1 first conv: it separates
    u, v = np.ones((8, 1)), rank1.reshape(8, 3, -1)[:1].reshape(3, -1)
    w = (u[:, :, None] * v[None]).reshape(rank1.shape).astype(np.float32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    res = prune(model, passes=["fold-batchnorm", "separate-depthwise"], target="macs")
    assert res.passes[1].counts, res.passes[1].declined
    first = layer_table(res.report())[0]
    assert 0 < first["params_after"] < first["params_before"]


def test_deflated_sizes_are_those_of_the_models_as_given_and_written(tmp_path: Path) -> None:
    """The report's deflated sizes start on a background thread while pruning runs: they must be
    the input's as given (before any pass ran) and the written model's."""
    from redonnx.io import weights
    from redonnx.io.files import load_model

    src = load_model(MODELS / "digits_resnet.onnx")
    given = weights.deflated_size(src.model)
    result = prune(src, passes=["fold-batchnorm", "hash-weights"])
    report = result.report()
    assert result.deflating, "no deflate was started early"
    assert report["before"]["deflated_bytes"] == given
    assert report["after"]["deflated_bytes"] == weights.deflated_size(result.model)
    assert report["after"]["deflated_bytes"] < given
