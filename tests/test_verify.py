"""verify: statistics are right, failures are caught, exit codes follow them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import Builder
from conftest import MODELS
from onnx import numpy_helper

from redonnx.cli import main
from redonnx.errors import RedonnxError
from redonnx.measure.verify import compare_arrays, verify

MLP = MODELS / "digits_mlp.onnx"


def perturbed(path: Path, eps: float) -> onnx.ModelProto:
    m = onnx.load(path)
    t = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(t).copy()
    arr.flat[0] += eps
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return m


def test_compare_arrays_statistics() -> None:
    ref = np.array([[1.0, 2.0, -4.0], [0.5, 0.0, 3.0]], np.float32)
    cand = ref.copy()
    cand[0, 2] = -3.0
    c = compare_arrays("y", ref, cand, atol=0.0, rtol=0.1)
    assert c.max_abs == pytest.approx(1.0) and c.mean_abs == pytest.approx(1 / 6)
    assert c.ref_max_abs == 4.0 and c.needed_rtol == pytest.approx(0.25)
    assert not c.passed and c.top1_agreement == 1.0
    assert compare_arrays("y", ref, cand, atol=0.0, rtol=0.25).passed
    assert 0.9 < c.cosine < 1.0


def test_top1_disagreement_and_nan() -> None:
    ref = np.array([[1.0, 2.0], [3.0, 1.0]], np.float32)
    c = compare_arrays("y", ref, ref[:, ::-1].copy(), 1e-6, 1e-4)
    assert c.top1_agreement == 0.0
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare_arrays("y", ref, nan, 1e-6, 1e-4).passed
    assert compare_arrays("y", nan, nan, 0, 0).passed


def test_finite_outputs_compare_as_the_general_case_does(monkeypatch) -> None:
    """Outputs without NaN or infinity skip the passes that handle them: every statistic is the
    general case's, bit for bit (batched, with samples at the floor and one that moved)."""
    from redonnx.measure import verify as V

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 3, 20, 20)).astype(np.float32)
    cand = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    cand[1] = ref[1]  # at the floor: left out of the worst sample
    cand[4] *= -1.0
    fast = [
        V.compare_arrays("y", ref, cand, 1e-6, 0.5, 0.99),
        V.compare_arrays("y", ref[:, :2, 0, 0], cand[:, :2, 0, 0], 0, 0),
    ]
    monkeypatch.setattr(V, "_all_finite", lambda *a: False)
    general = [
        V.compare_arrays("y", ref, cand, 1e-6, 0.5, 0.99),
        V.compare_arrays("y", ref[:, :2, 0, 0], cand[:, :2, 0, 0], 0, 0),
    ]
    assert fast == general
    assert fast[0].worst_sample_cosine < 0 and fast[0].cosine < 0.99


def test_identical_models_pass_and_perturbed_fail() -> None:
    assert verify(MLP, MLP)
    res = verify(MLP, perturbed(MLP, 5.0))
    assert not res and res.outputs[0].max_abs > 0
    assert verify(MLP, perturbed(MLP, 1e-7), rtol=1e-3)


def test_given_inputs(tmp_path: Path) -> None:
    data = np.load(MODELS / "digits_test.npz")
    npz = tmp_path / "in.npz"
    np.savez(npz, input=(data["x"][:50].astype(np.float32) / 16).reshape(50, 1, 8, 8).reshape(50, 64))
    res = verify(MLP, MLP, inputs=npz)
    assert res and res.outputs[0].shape == [50, 10]
    with pytest.raises(RedonnxError, match="no array for input"):
        np.savez(npz, other=np.zeros(3))
        verify(MLP, MLP, inputs=npz)


