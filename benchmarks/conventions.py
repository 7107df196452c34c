"""Which input scale convention the BatchNorm evidence picks, on real images and on our draws.

Run: python benchmarks/conventions.py [--extra model.onnx ...]
Prints two Markdown tables and writes benchmarks/results/conventions.json.

For every shared BatchNorm image model (and each ``--extra`` model: an image model with BatchNorm,
e.g. a Keras export), the realism (:mod:`redonnx.inputs.realism`) at the first BatchNorm layers of inputs
in each convention (normalized, pixels 0..1, -1..1, raw 0..255), measured on:

- real images: the shared CIFAR-10 test images resized to the model's input (luminance for one
  channel) and put in each convention; for models trained on natural images the right convention
  scores highest (issue 20: a face model trained in -1..1 scored 0.992 there against 0.952 in 0..1);
- the previous draws (smooth noise: random at 1/4 resolution, upsampled, blurred);
- the current draws (amplitude spectrum ~ 1/f**e, e per image in 1..1.5, as natural images), with the conventions the
  tool also verifies in (realism gap within its spread over draws of other spectra).

A second table: the realism over every BatchNorm layer in the chosen convention, real against drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from common import SHARED, table, write_json

import redonnx.inputs.specs as specs_mod
from redonnx.inputs import model as IM
from redonnx.inputs import realism as RL
from redonnx.inputs.shapes import resolve_input_shapes
from redonnx.io.files import load_model

MODELS = [  # (name, path under ../shared/models, shape hints, the convention it was trained in)
    ("resnet20_bn", "cifar10/resnet20_bn.onnx", None, "normalized"),
    ("mobilenetv2_features_bn", "imagenet/mobilenetv2_features_bn.onnx", None, "normalized"),
    ("ppocr_mobile_v2_cls", "paddle/ppocr_mobile_v2_cls.onnx", {"x": [1, 3, 48, 192]}, "pixels -1..1"),
]
MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
SHORT = {c.name: c.name.split(" (")[0] for c in IM.CONVENTIONS}


def smooth(shape, channel_axis, rng, exponent=None):
    """The draws before: smooth noise whatever spectrum is asked for."""
    return specs_mod.smooth_noise(shape, channel_axis, rng)


def real_images(model: onnx.ModelProto, name: str, shapes, n: int = 64) -> dict[str, np.ndarray]:
    """CIFAR-10 test images resized to the input, in each convention (NCHW 0..255 -> the layout)."""
    spec = IM.infer_kinds_only(model)[name]
    shape = resolve_input_shapes(model, shapes)[name]
    axis = spec.channel_axis or 1
    c, (h, w) = shape[axis], [d for i, d in enumerate(shape[1:], 1) if i != axis]
    px = np.load(SHARED / "cifar10/cifar10_test_1017.npz")["x"][:n].astype(np.float64)
    px = px[:, :, (np.arange(h) * 32 // h)][:, :, :, (np.arange(w) * 32 // w)]
    if c == 1:
        px = (0.299 * px[:, :1] + 0.587 * px[:, 1:2] + 0.114 * px[:, 2:3]).repeat(1, axis=1)
    out = {
        "normalized (mean 0, std 1)": (px / 255 - MEAN[:, :c]) / STD[:, :c] if c == 3 else (px / 255 - 0.45) / 0.23,
        "pixels 0..1": px / 255,
        "pixels -1..1": px / 127.5 - 1,
        "raw pixels 0..255": px,
    }
    return {k: np.ascontiguousarray(np.moveaxis(v, 1, axis).astype(np.float32)) for k, v in out.items()}


def first_layer_scores(model, name, shapes, first, feeds_of) -> dict[str, float]:
    return {
        c.name: RL.assess(model, feeds_of(c), first, correct=False, prefix=True).overall or 0.0 for c in IM.CONVENTIONS
    }


def drawn(model, name, shapes, conv, seed=7):
    specs = IM.infer_kinds_only(model)
    return IM._probe_feeds(model, specs, specs[name], shapes, conv, seed)


def measure(label: str, model: onnx.ModelProto, shapes, trained: str | None) -> tuple[list[dict], dict]:
    name = next(iter(IM.infer_kinds_only(model)))
    first = IM._first_points(model, RL.bn_points(model))
    real = real_images(model, name, shapes)
    rows = []
    r = first_layer_scores(model, name, shapes, first, lambda c: {name: real[c.name]})
    rows.append({"draws": "real CIFAR-10 images", **r})
    natural = specs_mod.natural_noise
    specs_mod.natural_noise = smooth
    try:
        old = first_layer_scores(model, name, shapes, first, lambda c: drawn(model, name, shapes, c))
        rows.append({"draws": "smooth (before)", **old})
        before = IM.infer(model, shapes).specs[name]
    finally:
        specs_mod.natural_noise = natural
    scores = IM.convention_scores(model, IM.infer_kinds_only(model), IM.infer_kinds_only(model)[name], first, shapes)
    rows.append({"draws": "1/f^(1..1.5) (now)", **scores.score})
    after = IM.infer(model, shapes).specs[name]
    out = []
    for row, chosen in zip(rows, (max(rows[0], key=lambda k: rows[0][k] if k != "draws" else -1),
                                  before.convention, after.convention), strict=True):  # fmt: skip
        out.append({"model": label, "draws": row["draws"], **{SHORT[k]: row[k] for k in SHORT},
                    "chosen": SHORT.get(chosen, chosen), "also verified in": ""})  # fmt: skip
    out[-1]["also verified in"] = ", ".join(SHORT[c] for c in after.plausible or []) or "-"
    out[-1]["spread"] = {SHORT[k]: round(v, 4) for k, v in scores.spread.items()}
    # every BN layer, in the chosen convention
    im = IM.infer(model, shapes)
    conv = after.convention
    full = {"model": label, "convention": SHORT[conv], "trained in": trained or "?"}
    full["real"] = RL.assess(model, {name: real[conv]}, correct=False).overall
    full["1/f^(1..1.5) (now)"] = RL.assess(model, im.draw(model, shapes, 32, 5), correct=False).overall
    specs_mod.natural_noise = smooth
    try:
        full["smooth (before)"] = RL.assess(model, im.draw(model, shapes, 32, 5), correct=False).overall
    finally:
        specs_mod.natural_noise = natural
    return out, full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra", nargs="*", default=[], help="more image models with BatchNorm (not shared)")
    args = ap.parse_args()
    todo = [(n, load_model(SHARED / p).model, s, t) for n, p, s, t in MODELS if (SHARED / p).exists()]
    todo += [(Path(p).stem, load_model(p).model, None, None) for p in args.extra]
    if not todo:
        sys.exit("no models: ../shared/models is absent and no --extra given")
    rows, full = [], []
    for label, model, shapes, trained in todo:
        r, f = measure(label, model, shapes, trained)
        rows += r
        full.append(f)
        print(f"{label}: done", file=sys.stderr)
    for r in rows + full:
        for k, v in r.items():
            if isinstance(v, float):
                r[k] = f"{v:.3f}"
    print(f"written {write_json('conventions', {'first_layers': rows, 'all_layers': full})}")
    print("\nRealism at the first BatchNorm layers, per convention of the inputs:\n")
    print(table(rows, ["model", "draws", *SHORT.values(), "chosen", "also verified in"]))
    print("\nRealism over every BatchNorm layer, in the chosen convention:\n")
    print(table(full, ["model", "convention", "trained in", "real", "smooth (before)", "1/f^(1..1.5) (now)"]))


if __name__ == "__main__":
    main()
