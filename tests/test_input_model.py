"""The input model: kinds and ranges inferred from the graph, and draws that stay valid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import Builder, tf2onnx_style
from conftest import ROOT, shared_model
from onnx import TensorProto, helper

from redonnx import reconstruct as R
from redonnx.cli import main
from redonnx.errors import RedonnxError
from redonnx.input_model import RAW_PIXELS, from_given, infer
from redonnx.io import load_model
from redonnx.pipeline import prune
from redonnx.runtime import run, session

FIXTURES = ROOT / "tests" / "fixtures"
BERT = FIXTURES / "bert_tiny.onnx"


def cifar_pixels_nhwc() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(shared_model("cifar10/cifar10_test_1017.npz"))
    return np.ascontiguousarray(data["x"].astype(np.float32).transpose(0, 2, 3, 1)), data["y"].astype(np.int64)


@pytest.mark.parametrize("fold", [True, False], ids=["normalization-in-weights", "normalization-nodes"])
def test_tf2onnx_style_raw_pixels_detected_through_transpose(fold: bool) -> None:
    """NHWC raw pixels, a Transpose before the first conv, its weight made by a Transpose node:
    the old first-conv rule saw no initializer weight and guessed N(0, 1) inputs."""
    model = tf2onnx_style(load_model(shared_model("cifar10/resnet20_bn.onnx")).model, fold_normalization=fold)
    spec = infer(model).specs["input"]
    assert spec.kind == "image" and spec.convention == RAW_PIXELS.name and spec.channel_axis == 3
    x = infer(model).draw(model, None, batch=4, seed=0)["input"]
    assert x.shape == (4, 32, 32, 3) and x.min() >= 0 and x.max() <= 255 and x.std() > 30


def test_tf2onnx_style_default_prune_keeps_top1() -> None:
    """Acceptance: the input range is detected and the default prune keeps top-1 within 0.5 points."""
    model = tf2onnx_style(load_model(shared_model("cifar10/resnet20_bn.onnx")).model)
    res = prune(model)
    assert res.verification and "raw pixels" in res.summary()
    x, y = cifar_pixels_nhwc()
    before = np.mean(run(session(model), {"input": x})["logits"].argmax(1) == y)
    after = np.mean(run(session(res.model), {"input": x})["logits"].argmax(1) == y)
    assert before - after <= 0.005, (before, after)


def test_batchnorm_statistics_choose_the_scale() -> None:
    """With BatchNorm kept, its running statistics decide: ResNet-20 takes normalized inputs; the
    same network behind a (x / 255 - mean) / std front takes raw pixels; PP-OCR takes -1..1."""
    src = load_model(shared_model("cifar10/resnet20_bn.onnx")).model
    spec = infer(src).specs["input"]
    assert spec.convention.startswith("normalized") and "BatchNorm" in spec.evidence
    b = Builder()
    scaled = b.op("Mul", ["pixels", b.const(np.full((1, 3, 1, 1), 1 / (255 * 0.226), np.float32))])
    front = b.op("Add", [scaled, b.const(np.full((1, 3, 1, 1), -0.45 / 0.226, np.float32))])
    raw = onnx.ModelProto()
    raw.CopyFrom(src)
    for n in raw.graph.node:
        n.input[:] = [front if x == "input" else x for x in n.input]
    rest = list(raw.graph.node)
    del raw.graph.node[:]
    raw.graph.node.extend(b.nodes + rest)
    raw.graph.initializer.extend(b.inits)
    raw.graph.input[0].name = "pixels"
    assert infer(raw).specs["pixels"].convention == RAW_PIXELS.name
    ocr = load_model(shared_model("paddle/ppocr_mobile_v2_cls.onnx")).model
    assert infer(ocr, {"x": [1, 3, 48, 192]}).specs["x"].convention == "pixels -1..1"


def test_token_inputs_inferred_and_drawn_valid() -> None:
    model = load_model(BERT).model
    im = infer(model, {"input_ids": [1, 16], "attention_mask": [1, 16], "token_type_ids": [1, 16]})
    ids, mask, types = (im.specs[n] for n in ("input_ids", "attention_mask", "token_type_ids"))
    assert (ids.kind, ids.high) == ("token ids", 120) and (types.kind, types.high) == ("type ids", 2)
    assert mask.kind == "mask"
    feeds = im.draw(model, {"input_ids": [1, 16], "attention_mask": [1, 16], "token_type_ids": [1, 16]}, 8, 0)
    assert feeds["input_ids"].max() < 120 and feeds["token_type_ids"].max() < 2
    assert set(np.unique(feeds["attention_mask"])) <= {0, 1} and feeds["attention_mask"][:, :8].all()
    run(session(model), feeds)  # valid for onnxruntime


def test_bert_prunes_with_no_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Acceptance: token inputs prune with no flags (ids inside the tables, a sequence size chosen)."""
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["prune", str(BERT), "-o", str(out), "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "token ids in [0, 120)" in text and "seq=16" in text and "--inputs real.npz" in text
    r = json.loads(rep.read_text())
    assert r["inputs"]["verified_on"] == "synthetic inputs"
    assert [i["kind"] for i in r["inputs"]["inputs"]] == ["token ids", "mask", "type ids"]


def test_given_inputs_used_everywhere(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Acceptance: with --inputs only (no --shape), statistics and --bench draw valid ids, and the
    statistics' samples are not the verification samples."""
    data = np.load(FIXTURES / "bert_tiny_inputs.npz")
    seen: list[dict[str, np.ndarray]] = []
    real = R.stats_feeds

    def spy(*args, **kw):
        feeds = real(*args, **kw)
        seen.append(feeds)
        return feeds

    monkeypatch.setattr(R, "stats_feeds", spy)  # every statistics draw goes through it
    out = tmp_path / "o.onnx"
    given = str(FIXTURES / "bert_tiny_inputs.npz")
    assert main(["prune", str(BERT), "-o", str(out), "--inputs", given, "--bench"]) == 0
    text = capsys.readouterr().out
    assert "the given inputs (16 samples)" in text and "latency" in text
    assert seen
    for feeds in seen:
        assert set(np.unique(feeds["input_ids"])) <= set(np.unique(data["input_ids"]))
        assert feeds["token_type_ids"].max() <= 1
        given_rows = {r.tobytes() for r in data["input_ids"]}
        assert not any(r.tobytes() in given_rows for r in feeds["input_ids"])


def test_from_given_keeps_values() -> None:
    data = dict(np.load(FIXTURES / "bert_tiny_inputs.npz"))
    model = load_model(BERT).model
    im = from_given(model, {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    drawn = im.draw(model, {"input_ids": [1, 16], "attention_mask": [1, 16], "token_type_ids": [1, 16]}, 32, 3)
    assert set(np.unique(drawn["input_ids"])) <= set(np.unique(data["input_ids"]))
    rows = {r.tobytes() for r in data["attention_mask"]}
    assert all(r.tobytes() in rows for r in drawn["attention_mask"])


def branching_model() -> onnx.ModelProto:
    """y = x * 2 if flag == 1 else x: the flag needs a real value."""
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    then = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y_then"])], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)])  # fmt: skip
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])  # fmt: skip
    nodes = [helper.make_node("Equal", ["flag", "one"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                       helper.make_tensor_value_info("flag", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [one, two])  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_values_the_graph_branches_on_are_asked_for() -> None:
    model = branching_model()
    spec = infer(model).specs["flag"]
    assert spec.kind == "needs value" and "Equal" in spec.evidence
    with pytest.raises(RedonnxError, match=r"input 'flag' needs a real value.*--inputs"):
        prune(model, exact=True)
    res = prune(model, exact=True, inputs={"x": np.ones((1, 4), np.float32), "flag": np.array(1, np.int64)})
    assert res.verification