def test_interface_mismatch_is_an_error() -> None:
    b = Builder()
    other = b.model([("z", [1, 64])], [b.op("Relu", ["z"])])
    with pytest.raises(RedonnxError, match="different inputs"):
        verify(MLP, other)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    onnx.save(perturbed(MLP, 5.0), bad)
    assert main(["verify", str(MLP), str(MLP)]) == 0
    assert main(["verify", str(MLP), str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["verify", str(MLP), str(bad), "--atol", "100"]) == 0
    assert main(["verify", str(MLP), str(bad), "--samples", "0"]) == 2


def test_dynamic_dims_are_chosen_or_given() -> None:
    """Dynamic spatial sizes: the smallest of the ladder that runs (32), or the hint."""
    b = Builder()
    m = b.model([("x", ["n", 3, "h", "w"])], [b.op("Relu", ["x"])])
    res = verify(m, m)
    assert res and res.outputs[0].shape[2:] == [32, 32]
    assert verify(m, m, shapes={"x": [2, 3, 5, 7]})


def test_no_size_that_runs_is_one_clear_error() -> None:
    """A model that runs at no size (3 h = 10 has no solution): one message naming the input."""
    b = Builder()
    y = b.op("Reshape", ["x", b.const(np.array([1, 10], np.int64))])
    m = b.model([("x", [1, "h", 3])], [y])
    with pytest.raises(RedonnxError, match=r"no size for the dynamic dimensions of x .*--shape"):
        verify(m, m)


def test_shape_hint_must_match_fixed_dims() -> None:
    b = Builder()
    m = b.model([("x", ["n", 3, 8, 8])], [b.op("Relu", ["x"])])
    with pytest.raises(RedonnxError, match="fixed at 8"):
        verify(m, m, shapes={"x": [1, 3, 16, 16]})


def test_one_moved_sample_shows_in_the_worst_sample_cosine() -> None:
    """47 embeddings unchanged, one rotated: the output-wide cosine stays near 1, the per-sample
    minimum shows the moved one (and the summary line says so)."""
    from redonnx.measure.verify import compare_arrays

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((48, 384)).astype(np.float32)
    cand = ref.copy()
    cand[7] = 0.9 * ref[7] + 0.45 * rng.standard_normal(384).astype(np.float32)
    c = compare_arrays("embedding", ref, cand, atol=1.0, rtol=1.0, min_cosine=0.99)
    assert c.cosine > 0.99 and c.passed
    assert c.worst_sample_cosine < 0.95 and "worst sample 0.8" in c.line()


def test_differences_at_the_absolute_floor_are_reported_as_such() -> None:
    """A saturated Sigmoid (max output 1e-4, onnxruntime resolves it to ~1.5e-7) moved by one step of
    its resolution: 1.5e-3 of max|ref|, within atol; the line says so and shows no per-sample cosine
    (cosines of round-off). A real change of the same output is still shown and fails."""
    rng = np.random.default_rng(0)
    ref = (rng.random((4, 1, 16, 16)) * 1e-4).astype(np.float32)
    cand = ref.copy()
    cand[1, 0, 3, 3] += 1.5e-7
    c = compare_arrays("sigmoid", ref, cand, atol=1e-6, rtol=1e-4)
    assert c.passed and c.within_atol and c.needed_rtol > 1e-3
    assert "within atol" in c.line() and "worst sample" not in c.line()
    cand[1] = ref[1, :, ::-1]  # one sample moved
    c = compare_arrays("sigmoid", ref, cand, atol=1e-6, rtol=1e-4)
    assert not c.passed and not c.within_atol and "worst sample" in c.line()


def test_int8_candidates_run_as_deployed_unless_the_target_is_another_runtime(tmp_path: Path, monkeypatch) -> None:
    """A quantized candidate runs with onnxruntime's graph optimizations (its int8 kernels: AVX2's
    saturating pairs are what the user's CPU runs, and fake quantization would not show them); a
    float one, any candidate for another runtime (TensorRT: the QDQ graph as written) and any
    rewrite of a quantized input, without."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import redonnx.measure.verify as V

    model = onnx.load(MLP)
    quantize_dynamic(MLP, tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    q = onnx.load(tmp_path / "q.onnx")
    assert V.is_quantized(q) and not V.is_quantized(model)
    opened = []
    real = V.try_session
    monkeypatch.setattr(
        V, "try_session", lambda m, what, optimize=False: opened.append(optimize) or real(m, what, optimize)
    )
    tol = V.Tolerance(rtol=0.5, min_cosine=0.99)
    ort, trt = V.Reference(model), V.Reference(model, int8_as_deployed=False)
    both = V.AtTwoSizes(ort, V.Reference(model, samples=2), {})
    opened.clear()  # (the references' own sessions)
    deployed = ort.check(q, tol)
    assert deployed.passed and "run as deployed" in deployed.summary() and opened == [True]
    assert not ort.check(model, tol).kernels and opened[-1] is False
    assert not trt.check(q, tol).kernels and opened[-1] is False
    opened.clear()
    assert both.check(q, tol).passed and opened == [True]  # one session for both sizes
    itself = V.Reference(q)  # an INT8 input: its rewrites run as it does, so exact ones compare
    opened.clear()
    assert itself.check(q, V.Tolerance()).passed and opened == [False]


def test_cli_verify_holds_a_written_int8_model_to_its_budget(tmp_path: Path, capsys) -> None:
    """A model prune wrote under its budget (here INT8) fails verify's exact tolerances, and the
    output says how to hold it to the budget; --min-cosine alone is that lossy comparison (prune's
    rtol 0.5 with it), so it passes; a budget it misses still fails."""
    digits, out = MODELS / "digits_resnet.onnx", tmp_path / "q.onnx"
    assert main(["prune", str(digits), "-o", str(out), "--precision", "int8", "--target", "macs"]) == 0
    capsys.readouterr()
    assert main(["verify", str(digits), str(out)]) == 1
    assert "--min-cosine 0.998" in capsys.readouterr().out
    assert main(["verify", str(digits), str(out), "--min-cosine", "0.998"]) == 0
    assert "rtol 0.5" in capsys.readouterr().out
    assert main(["verify", str(digits), str(out), "--min-cosine", "0.998", "--rtol", "1e-4"]) == 1
    assert "exact tolerances" not in capsys.readouterr().out
    assert main(["verify", str(digits), str(out), "--min-cosine", "0.99999999"]) == 1
