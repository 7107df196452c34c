"""What each input of a model holds, inferred from the graph without data, and how to draw it.

Every lossy decision and every synthetic verification runs on drawn inputs, so they must look like
the model's data. Each graph input gets a *kind*, a range and the evidence for them:

- **images** (4-D floats): noise with the spectrum of natural images (amplitude ~ 1/f**e, e per
  image in 1..1.5) with the colour channels correlated as in natural images (0.9), at the scale
  the model expects. The scale is a convention (normalized N(0, 1), pixels in 0..1, -1..1 or raw
  0..255). Where the model has BatchNorm, the convention whose activations at the first BatchNorm
  layers best match their running mean and variance wins (:mod:`redonnx.inputs.realism`); a rival whose
  realism is within the spread that drawing other spectra (e = 1, e = 1.5) gives either one is
  *plausible* too, and verification holds in it as well (:func:`alternatives`). Otherwise the gain
  of the first weighted layer decides, measured through whatever reaches it (Transpose,
  Mul/Sub/Div by constants, Keras Rescaling): a trained layer's gain is 0.2-1.7 on normalized
  inputs and ~0.02 on raw pixels, so below 0.1 the inputs are raw pixels.
- **vectors** (other floats): N(0, 1), or a convention chosen by BatchNorm evidence as above.
- **token ids** (integers that index a Gather of a constant table, through Cast, Reshape,
  Unsqueeze...): uniform in [0, rows of the smallest table); tables of <= 2 rows: type ids.
- **masks** (integers or booleans cast to float for arithmetic, or compared, with several
  elements): ones on a prefix of each row at least half its length.
- **values the graph compares with constants** (a single number only compared: silero-vad's
  sample rate, ``Equal(sr, 16000)`` before an If): drawn as each constant and one value per
  outcome of the comparisons (16000 and 8000); verification covers every value (see
  :mod:`redonnx.inputs.kinds`).
- **values the graph branches on otherwise** (a single number used by If/Loop, as a shape, in
  arithmetic, or compared with no constant): cannot be drawn; the error names the input and asks
  for ``--inputs``.

Given inputs (``--inputs``) replace the inference: :func:`from_given` fits the same kinds to the
arrays (their value sets, scales and shapes), so synthetic samples drawn for statistics are valid
and distinct from the samples verification uses.

The pieces live in :mod:`redonnx.inputs.specs` (specs, drawing) and :mod:`redonnx.inputs.kinds`
(kinds from the graph); this module chooses the scales and fits given inputs, and re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from redonnx.inputs import realism as RL
from redonnx.inputs.kinds import BRANCHING as BRANCHING
from redonnx.inputs.kinds import FLOATS as FLOATS
from redonnx.inputs.kinds import PASS_THROUGH as PASS_THROUGH
from redonnx.inputs.kinds import SHAPE_SLOTS as SHAPE_SLOTS
from redonnx.inputs.kinds import Constants as Constants
from redonnx.inputs.kinds import constant_info as constant_info
from redonnx.inputs.kinds import infer_kinds_only
from redonnx.inputs.shapes import graph_inputs, resolve_input_shapes
from redonnx.inputs.specs import COLOUR_CORRELATION as COLOUR_CORRELATION
from redonnx.inputs.specs import NATURAL_SPECTRUM as NATURAL_SPECTRUM
from redonnx.inputs.specs import InputModel, InputSpec
from redonnx.inputs.specs import batch_is_leading as batch_is_leading
from redonnx.inputs.specs import natural_noise as natural_noise
from redonnx.inputs.specs import need_values_message as need_values_message
from redonnx.inputs.specs import smooth_noise as smooth_noise
from redonnx.measure.runtime import in_order
from redonnx.measure.segments import Stepper


@dataclass(frozen=True)
class Convention:
    name: str
    mean: float
    std: float
    low: float | None = None
    high: float | None = None


NORMALIZED = Convention("normalized (mean 0, std 1)", 0.0, 1.0)
UNIT = Convention("unit noise", 0.0, 1.0)  # the probes' noise, before a convention scales it
RAW_PIXELS = Convention("raw pixels 0..255", 115.0, 64.0, 0.0, 255.0)
CONVENTIONS = (
    NORMALIZED,
    Convention("pixels 0..1", 0.45, 0.25, 0.0, 1.0),
    Convention("pixels -1..1", 0.0, 0.5, -1.0, 1.0),
    RAW_PIXELS,
)
PIXEL_GAIN = 0.1  # first-layer gain below which inputs are raw 0..255 pixels (see module doc)
SCALE_PROBES = 16  # images drawn to compare conventions
#: Amplitude-spectrum exponents of the draws that bound how much a convention's realism depends on
#: the image texture assumed: the ends of natural images' range.
SPECTRUM_RANGE = NATURAL_SPECTRUM


def infer(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> InputModel:
    """The input model of ``model`` from its graph alone (see the module doc)."""
    specs = infer_kinds_only(model)
    _choose_scales(model, specs, shapes)
    return InputModel(specs, "inferred from the graph")


# ------------------------------------------------------------------ scale of float inputs


def _choose_scales(model: onnx.ModelProto, specs: dict[str, InputSpec], shapes: dict[str, list[int]] | None) -> None:
    floats = [s for s in specs.values() if s.kind in ("image", "vector")]
    if not floats:
        return
    points = RL.bn_points(model)
    first = _first_points(model, points) if points else []
    for spec in floats:
        if first and len(floats) == 1:
            try:
                _by_batchnorm(model, specs, spec, first, shapes)
                continue
            except Exception:
                pass
        _by_gain(model, specs, spec, shapes)


def _first_points(model: onnx.ModelProto, points: list[RL.BNPoint]) -> list[RL.BNPoint]:
    """BN layers with no other BN upstream: the ones an input's scale decides directly."""
    by_tensor = {p.tensor: p for p in points}
    above: dict[str, bool] = {}  # tensor -> has a BN output upstream (or is one)
    for n in model.graph.node:
        up = any(above.get(x, False) for x in n.input)
        for o in n.output:
            above[o] = up or o in by_tensor
    bn_inputs_clean = [p for p in points if not above.get(p.input, False)]
    return bn_inputs_clean


