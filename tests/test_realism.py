"""Realism of synthetic inputs against BatchNorm running statistics, and its corrections."""

from __future__ import annotations

import numpy as np
import onnx
from builders import Builder
from conftest import MODELS, cifar_batch, shared_model

import redonnx.inputs.model as input_model
from redonnx.inputs import realism as RL
from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.pipeline import prune, run_passes


def resnet20() -> onnx.ModelProto:
    return load_model(shared_model("cifar10/resnet20_bn.onnx")).model


def test_real_images_score_high_synthetic_close_wrong_scale_poor() -> None:
    model = resnet20()
    x, _ = cifar_batch(64)
    real = RL.assess(model, {"input": x}, correct=False)
    synthetic = RL.assess(model, input_model.infer(model).draw(model, None, 64, 5), correct=False)
    wrong = RL.assess(model, {"input": x * 100}, correct=False)
    assert real.overall > 0.99 and len(real.layers) == 19
    assert 0.93 < synthetic.overall < real.overall
    assert wrong.overall < 0.5 and wrong.poor and not synthetic.poor


def test_wrong_input_scale_is_reported_and_tightens_the_budget(monkeypatch) -> None:
    """Acceptance: synthetic inputs 100x too large show up as a poor realism score; the budget is
    tightened and the summary says why and how to give real inputs."""
    real_infer = input_model.infer

    def times_100(model, shapes=None):
        im = real_infer(model, shapes)
        spec = im.specs["input"]
        spec.mean, spec.std, spec.low, spec.high = spec.mean * 100, spec.std * 100, None, None
        return im

    monkeypatch.setattr(input_model, "infer", times_100)
    res = prune(resnet20())
    assert res.evidence.realism.poor and res.evidence.realism.overall < 0.5
    assert res.verification.min_cosine == 0.9995
    text = res.summary()
    assert "look unlike the data" in text and "--inputs real.npz" in text


def test_corrections_bring_fresh_draws_to_the_running_statistics() -> None:
    model = resnet20()
    im = input_model.infer(model)
    r = RL.assess(model, im.draw(model, None, 64, 1))
    fixed = RL.intervene(model, r.corrections)
    again = RL.assess(fixed, im.draw(fixed, None, 64, 2), RL.bn_points(model), correct=False)
    assert r.overall < 0.98 and again.overall > 0.995
    onnx.checker.check_model(fixed)


def test_corrections_follow_folding_and_cut_channels() -> None:
    """On the folded graph the BN outputs are the convs' outputs: the same corrections apply; a
    tensor that lost channels takes the kept channels' corrections."""
    b = Builder(3)
    y = b.op("Relu", [b.bn(b.conv("x", 3, 6), 6)])
    model = b.model([("x", ["N", 3, 8, 8])], [b.conv(y, 6, 4, k=1, pad=0)])
    feeds = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    r = RL.assess(model, feeds)
    folded, _ = run_passes(model, ["fold-batchnorm"], exact=True)
    a = run(session(RL.intervene(model, r.corrections)), feeds)
    c = run(session(RL.intervene(folded, r.corrections)), feeds)
    np.testing.assert_allclose(a[model.graph.output[0].name], c[model.graph.output[0].name], rtol=1e-4, atol=1e-5)
    t = r.corrections[0].tensor
    cut = RL.intervene(folded, r.corrections, kept={t: [0, 2, 5]})
    mul = next(x for x in cut.graph.initializer if x.name.startswith(f"{t}/redonnx_scale"))
    assert list(mul.dims) == [1, 3, 1, 1]
    scale = onnx.numpy_helper.to_array(mul).reshape(-1)
    np.testing.assert_allclose(scale, r.corrections[0].scale[[0, 2, 5]], rtol=1e-6)


def test_statistics_use_the_corrections(monkeypatch) -> None:
    """Default prune of a BN model: channel statistics are measured on the corrected network."""
    import redonnx.redundancy.statistics as R

    seen = []
    real = R.channel_stats

    def spy(*args, **kw):
        seen.append(kw.get("corrections"))
        return real(*args, **kw)

    monkeypatch.setattr(R, "channel_stats", spy)
    res = prune(MODELS / "digits_resnet.onnx")
    assert seen and seen[0] and len(seen[0]) == len(res.evidence.realism.corrections) == 8
    assert "corrected to the running statistics of 8 BatchNorm layers" in res.summary()
