"""How realistic synthetic activations are, judged by the model's own BatchNorm statistics.

A BatchNormalization layer keeps the mean and variance of its input over the training data. Its
output z = gamma (x - mean) / sqrt(var + eps) + beta therefore has, per channel, mean beta and
standard deviation |gamma| sqrt(var / (var + eps)) on data like the training data. On synthetic
inputs we measure the same per-channel mean m and deviation s and compare, per channel,
N(m, s^2) with the expected N(beta, sd^2) by their Bhattacharyya coefficient

    BC = sqrt(2 s sd / (s^2 + sd^2)) exp(-(m - beta)^2 / (4 (s^2 + sd^2)))

which is 1 for identical distributions and tends to 0 as they separate (a 10x wrong scale gives
0.42, a mean off by 2 deviations 0.61). A layer's *realism* is the mean over its live channels
(gamma not ~0); the model's is the mean over its BN layers. Measured on the shared CIFAR-10
ResNet-20: real images 0.996, our draws (1/f spectrum, colour-correlated) 0.96, white noise 0.92,
inputs 100x too large 0.17. Below :data:`POOR` the synthetic inputs do not look like the data.

Corrections: a per-channel affine z' = a z + c at each BN output brings the synthetic
activations to the expected mean and deviation. Each depends on every correction upstream, so
they are fitted in one pass, layer after layer (:class:`redonnx.measure.segments.Stepper`), and can then
be inserted into any model holding the same tensors (:func:`intervene`): the channel statistics
that relaxed merging fits its compensation to are measured on the corrected network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from redonnx.io import weights
from redonnx.measure.runtime import in_order
from redonnx.measure.segments import Stepper

POOR = 0.9  # model realism below this: synthetic inputs look unlike the data; lossy passes hold back
DEAD = 1e-6  # relative |gamma| below which a channel is constant (beta) whatever the input
SCALE_LIMIT = 100.0


@dataclass
class BNPoint:
    """A BatchNormalization's output and its per-channel mean and deviation on training data."""

    node: str
    tensor: str
    input: str
    mean: np.ndarray
    std: np.ndarray
    scale: np.ndarray  # z = scale * x + shift: the BN as an affine map of its input
    shift: np.ndarray

    @property
    def live(self) -> np.ndarray:
        return self.std > DEAD * max(float(self.std.max(initial=0.0)), 1e-30)


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of initializers and Constant nodes of the main graph, by tensor name."""
    base = weights.external_base(model)
    out = {t.name: weights.tensor_array(t, base) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def bn_points(model: onnx.ModelProto) -> list[BNPoint]:
    """Every inference BatchNormalization of the main graph with constant parameters."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization" and len(n.output) == 1]
    if not bns:
        return []
    values = constant_values(model)
    points = []
    for n in bns:
        if len(n.input) < 5 or not all(x in values for x in n.input[1:5]):
            continue
        g, b, mu, var = (values[x].astype(np.float64).reshape(-1) for x in n.input[1:5])
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        if not (g.size == b.size == mu.size == var.size) or np.any(var < 0):
            continue
        s = g / np.sqrt(var + eps)
        points.append(BNPoint(n.name or n.output[0], n.output[0], n.input[0], b, np.abs(g) * np.sqrt(var / (var + eps)),
                              s, b - mu * s))  # fmt: skip
    return points


def channel_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and deviation over batch and positions (channel axis 1)."""
    x = np.asarray(x)
    if x.ndim < 2:
        x = x[:, None]
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axis=axes, dtype=np.float64)
    sq = np.square(x, dtype=np.float64).mean(axis=axes)
    return mean, np.sqrt(np.maximum(sq - mean**2, 0.0))


def bhattacharyya(m: np.ndarray, s: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Bhattacharyya coefficient of N(m, s^2) and N(mu, sd^2), elementwise."""
    s2, t2 = s**2 + 1e-30, sd**2 + 1e-30
    return np.sqrt(2 * np.sqrt(s2 * t2) / (s2 + t2)) * np.exp(-((m - mu) ** 2) / (4 * (s2 + t2)))


@dataclass
class LayerRealism:
    """How one BN layer's synthetic activations compare with its running statistics."""

    tensor: str
    score: float  # mean Bhattacharyya coefficient over live channels
    mean_shift: float  # median |m - mean| / sd over live channels
    std_ratio: float  # median s / sd over live channels


def layer_realism(point: BNPoint, m: np.ndarray, s: np.ndarray) -> LayerRealism:
    live = point.live
    if not np.any(live):
        return LayerRealism(point.tensor, 1.0, 0.0, 1.0)
    m, s, mu, sd = m[live], s[live], point.mean[live], point.std[live]
    return LayerRealism(
        point.tensor,
        float(np.mean(bhattacharyya(m, s, mu, sd))),
        float(np.median(np.abs(m - mu) / sd)),
        float(np.median(s / sd)),
    )


@dataclass
class Correction:
    """z' = scale * z + shift per channel at ``tensor`` (channel axis 1, tensor rank ``rank``)."""

    tensor: str
    scale: np.ndarray
    shift: np.ndarray
    rank: int
    input: str = ""  # the BN's input, where the output no longer exists (folded forward)
    input_shift: np.ndarray | None = None  # the same correction applied to the input: x' = scale x + input_shift


