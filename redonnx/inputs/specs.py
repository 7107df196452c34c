"""Input specs and how to draw them: :class:`InputSpec` (one input's kind, range and evidence),
:class:`InputModel` (every input of a model) and the drawing of each kind (noise with the spectrum of natural images,
masks, ids), as described in :mod:`redonnx.inputs.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from redonnx.errors import RedonnxError
from redonnx.inputs.shapes import graph_inputs, resolve_input_shapes

COLOUR_CORRELATION = 0.9  # between the RGB channels of natural images (0.79-0.91 on the CIFAR-10 images)
#: Natural images' amplitude spectra fall off as 1/f**e with e about 1 to 1.5 from image to image (power
#: 1/f**2 to 1/f**3; Tolhurst, Tadmor & Chao 1992: mean 1.2; the shared CIFAR-10 test images: 1.48).
#: Each drawn image takes its own e, uniform over this range.
NATURAL_SPECTRUM = (1.0, 1.5)


@dataclass
class InputSpec:
    """One input: its kind, how to draw it, and why we think so."""

    name: str
    dtype: str
    # image | vector | token ids | type ids | mask | integers | booleans | compared values | needs value | given
    kind: str
    evidence: str
    mean: float = 0.0
    std: float = 1.0
    low: float | None = None
    high: float | None = None  # integers: exclusive
    channel_axis: int | None = None
    convention: str | None = None
    spectrum: float | None = None  # images: amplitude ~ 1/f**spectrum (None: per image over NATURAL_SPECTRUM)
    plausible: list[str] | None = None  # other conventions the evidence cannot rule out (checked too)
    values: np.ndarray | None = field(default=None, repr=False)  # given: the observed values (or rows)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "values" and v is not None}
        if self.kind == "compared values" and self.values is not None:
            d["values"] = self.values.tolist()
        return d

    def describe(self) -> str:
        rng = ""
        if self.kind in ("token ids", "type ids", "integers"):
            rng = f" in [{self.low:g}, {self.high:g})"
        elif self.kind == "compared values" and self.values is not None:
            rng = " " + ", ".join(f"{v:g}" for v in self.values)
        elif self.convention:
            rng = f", {self.convention}"
        elif self.kind in ("image", "vector"):
            rng = f", mean {self.mean:.3g} std {self.std:.3g}"
        return f"{self.name}: {self.kind}{rng} ({self.evidence})"


@dataclass
class InputModel:
    """How to draw every input of a model."""

    specs: dict[str, InputSpec]
    source: str  # "inferred from the graph" or "fitted to the given inputs"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "inputs": [s.to_dict() for s in self.specs.values()]}

    def describe(self) -> str:
        return "; ".join(s.describe() for s in self.specs.values())

    def npz_hint(self) -> str:
        return ", ".join(f"{s.name}: {s.dtype}" for s in self.specs.values())

    def missing_values(self) -> list[InputSpec]:
        return [s for s in self.specs.values() if s.kind == "needs value"]

    def cases(self) -> int:
        """How many draws cover every value of the inputs drawn from compared values (1 if none)."""
        return max((len(s.values) for s in self.specs.values() if s.kind == "compared values"), default=1)

    def cases_note(self, samples: int, every: int = 1) -> str:
        """Which samples hold which compared value, when sample k is drawn as case ``k // every``."""
        specs = [s for s in self.specs.values() if s.kind == "compared values"]
        counts = np.bincount((np.arange(samples) // every) % self.cases(), minlength=self.cases())
        return "; ".join(f"{s.name} = " + ", ".join(f"{v:g} on {counts[i::len(s.values)].sum()}"
                                                   for i, v in enumerate(s.values)) for s in specs)  # fmt: skip

    def draw(self, model: onnx.ModelProto, shapes: dict[str, list[int]] | None, batch: int, seed: int,
             white: bool = False, case: int | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """Seeded inputs of the right shapes, dtypes, kinds and ranges; ``white``: images as white
        noise at the same scale (a second kind of sample for verification); ``case``: which value
        inputs drawn from compared values take (value ``case`` modulo their count; random if None)."""
        self.check_values()
        concrete = resolve_input_shapes(model, shapes, batch=batch)
        if batch_is_leading(model):  # a hint fixes the sample's shape, not how many samples
            concrete = {k: [batch, *v[1:]] if v else v for k, v in concrete.items()}
        return self.draw_at(concrete, seed, white, case)

    def draw_at(self, concrete: dict[str, list[int]], seed: int, white: bool = False,
                case: int | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """:meth:`draw` at shapes already resolved (batch included; see :class:`redonnx.inputs.sizes.Settled`)."""
        self.check_values()
        rng = np.random.default_rng(seed)
        return {name: _draw(spec, concrete[name], rng, white, case) for name, spec in self.specs.items()}

    def check_values(self) -> None:
        """Refuse to draw when an input needs a real value (see :func:`need_values_message`)."""
        need = self.missing_values()
        if need:
            raise RedonnxError(need_values_message(need))


def batch_is_leading(model: onnx.ModelProto) -> bool:
    """Does every input have a dynamic leading dimension (the batch, shared by all)? Models whose
    state inputs carry the batch elsewhere (RNN states [layers, batch, hidden]) are drawn at the
    hinted shapes."""
    dims = [vi.type.tensor_type.shape.dim for vi in graph_inputs(model)]
    return bool(dims) and all(d and not d[0].HasField("dim_value") for d in dims)


def need_values_message(specs: list[InputSpec]) -> str:
    s = specs[0]
    return (f"input {s.name!r} needs a real value: {s.evidence}; synthetic values would not exercise the model as "
            f"it is used. Pass --inputs file.npz with an array named {s.name!r} (and the other inputs)")  # fmt: skip


# ------------------------------------------------------------------ drawing


def _draw(
    spec: InputSpec, shape: list[int], rng: np.random.Generator, white: bool = False, case: int | None = None
) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if spec.kind == "compared values" and spec.values is not None:
        v = spec.values[case % len(spec.values)] if case is not None else rng.choice(spec.values)
        return np.full(shape, v, dtype)
    if spec.kind in ("token ids", "type ids", "integers"):
        if spec.values is not None:  # given: the values seen
            return rng.choice(spec.values, size=shape).astype(dtype)
        return rng.integers(int(spec.low or 0), int(spec.high or 8), size=shape).astype(dtype)
    if spec.kind == "mask":
        return _mask(shape, rng, spec.values).astype(dtype)
    if spec.kind == "booleans":
        return rng.random(shape) < 0.5
    if spec.kind == "given":  # e.g. a sample rate: exactly as given
        return np.broadcast_to(spec.values, shape).astype(dtype) if spec.values is not None else np.zeros(shape, dtype)
    if spec.kind == "image" and len(shape) == 4 and spec.channel_axis is not None and not white:
        z = natural_noise(shape, spec.channel_axis, rng, spec.spectrum)
    else:
        z = rng.standard_normal(shape)
    x = spec.mean + spec.std * z
    if spec.low is not None or spec.high is not None:
        x = np.clip(x, spec.low, spec.high)
    return x.astype(dtype)


def _mask(shape: list[int], rng: np.random.Generator, rows: np.ndarray | None) -> np.ndarray:
    if rows is not None and rows.ndim == len(shape) and list(rows.shape[1:]) == list(shape[1:]):
        return rows[rng.integers(0, len(rows), size=shape[0])]
    m = np.ones(shape)
    if len(shape) == 2 and shape[1] > 1:
        for i, n in enumerate(rng.integers(-(-shape[1] // 2), shape[1] + 1, size=shape[0])):
            m[i, n:] = 0
    return m


def smooth_noise(shape: list[int], channel_axis: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-variance noise with the coarse spatial structure and correlated colour
    channels of natural images (random at 1/4 resolution, upsampled and blurred)."""
    spatial = [ax for ax in range(1, 4) if ax != channel_axis]
    low = [d if ax not in spatial else max(d // 4, 1) for ax, d in enumerate(shape)]
    y = rng.standard_normal(low)
    channels = shape[channel_axis]
    if channels in (3, 4):
        lum_shape = list(low)
        lum_shape[channel_axis] = 1
        y = np.sqrt(1 - COLOUR_CORRELATION) * y + np.sqrt(COLOUR_CORRELATION) * rng.standard_normal(lum_shape)
    for ax in spatial:
        y = np.repeat(y, -(-shape[ax] // y.shape[ax]), axis=ax).take(range(shape[ax]), axis=ax)
        if shape[ax] >= 3:
            y = (y + np.roll(y, 1, ax) + np.roll(y, -1, ax)) / 3.0
    return (y - y.mean()) / max(float(y.std()), 1e-12)


def natural_noise(
    shape: list[int], channel_axis: int, rng: np.random.Generator, exponent: float | None = None
) -> np.ndarray:
    """Zero-mean unit-variance noise with the spectrum of natural images: white noise shaped in the
    Fourier domain to an amplitude ~ 1/f**e (random phase; every octave of scale carries about
    the same contrast, from the image's mean brightness, drawn as its lowest frequency, down to
    single pixels), e drawn per image over :data:`NATURAL_SPECTRUM` (``exponent``: one e for all),
    the colour channels correlated as in natural images. Smooth noise (:func:`smooth_noise`)
    lacks the fine scales a first 3x3 layer responds to and misled the choice of an input's scale
    (issue 20)."""
    h_ax, w_ax = (ax for ax in range(1, 4) if ax != channel_axis)
    y = rng.standard_normal(shape)
    if shape[channel_axis] in (3, 4):
        lum_shape = list(shape)
        lum_shape[channel_axis] = 1
        y = np.sqrt(1 - COLOUR_CORRELATION) * y + np.sqrt(COLOUR_CORRELATION) * rng.standard_normal(lum_shape)
    h, w = shape[h_ax], shape[w_ax]
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])  # cycles per pixel
    view = [1, 1, 1, 1]
    view[h_ax], view[w_ax] = h, w // 2 + 1
    e = rng.uniform(*NATURAL_SPECTRUM, size=(shape[0], 1, 1, 1)) if exponent is None else exponent
    amplitude = np.maximum(f, 1.0 / max(h, w)).reshape(view) ** -e
    amplitude = amplitude / np.sqrt(np.mean(amplitude**2, axis=(h_ax, w_ax), keepdims=True))  # e: where, not how much
    z = np.fft.irfft2(np.fft.rfft2(y, axes=(h_ax, w_ax)) * amplitude, s=(h, w), axes=(h_ax, w_ax))
    return (z - z.mean()) / max(float(z.std()), 1e-12)
