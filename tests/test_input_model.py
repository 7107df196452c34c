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

from redonnx.cli import main
from redonnx.errors import RedonnxError
from redonnx.inputs.model import RAW_PIXELS, from_given, infer
from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.measure.verify import verify
from redonnx.pipeline import prune
from redonnx.redundancy import statistics as R

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


def branching_model(scale: float = 2.0, shift: float = 1.0, against: str | None = None) -> onnx.ModelProto:
    """y = x * scale if sr == 16000 else x + shift (silero-vad's sample rate choosing a branch); with
    ``against``, sr is compared with that other input instead of a constant."""
    rate = helper.make_tensor("rate", TensorProto.INT64, [], [16000])
    consts = [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
              helper.make_tensor("shift", TensorProto.FLOAT, [], [shift])]  # fmt: skip
    then = helper.make_graph([helper.make_node("Mul", ["x", "scale"], ["y_then"])], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)])  # fmt: skip
    other = helper.make_graph([helper.make_node("Add", ["x", "shift"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])  # fmt: skip
    nodes = [helper.make_node("Equal", ["sr", against or "rate"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]  # fmt: skip
    if against:
        inputs.append(helper.make_tensor_value_info(against, TensorProto.INT64, []))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [rate, *consts])  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_sample_rate_is_drawn_from_the_values_the_graph_compares_it_with() -> None:
    """Issue 20 item 7: sr only compared with 16000 takes 16000 (then) and 8000 (any other value: else)."""
    spec = infer(branching_model()).specs["sr"]
    assert spec.kind == "compared values" and list(spec.values) == [16000, 8000]
    assert "16000 (Equal)" in spec.evidence and "sr: compared values 16000, 8000" in spec.describe()


@pytest.mark.parametrize("exact", [True, False])
def test_prune_verifies_every_branch_of_a_compared_value(exact: bool) -> None:
    """No flags: the default and --exact pipelines run, verification covers sr = 16000 and 8000 and
    says so, and a candidate wrong in either branch alone fails that verification."""
    model = branching_model()
    res = prune(model, exact=exact)
    assert res.verification and "sr = 16000 on 4, 8000 on 4" in res.verification.inputs
    assert "sr: compared values 16000, 8000" in res.summary()
    assert res.evidence.to_dict()["inputs"]["inputs"][1]["values"] == [16000, 8000]
    for wrong in (branching_model(scale=2.01), branching_model(shift=1.01)):
        assert not verify(model, wrong)


def test_a_value_compared_with_no_constant_is_still_asked_for() -> None:
    model = branching_model(against="rate_in")
    spec = infer(model).specs["sr"]
    assert spec.kind == "needs value" and "compared with 'rate_in', not a constant" in spec.evidence
    with pytest.raises(RedonnxError, match=r"input 'sr' needs a real value.*--inputs"):
        prune(model, exact=True)
    given = {"x": np.ones((1, 4), np.float32), "sr": np.array(8000, np.int64), "rate_in": np.array(16000, np.int64)}
    assert prune(model, exact=True, inputs=given).verification


def compared(comparisons: list[tuple[str, int, bool]], through_gather: bool = False) -> onnx.ModelProto:
    """sr (int64 scalar) compared with constants: (op, constant, sr on the left); optionally reshaped to
    [1] and gathered back first (silero-vad's op18 export)."""
    nodes, inits, outs, src = [], [], [], "sr"
    if through_gather:
        inits += [helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
                  helper.make_tensor("i0", TensorProto.INT64, [], [0])]  # fmt: skip
        nodes += [helper.make_node("Reshape", ["sr", "flat"], ["sr1"]),
                  helper.make_node("Gather", ["sr1", "i0"], ["sr0"])]  # fmt: skip
        src = "sr0"
    for k, (op, c, left) in enumerate(comparisons):
        inits.append(helper.make_tensor(f"c{k}", TensorProto.INT64, [], [c]))
        nodes += [helper.make_node(op, [src, f"c{k}"] if left else [f"c{k}", src], [f"b{k}"]),
                  helper.make_node("Cast", [f"b{k}"], [f"o{k}"], to=TensorProto.FLOAT)]  # fmt: skip
        outs.append(helper.make_tensor_value_info(f"o{k}", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sr", TensorProto.INT64, [])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize(("comparisons", "values"), [
    ([("Equal", 16000, True)], [16000, 8000]),
    ([("Equal", 8000, True), ("Equal", 16000, True)], [8000, 16000, 4000]),
    ([("Less", 0, False)], [0, 1]),  # 0 < sr
    ([("GreaterOrEqual", 10, True), ("Less", 20, True)], [10, 20, 5]),
])  # fmt: skip
def test_compared_values_take_every_outcome_once(comparisons, values) -> None:
    for through_gather in (False, True):
        model = compared(comparisons, through_gather)
        spec = infer(model).specs["sr"]
        assert spec.kind == "compared values" and list(spec.values) == values
        runs = [run(session(model), {"sr": np.array(v, np.int64)}) for v in values]
        outcomes = {tuple(float(x) for x in out.values()) for out in runs}
        assert len(outcomes) == len(values)  # each value its own outcome
