"""The INT8 stage: QDQ models verified against the original, sensitive layers kept float, fp32
unchanged, TensorRT's symmetric form, and the same bytes in any process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, cifar_batch, shared_model
from onnx import TensorProto, helper, numpy_helper

from redonnx.cli import main
from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.pipeline import prune
from redonnx.quantize.cpu import detect

DIGITS = MODELS / "digits_resnet.onnx"


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits_test.npz")
    return (data["x"].astype(np.float32) / 16).reshape(-1, 1, 8, 8), data["y"]


def test_qdq_model_is_verified_against_the_original_and_holds_on_real_digits(tmp_path: Path) -> None:
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["prune", str(DIGITS), "-o", str(out), "--precision", "int8", "--target", "macs",
                 "--report", str(rep)]) == 0  # fmt: skip
    written = load_model(out).model
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(written)
    r = json.loads(rep.read_text())
    assert r["verification"]["passed"] and r["verification"]["min_cosine"] == 0.998
    prec = r["precision"]
    assert prec["kept"] != "float"
    chosen = prec["proposals"][prec["kept_index"]]  # the kept proposal, by its place
    assert chosen["int8_layers"] and prec["kept"].startswith(f"int8 ({chosen['scheme']})")
    assert chosen["calibration"].startswith("64 synthetic samples")
    assert {lay["precision"] for lay in chosen["layers"]} <= {"int8", "float"}
    x, y = _digits()  # real digits the budget never saw
    ref = run(session(load_model(DIGITS).model), {"input": x})["logits"]
    got = run(session(written), {"input": x})["logits"]
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.97
    assert np.mean(got.argmax(1) == y) >= np.mean(ref.argmax(1) == y) - 0.02


def _outlier_mlp(bias2: bool = False) -> onnx.ModelProto:
    """x -> MatMul+Relu -> MatMul+Relu -> MatMul. The first layer writes one channel near 1000
    (a bias, a zero column) that the second layer barely reads: quantizing the tensor between
    them at one scale leaves the other channels a handful of levels, so the second layer's INT8
    form is far over the budget while the others are not. ``bias2``: the second layer adds a bias
    (pre-processing fuses it into a Gemm)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) / 4
    b1 = np.zeros(32, np.float32)
    w1[:, 0], b1[0] = 0.0, 1000.0
    w2 = rng.standard_normal((32, 32)).astype(np.float32) / 6
    w2[0] = 1e-4
    w3 = rng.standard_normal((32, 10)).astype(np.float32) / 6
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"))]
    if bias2:
        inits.append(numpy_helper.from_array(np.full(32, 0.1, np.float32), "b2"))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["m2"], name="fc2"),
        *([helper.make_node("Add", ["m2", "b2"], ["a2"])] if bias2 else []),
        helper.make_node("Relu", ["a2" if bias2 else "m2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["y"], name="fc3"),
    ]
    return _vector_model("outlier", nodes, inits, 10)


def _vector_model(name: str, nodes: list, inits: list, width: int) -> onnx.ModelProto:
    """A model of ``nodes`` from x [n, 16] to y [n, width]."""
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _cosine_on_fresh_draws(model: onnx.ModelProto, cand: onnx.ModelProto, seed: int) -> float:
    """Output cosine on 64 standard-normal samples the search never saw."""
    x = np.random.default_rng(seed).standard_normal((64, 16)).astype(np.float32)
    ref, got = run(session(model), {"x": x})["y"], run(session(cand), {"x": x})["y"]
    return float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got))


def test_a_sensitive_layer_is_kept_float_and_the_rest_goes_int8() -> None:
    model = _outlier_mlp()
    res = prune(model, passes=["cleanup"], precision="int8", target="macs")
    assert res.verification.passed
    chosen = res.precision.chosen
    assert chosen is not None and chosen.scheme.mode == "static"
    for proposal in res.precision.proposals:  # static (fc1's output is quantized too) and dynamic
        by = {c.name.split("/")[0]: c for c in proposal.layers}  # pre-processing fused fc1 with its Add
        assert by["fc2"].precision == "float" and "kept float" in by["fc2"].why
        assert by["fc2"].deviation > 100 * by["fc3"].deviation
        assert by["fc3"].precision == "int8"
        assert any("over the budget" in n for n in proposal.notes)  # every layer in INT8 was not
    assert _cosine_on_fresh_draws(model, res.model, 123) >= 0.998


