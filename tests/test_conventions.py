"""Input scale conventions (issue 20): draws with the spectrum of natural images, and verification in
every convention the BatchNorm evidence cannot rule out."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import shared_model
from onnx import helper, numpy_helper

from redonnx.inputs import model as IM
from redonnx.inputs.specs import NATURAL_SPECTRUM, natural_noise, smooth_noise
from redonnx.io.files import load_model
from redonnx.measure.verify import Reference, Tolerance
from redonnx.passes.base import Pass, PassContext, PassResult
from redonnx.pipeline import prune


def amplitude_law(x: np.ndarray) -> tuple[float, float]:
    """The log-log slope of the radially averaged amplitude spectrum of images x [N, H, W] over
    1/16..0.4 cycles per pixel, and the largest deviation (in log amplitude) from that line."""
    amp = np.abs(np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True))).mean(0)
    f = np.hypot(np.fft.fftfreq(x.shape[1])[:, None], np.fft.fftfreq(x.shape[2])[None, :])
    edges = np.geomspace(1 / 16, 0.4, 9)
    centres = np.log(np.sqrt(edges[:-1] * edges[1:]))
    means = np.log([amp[(f >= a) & (f < b)].mean() for a, b in itertools.pairwise(edges)])
    fit = np.polyfit(centres, means, 1)
    return float(fit[0]), float(np.max(np.abs(np.polyval(fit, centres) - means)))


def test_natural_noise_falls_off_as_one_over_f() -> None:
    """The draws' amplitude spectrum is a power law with the asked exponent (the default: within the
    natural range), unlike smooth noise (random at 1/4 resolution, blurred: its fine scales
    collapse); zero mean, unit variance, colour channels correlated ~0.9."""
    rng = np.random.default_rng(0)
    for e in (1.0, 1.5):
        slope, off = amplitude_law(natural_noise([32, 1, 64, 64], 1, rng, e)[:, 0])
        assert slope == pytest.approx(-e, abs=0.1) and off < 0.1
    slope, off = amplitude_law(natural_noise([64, 1, 64, 64], 1, rng)[:, 0])
    assert -NATURAL_SPECTRUM[1] < slope < -NATURAL_SPECTRUM[0] and off < 0.1
    assert amplitude_law(smooth_noise([32, 1, 64, 64], 1, rng)[:, 0])[1] > 0.5  # no power law
    x = natural_noise([16, 64, 64, 3], 3, rng)  # NHWC
    assert abs(x.mean()) < 1e-6 and x.std() == pytest.approx(1.0)
    assert np.corrcoef(x[..., 0].ravel(), x[..., 1].ravel())[0, 1] == pytest.approx(0.9, abs=0.05)


def test_a_convention_is_plausible_when_its_gap_is_within_the_spread() -> None:
    names = [c.name for c in IM.CONVENTIONS]
    scores = IM.ConventionScores(dict(zip(names, (0.95, 0.94, 0.90, 0.1), strict=True)),
                                 dict(zip(names, (0.005, 0.02, 0.02, 0.0), strict=True)))  # fmt: skip
    assert scores.best is IM.CONVENTIONS[0]
    assert [c.name for c in scores.plausible()] == [names[1]]  # 0.01 within 0.02; 0.05 is not


def with_front(model: onnx.ModelProto, mean: float, std: float) -> onnx.ModelProto:
    """``model`` behind (x - mean) / std: it now expects inputs of that mean and deviation."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        n.input[:] = ["front" if x == "input" else x for x in n.input]
    rest = list(out.graph.node)
    del out.graph.node[:]
    front = [helper.make_node("Mul", ["input", "front_scale"], ["front_scaled"]),
             helper.make_node("Add", ["front_scaled", "front_shift"], ["front"])]  # fmt: skip
    out.graph.node.extend([*front, *rest])
    for name, value in (("front_scale", 1 / std), ("front_shift", -mean / std)):
        out.graph.initializer.append(numpy_helper.from_array(np.full((1, 1, 1, 1), value, np.float32), name))
    return out


