"""Linear reconstruction: precision downdates, regression, and removal of a predictable channel."""

from __future__ import annotations

import numpy as np
import pytest
from builders import Builder
from conftest import assert_equivalent

from redonnx.passes import MergeChannels
from redonnx.pipeline import run_passes
from redonnx.redundancy import statistics as R


@pytest.mark.parametrize("blas_from", [1, 10**9])  # scipy's BLAS update; numpy's, in blocks of a few columns
def test_precision_downdate_matches_inverse_of_the_rest(blas_from: int, monkeypatch) -> None:
    monkeypatch.setattr(R, "BLAS_FROM", blas_from)
    monkeypatch.setattr(R, "UPDATE_BLOCK", 12)  # two columns at a time
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 6))
    cov = np.cov(a, rowvar=False)
    p = R.remove_from_precision(R.precision(cov, ridge=0), 2)
    rest = [0, 1, 3, 4, 5]
    assert np.allclose(p[np.ix_(rest, rest)], np.linalg.inv(cov[np.ix_(rest, rest)]), atol=1e-8)
    p = R.remove_from_precision(p, 4)  # twice: what is left of the rest
    rest = [0, 1, 3, 5]
    assert np.allclose(p[np.ix_(rest, rest)], np.linalg.inv(cov[np.ix_(rest, rest)]), atol=1e-8)


def test_regression_recovers_a_linear_channel() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2000, 3))
    target = 0.5 * a[:, 0] - 2.0 * a[:, 2] + 0.7
    x = np.column_stack([a, target])
    stats = R.Stats(x.mean(0), np.cov(x, rowvar=False))
    b, c = R.regression(stats, [3], [0, 1, 2])
    assert np.allclose(b, [[0.5, 0.0, -2.0]], atol=1e-4) and np.allclose(c, [0.7], atol=1e-4)


def test_predictable_channel_removed_with_compensation() -> None:
    """Channel 3 = 0.5 ch0 - ch1 + 0.2 (no activation between the convs): removing it and
    compensating in the consumer keeps the output; the paper's mean-merge would not."""
    b = Builder()
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    w[3], bias[3] = 0.5 * w[0] - w[1], 0.5 * bias[0] - bias[1] + 0.2
    y = b.op("Conv", ["x", b.const(w), b.const(bias)], pads=[1] * 4, kernel_shape=[3, 3])
    m = b.model([("x", [2, 3, 8, 8])], [b.conv(y, 4, 5, k=1, pad=0)])
    out, (res, _) = run_passes(m, [MergeChannels(alpha=0.25), "cleanup"], exact=False)
    assert res.counts == {"channels removed with reconstruction": 1}
    assert_equivalent(m, out, rtol=1e-3)


def test_statistics_never_use_the_verification_inputs(monkeypatch) -> None:
    """The budget is checked on inputs the reconstruction was not fitted to: for vector inputs
    the synthetic statistics once were the verification samples themselves (same seed)."""
    from redonnx.measure.verify import feeds_for

    b = Builder(5)
    h = b.op("Relu", [b.op("MatMul", ["x", b.rand(32, 24)])])
    model = b.model([("x", ["N", 32])], [b.op("MatMul", [h, b.rand(24, 4)])])
    seen: list[np.ndarray] = []
    real = R.draw_stats_inputs

    def spy(*args, **kw):
        feeds = real(*args, **kw)
        seen.append(feeds["x"])
        return feeds

    monkeypatch.setattr(R, "draw_stats_inputs", spy)
    run_passes(model, [MergeChannels(alpha=0.2)], exact=False)
    assert seen and len(seen[0]) >= 256  # vectors: many samples, not 16
    verification = np.concatenate([f["x"] for f in feeds_for(model, None, None, 8, 0)[0]])
    rows = {r.tobytes() for r in seen[0]}
    assert not any(v.tobytes() in rows for v in verification)


def test_few_rows_do_not_make_channels_free_to_remove() -> None:
    """64 rows of 256 independent channels: the sample covariance is singular, so every channel
    looks exactly predictable from the others (removal cost ~0). The shrunk covariance keeps each
    channel's conditional variance near its variance; with many rows the sample covariance stands."""
    rng = np.random.default_rng(0)
    few = R.Stats.of_rows(rng.standard_normal((64, 256)))
    assert np.all(1.0 / np.diag(few.precision()) > 0.3)  # conditional variances (true value 1)
    sample = np.cov(rng.standard_normal((64, 256)), rowvar=False)
    assert np.median(1.0 / np.diag(R.precision(sample))) < 1e-3
    many = rng.standard_normal((4096, 8))
    assert np.allclose(R.Stats.of_rows(many).cov, np.cov(many, rowvar=False))


def test_statistics_draw_as_many_samples_for_several_inputs() -> None:
    """Three [batch, 37] inputs: 111 values per sample, so 1024 samples (the product of the
    inputs' sizes, 37**3, was once taken for the sum: 20 samples, fewer rows than MLP neurons)."""
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq"]) for n in ("ids", "mask", "types")]
    nodes = [helper.make_node("Add", ["ids", "mask"], ["s"]), helper.make_node("Add", ["s", "types"], ["y"])]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = R.draw_stats_inputs(model, {n: [1, 37] for n in ("ids", "mask", "types")})
    assert {k: v.shape for k, v in feeds.items()} == {n: (1024, 37) for n in ("ids", "mask", "types")}
    assert isinstance(model, onnx.ModelProto)