def test_a_sensitive_gemm_is_kept_float_by_dynamic_int8_too() -> None:
    """A dense layer with a bias is one Gemm after pre-processing, which the dynamic quantizer
    replaces with a MatMul of another name: the stage names that MatMul, so the layer can be kept
    float (it was quantized whatever the search chose: "no layer fits the budget")."""
    model = _outlier_mlp(bias2=True)
    res = prune(model, passes=["cleanup"], precision="int8", target="macs")
    dynamic = next(p for p in res.precision.proposals if p.scheme.mode == "dynamic")
    assert dynamic.model is not None, dynamic.declined
    by = {c.name.split("/")[0]: c for c in dynamic.layers}
    assert by["fc2"].precision == "float" and "kept float" in by["fc2"].why and by["fc3"].precision == "int8"
    assert by["fc2"].deviation > 100 * by["fc3"].deviation
    assert dynamic.verification and _cosine_on_fresh_draws(model, dynamic.model, 123) >= 0.998


def _uneven_columns() -> onnx.ModelProto:
    """x -> MatMul -> Mul: four of the weight's 32 columns are 100x the others, and the Mul scales
    their outputs back (a trained encoder's columns differ like this, then LayerNorm evens them).
    One weight scale per tensor leaves the small columns a level or two; one per column does not."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    s = np.ones(32, np.float32)
    w[:, :4] *= 100.0
    s[:4] = 0.01
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Mul", ["m", "s"], ["y"])]
    return _vector_model("uneven", nodes, inits, 32)


class _Shape:
    def __init__(self, name: str) -> None:
        self.name = name

    def key(self) -> str:
        return self.name


class _Costs:
    """A cost model: every layer 1 ms in float; in INT8 ``int8`` ms, the last layer ``last`` ms."""

    def __init__(self, int8: float, last: float, last_name: str) -> None:
        self.int8, self.last, self.last_name = int8, last, last_name

    def ms(self, shape) -> float:
        return 1.0

    def timed(self, key, build) -> float:
        return self.last if key.endswith(self.last_name) else self.int8

    def pair(self, key, a, b) -> None:
        return None  # no pair timer: float and INT8 each alone, as above


class _Verdicts(dict):
    def put(self, key, value) -> None:
        self[key] = json.loads(json.dumps(value))


class _Over:
    """A check over the budget."""

    worst_cosine = 0.9

    def __bool__(self) -> bool:
        return False


def _speed_stage(tmp_path: Path, int8: float, last: float, probe_ratio, verdicts: _Verdicts, probed: list,
                 check=None, drawn: list | None = None, files=None, seed_shift: int = 0):  # fmt: skip
    from redonnx.quantize import Scheme, StageInputs
    from redonnx.quantize.stage import Stage

    model = _outlier_mlp()

    def probe(m: onnx.ModelProto) -> float:
        probed.append(m)
        return probe_ratio if isinstance(probe_ratio, float) else probe_ratio[len(probed) - 1]

    inputs = StageInputs(
        source=model, check=check or (lambda m: pytest.fail("a fidelity trial ran")), batched=True,
        draw=lambda batch, seed: (drawn if drawn is not None else []).append(batch) or {
            "x": np.random.default_rng(seed + seed_shift).standard_normal((batch, 16)).astype(np.float32)},
        cost_model=_Costs(int8, last, "fc3"), layer_shapes=lambda m: {n.name: _Shape(n.name) for n in m.graph.node},
        probe=probe, verdicts=verdicts, min_gain=0.03, files=files)  # fmt: skip
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    return Stage(inputs, Scheme("static"), True, work).run(model)


def test_int8_that_cannot_pay_is_declined_before_any_fidelity_trial_and_remembered(tmp_path: Path,
                                                                                   monkeypatch) -> None:  # fmt: skip
    """Layers that save too little by the cost model end the stage without a model built; layers
    faster alone whose whole model is not faster (the probe: every such layer in INT8, timed once
    against the float result, its ranges from one sample drawn alone) end it before any fidelity
    trial and before the calibration proper is drawn; either verdict is kept by the float model's bytes, so the next
    run on this CPU neither prepares nor times anything."""
    from redonnx.quantize import calibration as C

    calibrated = []
    real = C.ranges
    monkeypatch.setattr(C, "ranges", lambda jobs, *a: calibrated.append(jobs) or real(jobs, *a))
    verdicts, probed = _Verdicts(), []
    little = _speed_stage(tmp_path, 1.0, 0.94, 0.5, verdicts, probed)  # fc3 6 % faster: 2 % of 3 ms in all
    assert little.model is None and "would save 2.0% of the layers' float time" in little.declined
    assert not probed and little.trials == 0 and [c.precision for c in little.layers] == ["float", "float", "int8"]
    verdicts.clear()
    drawn: list[int] = []
    slow = _speed_stage(tmp_path, 0.5, 0.5, 1.2, verdicts, probed, drawn=drawn)
    assert slow.model is None and "ran at 1.200x" in slow.declined and slow.trials == 0
    assert drawn == [1]  # the probe's one sample drawn, not the calibration's
    assert len(probed) == 1 and {"QuantizeLinear", "DequantizeLinear"} <= _ops(probed[0])
    assert [C.sample_count(r) for jobs in calibrated for r in jobs[0][1]] == [1]  # the probe's one sample
    assert len(verdicts) == 1 and all(c.int8_ms == 0.5 for c in slow.layers)
    again = _speed_stage(tmp_path, 0.5, 0.5, 1.2, verdicts, probed)
    assert again.declined == slow.declined and len(probed) == 1
    assert [c.to_dict() for c in again.layers] == [c.to_dict() for c in slow.layers]
    assert "recalled" in again.notes[0]
    # every op in INT8 is faster but over the budget: the weighted layers alone are probed before more trials
    verdicts.clear()
    probed.clear()
    layers = _speed_stage(tmp_path, 0.5, 0.5, [0.5, 1.2], verdicts, probed, check=lambda m: _Over())
    assert "with the weighted layers faster alone in INT8 the model ran at 1.200x" in layers.declined
    assert layers.trials == 1 and len(probed) == 2 and len(verdicts) == 1


def test_memoized_weight_quantization_writes_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    """Builds with onnxruntime's per-channel weight quantization memoized (the stage's trials), static
    and dynamic, are the library's own, bit for bit; its functions are back once the last build leaves."""
    import contextlib

    from onnxruntime.quantization import base_quantizer as bq
    from onnxruntime.quantization import qdq_quantizer as qq

    from redonnx.quantize import calibration as C
    from redonnx.quantize import memo
    from redonnx.quantize.quantizer import Quantizer, Scheme, layers, prepare

    original = (qq.compute_data_quant_params, qq.quantize_onnx_initializer, bq.quantize_data)
    static = prepare(onnx.load(str(DIGITS)), tmp_path)
    runs = C.chunks({static.graph.input[0].name: _digits()[0][:32]}, True)
    cache = C.write_cache(C.tensor_ranges(static, runs, "MinMax", tmp_path), tmp_path / "ranges.json")
    dynamic = prepare(_outlier_mlp(), tmp_path)

    def builds(folder: str) -> list[bytes]:
        out = []
        for k, (model, scheme) in enumerate(((static, Scheme()), (dynamic, Scheme("dynamic")))):
            q = Quantizer(model, scheme, tmp_path / f"{folder}{k}")
            q.work.mkdir()
            names = [lay.name for lay in layers(model)]
            out += [q.build(frozenset(names[i : i + 1]), cache=cache if k == 0 else None).SerializeToString()
                    for i in range(3)]  # fmt: skip
        return out

    with memo.memoized():  # nested: the builds' own entries leave it installed
        assert qq.compute_data_quant_params is not original[0] and bq.quantize_data is not original[2]
        memo.clear()
        memoized = builds("memoized")  # every weight computed by the first, then served from the memo
        assert {key[0] for key in memo._results} == {name for _, name in memo.TARGETS}
    assert (qq.compute_data_quant_params, qq.quantize_onnx_initializer, bq.quantize_data) == original
    memo.clear()
    monkeypatch.setattr(memo, "LIMIT_BYTES", 512)  # results dropped as they come: the same bytes
    assert builds("tight") == memoized and memo._held <= 512
    monkeypatch.setattr(memo, "memoized", contextlib.nullcontext)
    assert builds("library") == memoized