def correction_for(point: BNPoint, m: np.ndarray, s: np.ndarray, rank: int) -> Correction:
    """The affine map taking per-channel moments (m, s) to the point's expected ones."""
    live = point.live & (s > 1e-12)
    a = np.ones_like(m)
    a[live] = np.clip(point.std[live] / s[live], 1 / SCALE_LIMIT, SCALE_LIMIT)
    c = np.where(point.live, point.mean - a * m, 0.0)
    # on the BN input x (z = k x + t): a z + c = k (a x + x_shift) + t with x_shift = (a t + c - t) / k
    k = point.scale
    ok = np.abs(k) > 1e-12
    x_shift = np.where(ok, (a * point.shift + c - point.shift) / np.where(ok, k, 1.0), 0.0)
    return Correction(point.tensor, a, c, rank, point.input, x_shift)


@dataclass
class Realism:
    """Per-layer realism of synthetic activations, and the corrections that fix their moments."""

    layers: list[LayerRealism] = field(default_factory=list)
    corrections: list[Correction] = field(default_factory=list)
    samples: int = 0

    @property
    def overall(self) -> float | None:
        return float(np.mean([lay.score for lay in self.layers])) if self.layers else None

    @property
    def poor(self) -> bool:
        return self.overall is not None and self.overall < POOR

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": None if self.overall is None else round(self.overall, 4),
            "poor_below": POOR,
            "samples": self.samples,
            "corrected_layers": len(self.corrections),
            "layers": [
                {
                    "tensor": lay.tensor,
                    "score": round(lay.score, 4),
                    "mean_shift": round(lay.mean_shift, 3),
                    "std_ratio": round(lay.std_ratio, 3),
                }
                for lay in self.layers
            ],
        }

    def describe(self) -> str:
        if self.overall is None:
            return "realism unknown (no BatchNorm statistics to compare with)"
        worst = min(self.layers, key=lambda lay: lay.score)
        return (
            f"realism {self.overall:.2f} over {len(self.layers)} BatchNorm layers (1 = like the training data; "
            f"worst {worst.score:.2f} at {worst.tensor})"
        )


def assess(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    points: list[BNPoint] | None = None,
    correct: bool = True,
    prefix: bool = False,
) -> Realism:
    """Realism of ``feeds`` at every BN of ``model`` (or ``points``), and (``correct``) the
    corrections fitted layer after layer in one more pass. ``prefix``: run only as far as the
    last point (realism only)."""
    points = bn_points(model) if points is None else points
    if not points:
        return Realism()
    by_tensor = {p.tensor: p for p in points}
    stepper = Stepper(model, list(by_tensor))
    measured: dict[str, LayerRealism] = {}

    def record(name: str, value: np.ndarray) -> None:
        measured[name] = layer_realism(by_tensor[name], *channel_moments(value))

    corrections: list[Correction] = []

    def fix(name: str, value: np.ndarray) -> np.ndarray:
        corr = correction_for(by_tensor[name], *channel_moments(value), np.ndim(value))
        corrections.append(corr)
        return apply(value, corr.scale, corr.shift).astype(value.dtype)

    runs = [lambda: stepper.run(feeds, record, until=stepper.stops[-1] if prefix else None)]
    if correct:  # the corrected pass does not depend on the plain one: both at once
        runs.append(lambda: stepper.run(feeds, fix))
    for _ in in_order(lambda go: go(), runs):
        pass
    batch = {len(v) for v in feeds.values() if np.ndim(v)}
    return Realism([measured[t] for t in stepper.stops if t in measured], corrections, max(batch, default=1))


def apply(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    shape = (1, -1) + (1,) * (np.ndim(x) - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def intervene(
    model: onnx.ModelProto, corrections: list[Correction], kept: dict[str, list[int]] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` with each correction inserted after its tensor's producer (Mul, Add);
    ``kept`` selects the channels of tensors that lost some. Corrections whose tensor the model
    no longer has are applied to the BN's input where that exists, else skipped."""
    kept = kept or {}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    after: dict[int, list[onnx.NodeProto]] = {}
    for k, corr in enumerate(corrections):
        name, shift = (corr.tensor, corr.shift) if corr.tensor in producer else (corr.input, corr.input_shift)
        if name not in producer or shift is None:
            continue
        scale = corr.scale
        if name in kept:
            scale, shift = scale[kept[name]], shift[kept[name]]
        node = g.node[producer[name]]
        raw = f"{name}/redonnx_raw{k}"
        node.output[list(node.output).index(name)] = raw
        shape = [1, len(scale)] + [1] * (corr.rank - 2)
        a = numpy_helper.from_array(scale.reshape(shape).astype(np.float32), f"{name}/redonnx_scale{k}")
        c = numpy_helper.from_array(shift.reshape(shape).astype(np.float32), f"{name}/redonnx_shift{k}")
        g.initializer.extend([a, c])
        mul = helper.make_node("Mul", [raw, a.name], [f"{raw}_scaled"])
        after.setdefault(producer[name], []).extend([mul, helper.make_node("Add", [mul.output[0], c.name], [name])])
    if after:
        nodes = []
        for i, n in enumerate(g.node):
            nodes.append(n)
            nodes += after.get(i, [])
        del g.node[:]
        g.node.extend(nodes)
    del g.value_info[:]
    return out