@dataclass
class ClampNegatives(Pass):
    """A stand-in for a lossy rewrite that holds on inputs in 0..1 and breaks on -1..1: it clips the
    input at 0 (exact on 0..1 pixels)."""

    name = "clamp-negatives"

    @property
    def exact(self) -> bool:
        return False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        x = graph.inputs[0]
        clipped = gs.Variable("input_clipped", dtype=x.dtype)
        for n in [n for n in graph.nodes if x in n.inputs]:
            n.inputs[n.inputs.index(x)] = clipped
        graph.nodes.append(gs.Node("Relu", inputs=[x], outputs=[clipped]))
        graph.toposort()
        res.count("inputs clipped")
        return res


def ambiguous_resnet20() -> onnx.ModelProto:
    """The shared ResNet-20 behind a front that makes it expect pixels of mean 0.3 and deviation 0.28:
    between 0..1 (0.45, 0.25) and -1..1 (0, 0.5), so the BatchNorm evidence cannot tell them apart."""
    model = with_front(load_model(shared_model("cifar10/resnet20_bn.onnx")).model, 0.3, 0.28)
    spec = IM.infer(model).specs["input"]
    assert spec.convention == "pixels 0..1" and spec.plausible == ["pixels -1..1"], spec.evidence  # the setup
    return model


def test_a_rewrite_that_breaks_a_plausible_convention_is_not_verified() -> None:
    """The chosen convention's draws (0..1) alone would verify the clipped model; the -1..1 draws,
    as plausible, break it: the verification fails and names the convention (the CLI writes nothing)."""
    model = ambiguous_resnet20()
    im = IM.infer(model)
    tol = Tolerance(1e-6, 0.5, 0.998)
    clipped = prune(model, passes=[ClampNegatives()], check=False).model
    assert Reference(model, input_model=im).check(clipped, tol).passed  # what was checked before issue 20
    res = prune(model, passes=[ClampNegatives()])
    v = res.verification
    assert not v.passed and len(v.outputs) == 2
    assert v.outputs[0].passed and not v.outputs[1].passed and "pixels -1..1" in v.outputs[1].name
    text = res.summary()
    assert "checked in each plausible convention: pixels 0..1 (chosen), pixels -1..1" in text
    inputs = res.report()["inputs"]
    assert inputs["conventions_checked"] == {"input": ["pixels 0..1", "pixels -1..1"]} and inputs["conventions_why"]


def test_every_budget_trial_holds_in_each_plausible_convention(monkeypatch) -> None:
    """The default prune's trials and its final check run on draws in both conventions; on given
    inputs only those count."""
    model = ambiguous_resnet20()
    calls: list[int] = []
    real = Reference.check

    def spy(self, candidate, tol, session=None):
        calls.append(id(self))
        return real(self, candidate, tol, session)

    monkeypatch.setattr(Reference, "check", spy)
    res = prune(model, target="macs", min_cosine=0.998)
    assert res.search is not None and len(res.search.trials) >= 2
    per_reference = Counter(calls)  # the chosen convention's reference and the plausible one's
    assert len(per_reference) == 2 and len(set(per_reference.values())) == 1
    assert calls[0::2] == [calls[0]] * len(calls[0::2])  # each check: the chosen, then the other
    assert per_reference[calls[0]] >= len(res.search.trials) + 1  # every trial and the final check
    assert any("pixels -1..1" in o.name for o in res.verification.outputs) and res.verification.passed
    x = np.random.default_rng(0).random((4, 3, 32, 32), np.float32)
    given = prune(model, passes=[ClampNegatives()], inputs={"input": x})
    assert given.verification.passed and not given.evidence.conventions_checked  # 0..1 data: exact


def test_probe_noise_drawn_once_gives_each_conventions_draws() -> None:
    """The convention probes draw each variant's noise once and scale it per convention: the same
    values as drawing in that convention (so the scores, and the choice, are the same)."""
    model = load_model(shared_model("cifar10/resnet20_bn.onnx")).model
    specs = IM.infer(model).specs
    spec = next(s for s in specs.values() if s.kind == "image")
    for seed, e in [(7, None), (8, NATURAL_SPECTRUM[0])]:
        z = IM._probe_feeds(model, specs, spec, None, IM.UNIT, seed, e, dtype="float64")[spec.name]
        for conv in IM.CONVENTIONS:
            drawn = IM._probe_feeds(model, specs, spec, None, conv, seed, e)[spec.name]
            scaled = IM._as_convention(z, conv, spec.dtype)
            assert scaled.dtype == drawn.dtype and np.array_equal(scaled, drawn), conv.name