def test_an_old_opset_model_is_upgraded_for_per_channel_qdq_and_a_failure_keeps_float(monkeypatch) -> None:
    """Per-channel Q/DQ (``axis``) needs opset 13: the library wrote it into CNTK's MNIST (opset 8)
    and onnxruntime refused the model, which failed the whole prune. The stage now quantizes the
    model upgraded by onnx's version converter; and where onnxruntime cannot load what the library
    wrote anyway, the stage stops with the reason and the float result is written."""
    from redonnx.quantize import quantizer as Q
    from redonnx.quantize import stage as S

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 1, 3, 3)) / 3, rng.standard_normal((8, 8, 3, 3)) / 8
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (w2, "w2"))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]  # fmt: skip
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)  # fmt: skip
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    old.ir_version = 6
    assert Q.upgraded(old).opset_import[0].version == Q.PER_CHANNEL_OPSET
    res = prune(old, passes=["cleanup"], precision="int8", target="macs")
    assert res.precision.chosen is not None and res.verification.passed
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(res.model)
    session(res.model)  # onnxruntime loads it
    monkeypatch.setattr(Q, "upgraded", lambda m: m)  # as before: the library's opset-11 model
    kept = prune(old, passes=["cleanup"], precision="int8", target="macs")
    assert kept.precision.chosen is None and kept.verification.passed
    (proposal,) = kept.precision.proposals
    assert proposal.declined.startswith("stopped: onnxruntime cannot load the candidate model")
    assert all(c.precision == "float" for c in proposal.layers) and "QuantizeLinear" not in _ops(kept.model)
    assert S.NO_LAYER_FITS not in proposal.declined