def _probe_feeds(model, specs, spec, shapes, conv: Convention, seed: int = 7, spectrum: float | None = None,
                 dtype: str | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Draws for the convention probes, input ``spec`` in ``conv`` (``dtype``: drawn as that type)."""
    trial = {k: (InputSpec(**{**v.__dict__}) if k != spec.name else
                 InputSpec(**{**v.__dict__, "mean": conv.mean, "std": conv.std, "low": conv.low, "high": conv.high,
                              "spectrum": spectrum, "dtype": dtype or v.dtype}))
             for k, v in specs.items()}  # fmt: skip
    per_sample = max(int(np.prod([d for d in resolve_input_shapes(model, shapes)[spec.name][1:]])), 1)
    batch = int(np.clip(2**19 // per_sample, 2, SCALE_PROBES if spec.kind == "image" else 64))
    return InputModel(trial, "").draw(model, shapes, batch=batch, seed=seed)


def _as_convention(z: np.ndarray, conv: Convention, dtype: str) -> np.ndarray:
    """Unit noise ``z`` (float64) as the input drawn in ``conv`` from the same noise (the same values)."""
    x = conv.mean + conv.std * z
    if conv.low is not None or conv.high is not None:
        x = np.clip(x, conv.low, conv.high)
    return x.astype(dtype)


@dataclass
class ConventionScores:
    """Realism of each convention's draws at the first BatchNorm layers: on the default draws, and
    its spread over draws of other image spectra and seeds (how much the measurement itself moves)."""

    score: dict[str, float]
    spread: dict[str, float]

    @property
    def best(self) -> Convention:
        return max(CONVENTIONS, key=lambda c: self.score[c.name])

    def plausible(self) -> list[Convention]:
        """Conventions other than the best whose realism gap to it is within the spread of either:
        a gap that changing the draws can close or reverse is no evidence (issue 20: smooth draws
        preferred 0..1 by 0.04 on a model trained in -1..1)."""
        b = self.best
        return [c for c in CONVENTIONS if c is not b and
                self.score[b.name] - self.score[c.name] <= max(self.spread[b.name], self.spread[c.name])]  # fmt: skip


def convention_scores(model, specs, spec: InputSpec, first: list[RL.BNPoint], shapes) -> ConventionScores:
    """Each convention's realism on the default draws and on draws at the ends of natural images'
    spectra (:data:`SPECTRUM_RANGE`; vectors: another seed)."""
    others = [(8 + k, e) for k, e in enumerate(SPECTRUM_RANGE)] if spec.kind == "image" else [(8, None)]
    variants = [(7, None), *others]

    def realism(job: tuple) -> float:
        conv, feeds = job
        feeds = {**feeds, spec.name: _as_convention(feeds[spec.name], conv, spec.dtype)}
        return RL.assess(model, feeds, first, correct=False, prefix=True).overall or 0.0

    # each variant's noise drawn once, then scaled to each convention: what drawing in it would give
    noise = list(in_order(lambda v: _probe_feeds(model, specs, spec, shapes, UNIT, *v, dtype="float64"), variants))
    jobs = [(conv, feeds) for conv in CONVENTIONS for feeds in noise]
    got = list(in_order(realism, jobs))  # side by side, in order
    score, spread = {}, {}
    for k, conv in enumerate(CONVENTIONS):
        vals = got[k * len(variants) : (k + 1) * len(variants)]
        score[conv.name], spread[conv.name] = vals[0], max(vals) - min(vals)
    return ConventionScores(score, spread)


def _by_batchnorm(model, specs, spec: InputSpec, first: list[RL.BNPoint], shapes) -> None:
    scores = convention_scores(model, specs, spec, first, shapes)
    best = scores.best
    others = ", ".join(f"{c.name} {scores.score[c.name]:.2f}" for c in CONVENTIONS if c is not best)
    realism = scores.score[best.name]
    _set(spec, best, f"the first BatchNorm layers' running statistics: realism {realism:.2f} ({others})")
    close = scores.plausible()
    if close:
        spec.plausible = [c.name for c in close]
        gaps = ", ".join(f"{c.name} {scores.score[best.name] - scores.score[c.name]:.3f} within "
                         f"{max(scores.spread[best.name], scores.spread[c.name]):.3f}" for c in close)  # fmt: skip
        spec.evidence += (f"; also plausible, so verified in too: {gaps} (realism gap within its spread over "
                          "draws of other image spectra)")  # fmt: skip


def in_convention(im: InputModel, name: str, convention: str) -> InputModel:
    """A copy of ``im`` that draws input ``name`` in another convention (by name)."""
    conv = next(c for c in CONVENTIONS if c.name == convention)
    specs = {k: InputSpec(**v.__dict__) for k, v in im.specs.items()}
    _set(specs[name], conv, f"{convention}: also plausible ({im.specs[name].convention} chosen)")
    specs[name].plausible = None
    return InputModel(specs, im.source)


def alternatives(im: InputModel) -> list[tuple[str, str, InputModel]]:
    """(input, convention, input model drawing it so) for every plausible convention besides the
    chosen one: what a verification must hold on too."""
    return [(s.name, c, in_convention(im, s.name, c)) for s in im.specs.values() for c in s.plausible or []]


def _set(spec: InputSpec, conv: Convention, evidence: str) -> None:
    spec.mean, spec.std, spec.low, spec.high = conv.mean, conv.std, conv.low, conv.high
    spec.convention = conv.name
    spec.evidence = evidence


LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _first_layer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    """The first weighted layer the input reaches, its weight not computed from any input."""
    from_input = {name}
    from_any = {vi.name for vi in graph_inputs(model)}
    for n in model.graph.node:
        if n.op_type in LAYERS and len(n.input) > 1 and n.input[0] in from_input and n.input[1] not in from_any:
            return n
        if any(x in from_input for x in n.input):
            from_input.update(o for o in n.output if o)
        if any(x in from_any for x in n.input):
            from_any.update(o for o in n.output if o)
    return None


def _by_gain(model, specs, spec: InputSpec, shapes) -> None:
    """The first layer's gain on unit white noise, through whatever leads to it."""
    if spec.kind != "image":
        spec.convention = NORMALIZED.name
        spec.evidence += "; no BatchNorm statistics to fit a scale: N(0, 1)"
        return
    layer = _first_layer(model, spec.name)
    if layer is None:
        _set(spec, NORMALIZED, "no weighted layer found to judge the scale: assumed normalized")
        return
    try:
        stepper = Stepper(model, [layer.output[0]])
        probe = InputModel({k: InputSpec(**v.__dict__) for k, v in specs.items()}, "")
        probe.specs[spec.name].kind = "vector"  # white noise, unit variance: the gain's definition
        probe.specs[spec.name].low = probe.specs[spec.name].high = None
        probe.specs[spec.name].mean, probe.specs[spec.name].std = 0.0, 1.0
        feeds = probe.draw(model, shapes, batch=2, seed=5)
        y = stepper.run(feeds, until=layer.output[0])[layer.output[0]].astype(np.float64)
        zero = {k: (np.zeros_like(v) if k == spec.name else v) for k, v in feeds.items()}
        y0 = stepper.run(zero, until=layer.output[0])[layer.output[0]].astype(np.float64)
    except Exception:
        _set(spec, NORMALIZED, "the first layer could not be run alone: assumed normalized")
        return
    d = np.moveaxis(y - y0, 1 if layer.op_type != "MatMul" else -1, -1)
    gain = float(np.sqrt(np.mean(d.reshape(-1, d.shape[-1]).var(0))))
    conv = RAW_PIXELS if gain < PIXEL_GAIN else NORMALIZED
    _set(spec, conv, f"no BatchNorm statistics; first layer {layer.name or layer.op_type} has gain {gain:.3g} on unit "
                     f"noise ({'<' if gain < PIXEL_GAIN else '>='} {PIXEL_GAIN}: "
                     f"{'raw pixels' if conv is RAW_PIXELS else 'normalized inputs'})")  # fmt: skip


# ------------------------------------------------------------------ fitted to given inputs


def from_given(model: onnx.ModelProto, given: dict[str, np.ndarray]) -> InputModel:
    """The input model of arrays the user gave: same kinds, their values and scales."""
    inferred = infer_kinds_only(model)
    specs: dict[str, InputSpec] = {}
    for name, x in given.items():
        base = inferred.get(name)
        x = np.asarray(x)
        dtype = x.dtype.name
        if x.dtype.kind == "f":
            kind = base.kind if base is not None and base.kind in ("image", "vector") else "vector"
            axis = base.channel_axis if base is not None else None
            spec = InputSpec(name, dtype, kind, f"fitted to the {len(x) if x.ndim else 1} given samples",
                             mean=float(x.mean()), std=float(x.std()) or 1.0, low=float(x.min()), high=float(x.max()),
                             channel_axis=axis if kind == "image" else None)  # fmt: skip
        elif x.size <= 1 or (base is not None and base.kind in ("needs value", "compared values")):
            spec = InputSpec(name, dtype, "given", "used exactly as given", values=x.reshape(-1)[:1])
        elif base is not None and base.kind == "mask" and x.ndim >= 1:
            spec = InputSpec(name, dtype, "mask", "rows of the given masks", values=x)
        elif x.dtype == np.bool_:
            spec = InputSpec(name, dtype, "booleans", "given booleans")
        else:
            vals = np.unique(x)
            kind = base.kind if base is not None and base.kind in ("token ids", "type ids") else "integers"
            spec = InputSpec(name, dtype, kind, f"the {len(vals)} distinct values given", low=float(vals.min()),
                             high=float(vals.max()) + 1, values=vals)  # fmt: skip
        specs[name] = spec
    return InputModel(specs, "fitted to the given inputs")


def given_shapes(model: onnx.ModelProto, given: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Shape hints from given arrays: one sample's shape (a dynamic leading dimension becomes 1)."""
    out = {}
    for vi in graph_inputs(model):
        if vi.name in given:
            shape = list(np.shape(given[vi.name]))
            dims = vi.type.tensor_type.shape.dim
            if shape and dims and not dims[0].HasField("dim_value"):
                shape[0] = 1
            out[vi.name] = shape
    return out