def test_dynamic_int8_scales_weights_per_column() -> None:
    model = _uneven_columns()
    res = prune(model, passes=["cleanup"], precision="int8", target="macs")
    assert res.verification.passed
    dynamic = next(p for p in res.precision.proposals if p.scheme.mode == "dynamic")
    assert dynamic.model is not None and dynamic.int8_layers == 1, dynamic.describe()
    integer = next(n for n in dynamic.model.graph.node if n.op_type == "MatMulInteger")
    inits = {t.name: numpy_helper.to_array(t) for t in dynamic.model.graph.initializer}
    assert inits[integer.input[3]].shape == (32,)  # the weight's zero points: one per column
    assert _cosine_on_fresh_draws(model, dynamic.model, 7) >= 0.998


def test_pre_processing_leaves_nothing_in_the_working_folder(tmp_path: Path, monkeypatch, capfd) -> None:
    """bert_tiny's symbolic shape inference does not complete: onnxruntime then saves its partial
    model into the current folder and logs an error; both stay inside the stage's scratch folder."""
    from redonnx.quantize.quantizer import layers, prepare

    fixture = Path(__file__).parent / "fixtures" / "bert_tiny.onnx"
    cwd, work = tmp_path / "user", tmp_path / "work"
    cwd.mkdir()
    work.mkdir()
    monkeypatch.chdir(cwd)
    prepared = prepare(onnx.load(fixture), work)
    assert list(cwd.iterdir()) == []
    assert capfd.readouterr().err == ""
    assert layers(prepared)  # the fallback (no symbolic shapes) still prepared it


def test_pre_processing_without_sympy_keeps_the_weights_inside_the_model(tmp_path: Path, monkeypatch) -> None:
    """sympy is not a dependency. Without it symbolic shape inference fails, and onnxruntime's
    second route, handed a model proto, moves every initializer out to a "foo.bin" that never
    exists: a Reshape's shape then cannot be read, the route fails, and the proto was left so
    (a clean install's CI failed on ResNet-20). Pre-processing is handed a file instead."""
    from redonnx.quantize.quantizer import prepare

    for name in ("sympy", "onnxruntime.tools.symbolic_shape_infer"):  # their import raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    w = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
    shape = np.array([-1, 16], np.int64)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    model = _vector_model("reshape", nodes, [numpy_helper.from_array(shape, "shape"),
                                             numpy_helper.from_array(w, "w")], 10)  # fmt: skip
    before = model.SerializeToString()
    prepared = prepare(model, tmp_path)
    assert model.SerializeToString() == before
    assert not any(t.data_location == TensorProto.EXTERNAL for t in prepared.graph.initializer)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(run(session(prepared), {"x": x})["y"], x @ w, rtol=1e-5, atol=1e-5)


def test_a_model_with_external_data_is_prepared_with_its_weights(tmp_path: Path, monkeypatch) -> None:
    """A model loaded with external data stays lean (its tensors point into files beside it); the
    quantizers get its weights in the proto (a clean install failed on resnet20_dynamo)."""
    from redonnx.quantize.quantizer import prepare

    for name in ("sympy", "onnxruntime.tools.symbolic_shape_infer"):
        monkeypatch.setitem(sys.modules, name, None)
    path = tmp_path / "src" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(load_model(DIGITS).model, str(path), save_as_external_data=True, location="m.data",
                    size_threshold=256)  # fmt: skip
    lean = load_model(path)
    assert lean.external_data
    work = tmp_path / "work"
    work.mkdir()
    prepared = prepare(lean.model, work)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in prepared.graph.initializer)
    x, _ = _digits()
    ref = run(session(load_model(DIGITS).model), {"input": x[:4]})["logits"]
    np.testing.assert_allclose(run(session(prepared), {"input": x[:4]})["logits"], ref, rtol=1e-4, atol=1e-4)


def test_fp32_writes_no_quantization_and_exact_refuses_int8(tmp_path: Path) -> None:
    res = prune(DIGITS, precision="fp32")
    assert res.precision is None and "QuantizeLinear" not in _ops(res.model)
    assert main(["prune", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--exact", "--precision", "int8"]) == 2
    assert not (tmp_path / "o.onnx").exists()


def test_auto_writes_the_fp32_bytes_unless_int8_is_measurably_faster() -> None:
    src = shared_model("cifar10/resnet20_bn.onnx")
    fp32, auto = prune(src, precision="fp32"), prune(src)
    assert auto.precision is not None and auto.precision.precision == "auto"
    if auto.precision.kept == "float":
        assert auto.model.SerializeToString() == fp32.model.SerializeToString()
    else:  # a CPU whose int8 kernels won: the gate measured it
        entry = next(m for m in auto.precision.measured if m["kept"])
        assert entry["accepted"] and entry["vs_float"]["ratio_high"] < 0.97
    assert "QuantizeLinear" not in _ops(fp32.model)


def test_trt_int8_writes_symmetric_qdq_on_layer_inputs() -> None:
    res = prune(DIGITS, target="trt-int8")
    assert res.verification.passed and res.precision.kept != "float"
    m = res.model
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    zero_points = [inits[n.input[2]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(n.input) > 2 and n.input[2] in inits]  # fmt: skip
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    producer = {o: n for n in m.graph.node for o in n.output}
    for conv in (n for n in m.graph.node if n.op_type in ("Conv", "Gemm")):  # inputs and weights quantized
        assert producer[conv.input[0]].op_type == producer[conv.input[1]].op_type == "DequantizeLinear"
        assert len(conv.input) < 3 or conv.input[2] in inits  # a float bias, which TensorRT fuses


def test_int8_bytes_are_identical_across_processes(tmp_path: Path) -> None:
    def once(folder: Path, env: dict[str, str]) -> bytes:
        folder.mkdir()
        keep = {k: v for k, v in os.environ.items() if k not in ("PYTHONHASHSEED", "OMP_NUM_THREADS")}
        proc = subprocess.run([sys.executable, "-m", "redonnx.cli", "prune", str(DIGITS), "-o",
                               str(folder / "o.onnx"), "--precision", "int8", "--passes", "fold-batchnorm,cleanup",
                               "--target", "macs"],
                              env={**keep, **env}, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return (folder / "o.onnx").read_bytes()

    assert once(tmp_path / "a", {"PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "1"}) == once(
        tmp_path / "b", {"PYTHONHASHSEED": "2"})  # fmt: skip


def test_calibration_with_real_images_holds_resnet20_top1(tmp_path: Path) -> None:
    """ResNet-20 in INT8 calibrated on 256 real images: within 0.5 top-1 points on the other 761."""
    x, y = cifar_batch()
    calib = tmp_path / "c.npz"
    np.savez(calib, input=x[:256])
    src = shared_model("cifar10/resnet20_bn.onnx")
    res = prune(
        src, passes=["fold-batchnorm", "cleanup"], precision="int8", target="macs", calibration=dict(np.load(calib))
    )
    assert res.verification.passed and res.precision.kept != "float"
    assert res.precision.chosen.calibration.startswith("the given calibration inputs (256")
    ref = run(session(onnx.load(str(src))), {"input": x[256:]})["logits"].argmax(1)
    got = run(session(res.model), {"input": x[256:]})["logits"].argmax(1)
    assert np.mean(got == y[256:]) >= np.mean(ref == y[256:]) - 0.005


def test_cpu_features_name_the_kernel() -> None:
    cpu = detect()
    text = cpu.describe()
    if cpu.arch == "x86_64":
        assert ("VNNI" in text) or ("AVX2" in text) or ("AMX" in text) or ("SSE" in text) or ("AVX-512" in text)
        assert cpu.reduce_range == (not (cpu.vnni or cpu.amx))
    else:
        pytest.skip("not x86-64")


def test_lossless_result_is_quantized_too_when_pruning_spent_the_budget_int8_needed(monkeypatch) -> None:
    """The float result's INT8 proposal kept a layer float for the budget: the lossless result the
    speed gate timed is quantized too, and the faster model that holds the budget is written with
    the lossless passes' results; where speed, not the budget, kept layers float, it is not tried."""
    from redonnx.passes.base import PassResult
    from redonnx.planner import precision as PM
    from redonnx.quantize import QuantResult, Scheme, StageInputs
    from redonnx.quantize.stage import BUDGET_NEEDS_IT, LayerChoice

    pruned, lossless, source = _outlier_mlp(), _outlier_mlp(), _outlier_mlp()
    pruned.doc_string, lossless.doc_string = "pruned", "lossless"
    int8_of = {"pruned": onnx.ModelProto(doc_string="int8 pruned"), "lossless": onnx.ModelProto(doc_string="int8 ll")}
    why = {"value": BUDGET_NEEDS_IT}
    staged: list[str] = []

    def fake_stage(model, inputs, schemes, speed):
        staged.append(model.doc_string)
        layers = [LayerChoice("fc1", "MatMul"), LayerChoice("fc2", "MatMul", "float", why["value"])]
        if model.doc_string == "lossless":
            layers[1] = LayerChoice("fc2", "MatMul")
        return [QuantResult(Scheme("static"), detect(), int8_of[model.doc_string], "MinMax", "draws", layers,
                            verification=_Fit())]  # fmt: skip

    ratios = {"int8 pruned": 0.99, "int8 ll": 0.6}

    class _Fit:
        worst_cosine = 0.999

        def to_dict(self) -> dict:
            return {"passed": True}

    def fake_measure(src, float_model, cand, feeds, cache):
        r = ratios[cand.doc_string]
        return {"vs_exact": {"ratio": r, "ratio_low": r - 0.01, "ratio_high": r + 0.01},
                "vs_input": {"ratio": r * 0.8, "ratio_low": r * 0.8, "ratio_high": r * 0.8}, "rounds": 5}  # fmt: skip

    monkeypatch.setattr(PM, "run_stage", fake_stage)
    monkeypatch.setattr(PM.speed_mod, "measure", fake_measure)
    inputs = StageInputs(source=source, check=lambda m: None, draw=lambda b, s: {}, batched=True)
    stage = PM.PrecisionStage("auto", "ort-cpu", inputs, feeds={"x": np.zeros((1, 16), np.float32)}, cache=object())
    pruned_res, lossless_res = [PassResult("merge-channels")], [PassResult("cleanup")]
    model, results, out = stage.run(pruned, pruned_res, None, 0.999, (lossless, lossless_res))
    assert staged == ["pruned", "lossless"] and model.doc_string == "int8 ll"
    assert [r.name for r in results] == ["cleanup", "quantize-int8"]
    assert out.chosen.of == "lossless result" and "of the lossless result" in out.kept
    assert any("pruning's choice spent the budget INT8 needed" in line for line in out.lines())
    assert out.to_dict()["proposals"][1]["of"] == "lossless result"
    staged.clear()
    why["value"] = "int8 not faster on this CPU (0.2 vs 0.1 ms alone)"  # speed kept it float: no second try
    model, results, out = stage.run(pruned, pruned_res, None, 0.999, (lossless, lossless_res))
    assert staged == ["pruned"] and out.kept == "float" and model is pruned and results == pruned_res


def test_calibration_runs_fit_in_memory_and_minmax_ranges_do_not_depend_on_the_split(monkeypatch) -> None:
    """onnxruntime's calibrators hold a run's every tensor (MinMax) or every run's (histograms):
    MobileNetV2 at 224 held 4.5 GiB and 12 GiB. Runs are cut to a byte bound; MinMax ranges are the
    same however the samples are split, and the histogram methods get runs of one size (stacked)."""
    from redonnx.quantize import calibration as C
    from redonnx.quantize.quantizer import prepare

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = prepare(onnx.load(str(DIGITS)), work)
        x = _digits()[0][:32]
        name = model.graph.input[0].name
        runs = C.chunks({name: x}, True)
        per = C.sample_bytes(model, runs[0], True)
        assert per > 64 * 4  # a sample's activations: more than its input
        assert C.within_memory(runs, per, False, True) is runs  # they fit: unchanged
        monkeypatch.setattr(C, "RUN_BYTES", 3 * per)
        small = C.within_memory(runs, per, False, True)
        assert [C.sample_count(r) for r in small] == [3] * 10 + [2]
        whole = C.tensor_ranges(model, runs, "MinMax", work).data
        split = C.tensor_ranges(model, small, "MinMax", work).data
        assert whole.keys() == split.keys()
        assert all(np.array_equal(whole[k].range_value, split[k].range_value) for k in whole)
        monkeypatch.setattr(C, "HISTOGRAM_BYTES", 10 * per)
        held = C.within_memory(runs, per, True, True)
        assert [C.sample_count(r) for r in held] == [3, 3, 3]  # 10 fit; runs of one size
        np.testing.assert_array_equal(np.concatenate([r[name] for r in held]), x[:9])  # the first samples
        assert C.tensor_ranges(model, held, "Percentile", work).data.keys() == whole.keys()
        unknown = helper.make_model(helper.make_graph(  # onnxruntime has no kernel: unmeasured, runs as given
            [helper.make_node("Foo", [name], ["y"], domain="example.custom")], "g",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))  # fmt: skip
        assert C.sample_bytes(unknown, runs[0], True) == 0.0
        monkeypatch.setattr(C, "RUN_BYTES", 256 * 2**20)
        assert C.within_memory(runs, 0.0, False, True) is runs


def test_each_histogram_is_collected_once_and_entropy_would_repeat_minmax(monkeypatch) -> None:
    """Ranges of the tensors the BatchNorm-corrected original shares are its own: each histogram is
    collected in one of the two calibrations only, and the ranges are those of both calibrated whole
    and merged. onnxruntime's Entropy with its defaults gives MinMax's ranges bit for bit: why it is
    not one of the methods tried."""
    from redonnx.quantize import calibration as C
    from redonnx.quantize.quantizer import prepare

    def values(data) -> dict[str, tuple[float, float]]:
        return {k: tuple(float(np.asarray(v).ravel()[0]) for v in t.range_value) for k, t in data.data.items()}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = prepare(onnx.load(str(DIGITS)), work)
        other = onnx.ModelProto()  # the "corrected" original: its own output tensor, other values
        other.CopyFrom(model)
        last = other.graph.output[0].name
        other.graph.node[-1].output[0] = other.graph.output[0].name = "own"
        name, x = model.graph.input[0].name, _digits()[0][:32]
        plain, corrected = C.chunks({name: x}, True), C.chunks({name: 2 * x}, True)
        assert values(C.tensor_ranges(model, plain, "Entropy", work)) == values(
            C.tensor_ranges(model, plain, "MinMax", work))  # fmt: skip
        collected = []
        real = C._collected
        monkeypatch.setattr(
            C, "_collected", lambda c, *a: collected.append(set(getattr(c, "tensors_to_calibrate", ()))) or real(c, *a)
        )
        for method in C.METHODS:
            a = values(C.tensor_ranges(model, plain, method, work))
            b = values(C.tensor_ranges(other, corrected, method, work))
            assert last in a and "own" in b and last not in b
            collected.clear()
            got, shared = C.ranges([(model, plain), (other, corrected)], method, work)
            assert values(got) == {k: b.get(k, v) for k, v in a.items()} and shared == len(a) - 1
            if method != "MinMax":  # histograms: ours of the one tensor the original lacks, the rest its
                assert collected == [{last}, set(a) - {last}]


def test_pre_processing_infers_symbolically_only_where_onnx_leaves_a_gap(tmp_path: Path, monkeypatch) -> None:
    """Symbolic shape inference (sympy) runs only where onnx's own leaves a node output without a
    type or rank: the digits CNN is pre-processed once, without it."""
    import onnxruntime.quantization.shape_inference as si

    from redonnx.quantize import quantizer as Q

    calls = []
    real = si.quant_pre_process
    spy = lambda *a, **k: calls.append(k["skip_symbolic_shape"]) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(si, "quant_pre_process", spy)
    prepared = Q.prepare(onnx.load(str(DIGITS)), tmp_path)
    assert calls == [True] and Q._typed(prepared)
    del prepared.graph.value_info[0]
    assert not Q._typed(prepared)


def test_a_proposed_int8_plan_is_remembered_and_rebuilt_with_one_trial(tmp_path: Path) -> None:
    """Where this CPU's speed decides (auto), the plan of the model the search proposed (method,
    float layers) is kept by the float model's bytes: the next run builds and verifies that one
    model, the same bytes, instead of searching; a plan that no longer holds is searched again."""
    from redonnx.measure.verify import Reference, Tolerance

    reference = Reference(_outlier_mlp(), samples=8)
    tol = Tolerance(1e-6, 0.5, 0.998)
    checks: list[onnx.ModelProto] = []

    def check(m: onnx.ModelProto):
        checks.append(m)
        return reference.check(m, tol)

    verdicts, probed = _Verdicts(), []
    first = _speed_stage(tmp_path, 0.5, 0.5, 0.5, verdicts, probed, check=check)
    assert first.model is not None and first.trials > 2 and len(verdicts) == 1
    float_layers = [c.name for c in first.layers if c.precision == "float"]
    assert float_layers and all("kept float" in c.why for c in first.layers if c.precision == "float")
    checks.clear()
    again = _speed_stage(tmp_path, 0.5, 0.5, 0.5, verdicts, probed, check=check)
    assert again.trials == 1 and len(checks) == 1 and "recalled" in again.notes[-1]
    assert again.model.SerializeToString() == first.model.SerializeToString()
    assert [c.to_dict() for c in again.layers] == [c.to_dict() for c in first.layers]
    assert again.verification.worst_cosine == first.verification.worst_cosine
    # a plan that no longer holds (here: every check over the budget once) is searched again
    failing = iter([_Over()])

    def once_over(m: onnx.ModelProto):
        over = next(failing, None)
        return over if over is not None else check(m)

    stale = _speed_stage(tmp_path, 0.5, 0.5, 0.5, verdicts, probed, check=once_over)
    assert stale.trials == first.trials + 1 and not any("recalled" in n for n in stale.notes)
    assert stale.model.SerializeToString() == first.model.SerializeToString()


def test_a_recalled_plan_reads_its_ranges_from_the_cache_and_builds_the_same_bytes(tmp_path: Path,
                                                                                    monkeypatch) -> None:  # fmt: skip
    """The calibration ranges are kept by everything they are computed from: a recalled plan builds
    its model from them without calibrating (the same bytes); other calibration samples, or a kept
    entry that cannot be read, calibrate again."""
    from redonnx.measure.latency import Cache
    from redonnx.measure.verify import Reference, Tolerance
    from redonnx.quantize import calibration as C

    reference = Reference(_outlier_mlp(), samples=8)
    tol = Tolerance(1e-6, 0.5, 0.998)
    calibrated = []
    real_ranges = C.ranges

    def spy(jobs, method, work):  # the samples calibrated (the probe's ranges take one, and are not kept)
        calibrated.append(sum(C.sample_count(r) for r in jobs[0][1]))
        return real_ranges(jobs, method, work)

    monkeypatch.setattr(C, "ranges", spy)
    files = Cache(tmp_path / "cache")

    def stage(verdicts, **kw):
        return _speed_stage(tmp_path, 0.5, 0.5, 0.5, verdicts, [], check=lambda m: reference.check(m, tol),
                            files=files, **kw)  # fmt: skip

    verdicts = _Verdicts()
    first = stage(verdicts)
    assert first.model is not None and calibrated and list(files._texts_folder().glob("*.json"))
    calibrated.clear()
    again = stage(verdicts)  # the plan recalled: built from the kept ranges
    assert again.trials == 1 and calibrated == [] and "recalled" in again.notes[-1]
    assert again.model.SerializeToString() == first.model.SerializeToString()
    assert Cache(tmp_path / "cache").get_text(next(iter(files._texts_folder().glob("*.json"))).stem)  # on disk
    searched = stage(_Verdicts())  # a search with no plan reads the kept ranges too (its probe takes one sample)
    assert calibrated == [1] and searched.model.SerializeToString() == first.model.SerializeToString()
    other = stage(_Verdicts(), seed_shift=1)  # other calibration samples: other ranges
    assert calibrated[-1] > 1 and other.model.SerializeToString() != first.model.SerializeToString()
    for broken in ("{not json", '{"ranges": "{cut short", "notes": []}', '{"ranges": {}, "notes": []}'):
        for f in files._texts_folder().glob("*.json"):
            f.write_text(broken)
        calibrated.clear()
        mended = stage(verdicts)
        assert calibrated and mended.model.SerializeToString() == first.model.SerializeToString()


def test_the_ranges_key_follows_the_corrections_of_the_draws(tmp_path: Path) -> None:
    """Where the draws are BatchNorm-corrected, the ranges read from the corrected original: the
    key changes with the corrections and the original; given calibration inputs, it does not read them."""
    from types import SimpleNamespace

    from redonnx.inputs.realism import Correction
    from redonnx.measure.latency import Cache
    from redonnx.quantize import Scheme, StageInputs
    from redonnx.quantize.stage import Stage

    model = _outlier_mlp()
    corr = Correction("h1", np.ones(32, np.float32), np.zeros(32, np.float32), 2)
    runs = [{"x": np.ones((4, 16), np.float32)}]
    q = SimpleNamespace(prepared=model)

    def key(corrections, source=model, calibration=None) -> str:
        inputs = StageInputs(source=source, check=lambda m: None, draw=lambda b, s: {}, batched=True,
                             corrections=corrections, calibration=calibration, files=Cache("off"))  # fmt: skip
        return Stage(inputs, Scheme("static"), True, tmp_path)._ranges_key(q, runs, "MinMax")

    shifted = Correction("h1", np.ones(32, np.float32), np.full(32, 0.5, np.float32), 2)
    base = key([corr])
    assert base == key([corr]) and base != key(None) and base != key([shifted])
    assert base != key([corr], source=_outlier_mlp(bias2=True))
    given = {"x": np.ones((4, 16), np.float32)}
    assert key([corr], calibration=given) == key([shifted], calibration=given) == key(None, calibration=given)


def test_a_cut_written_in_place_of_the_library_build_leaves_no_plan(tmp_path: Path, monkeypatch) -> None:
    """Where the library's build of the chosen layers misses the budget their cut met, the cut is
    written and no plan is kept: the next run would build it with the library, fail, and search again."""
    from redonnx.measure.verify import Reference, Tolerance
    from redonnx.quantize.stage import Stage

    reference = Reference(_outlier_mlp(), samples=8)
    tol = Tolerance(1e-6, 0.5, 0.998)
    real_try = Stage._try

    def library_over(self, q, exclude, method, runs, res, only=None, layers_only=True):
        model, v = real_try(self, q, exclude, method, runs, res, only, layers_only)
        return (model, _Over()) if exclude and only is None else (model, v)  # the chosen layers' build

    monkeypatch.setattr(Stage, "_try", library_over)
    verdicts = _Verdicts()
    res = _speed_stage(tmp_path, 0.5, 0.5, 0.5, verdicts, [], check=lambda m: reference.check(m, tol))
    assert res.model is not None and res.verification and "the cut is written" in res.notes[-1]
    assert any(c.precision == "float" for c in res.layers) and not verdicts


def test_a_second_prune_reads_the_kept_ranges_and_writes_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    """Through the pipeline, on any CPU: a second `--precision int8` run on one latency cache
    calibrates nothing (the ranges were kept by what they are computed from) and writes the same
    bytes as the first."""
    from redonnx.quantize import calibration as C

    monkeypatch.setenv("REDONNX_CACHE", str(tmp_path / "cache"))
    calibrated = []
    real_ranges = C.ranges

    def spy(jobs, method, work):
        calibrated.append(method)
        return real_ranges(jobs, method, work)

    monkeypatch.setattr(C, "ranges", spy)
    model = onnx.load(str(DIGITS))
    first = prune(model, precision="int8")  # under ort-cpu: the latency cache is the cost model's
    assert first.precision.chosen is not None and calibrated
    calibrated.clear()
    again = prune(model, precision="int8")
    assert calibrated == [] and again.model.SerializeToString() == first.model.SerializeToString()
