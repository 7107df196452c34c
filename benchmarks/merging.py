"""Relaxed channel merging against onnxsim's L2 structured pruning at equal MACs removed.

Run: python benchmarks/merging.py [--quick]
Prints Markdown tables and writes benchmarks/results/merging.json.

For each alpha, redonnx removes channels with the paper's rule (merge the closest rows, mean
rows) and with the reconstruction rule (default: remove the channels the others predict best,
compensate in the consumers; statistics from synthetic inputs, or from 64 CIFAR images held out
of the evaluation). onnxsim's apply_structured_pruning is then searched for the sparsity that
removes the same share of MACs. ResNet-20 and the Keras ResNet-8 are scored by top-1 on the
shared CIFAR-10 images (the 64 calibration images excluded); the others by output cosine on
random inputs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import SHARED, table, write_json

from redonnx.io.files import load_model
from redonnx.measure.cost import model_cost
from redonnx.measure.runtime import random_inputs, run, session
from redonnx.passes import MergeChannels, PassContext
from redonnx.pipeline import run_passes

N_CALIB = 64


def cifar(nhwc: bool, normalize: bool):
    data = np.load(SHARED / "cifar10/cifar10_test_1017.npz")
    x = data["x"].astype(np.float32)
    if normalize:
        mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
        std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
        x = (x / 255 - mean) / std
    if nhwc:
        x = x.transpose(0, 2, 3, 1)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = data["y"].astype(np.int64)
    return (x[:-N_CALIB], y[:-N_CALIB]), x[-N_CALIB:]


MODELS = [
    ("resnet20", "cifar10/resnet20_bn.onnx", {"nhwc": False, "normalize": True}, {}),
    ("tf_resnet8", "tf/mlperf_tiny_resnet8_cifar10.onnx", {"nhwc": True, "normalize": False}, {}),
    ("mobilenetv2", "imagenet/mobilenetv2_features_bn.onnx", None, {}),
    ("tf_autoencoder", "tf/mlperf_tiny_fc_autoencoder.onnx", None, {}),
    ("paddle_ocr_cls", "paddle/ppocr_mobile_v2_cls.onnx", None, {"x": [1, 3, 48, 192]}),
]


class Scorer:
    """Top-1 on CIFAR images, or cosine of outputs on fixed random inputs."""

    def __init__(self, model, cifar_kw, shapes):
        name = model.graph.input[0].name
        if cifar_kw is not None:
            (x, self.y), self.calib = cifar(**cifar_kw)
            self.feeds = {name: x}
            self.calib = {name: self.calib}
        else:
            self.y, self.calib = None, None
            self.feeds = random_inputs(model, shapes or None, batch=8 if not shapes else 1, seed=3)
        self.ref = self.outputs(model)

    def outputs(self, model):
        return next(iter(run(session(model), self.feeds).values()))

    def score(self, model) -> float:
        out = self.outputs(model)
        if self.y is not None:
            return float(np.mean(out.argmax(1) == self.y))
        a, b = self.ref.reshape(-1).astype(np.float64), out.reshape(-1).astype(np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def onnxsim_at(base, macs_target: float, c0, shapes):
    """onnxsim L2 structured pruning at the sparsity removing closest to ``macs_target`` of the MACs."""
    import onnxsim

    lo, hi, best, best_gap = 0.0, 0.9, (None, None), float("inf")
    for _ in range(7):
        sp = (lo + hi) / 2
        try:
            m = onnxsim.apply_structured_pruning(base, sparsity=sp)
        except Exception:  # onnxsim refuses some graphs
            return None, None
        removed = 1 - model_cost(m, shapes or None).macs / c0.macs
        if abs(removed - macs_target) < best_gap:
            best, best_gap = (m, sp), abs(removed - macs_target)
        lo, hi = (sp, hi) if removed < macs_target else (lo, sp)
    return best


def sweep(label, rel, cifar_kw, shapes, alphas) -> list[dict]:
    src = load_model(SHARED / rel).model
    base, _ = run_passes(src, None, exact=True)
    scorer = Scorer(base, cifar_kw, shapes)
    c0 = model_cost(base, shapes or None)
    rows = [{"model": label, "method": "original", "score": scorer.score(base), "params -%": 0.0, "MACs -%": 0.0}]
    settings = [("paper", {"criterion": "paper"}, None), ("reconstruct", {}, None)]
    if scorer.calib is not None:
        settings.append(("reconstruct + 64 images", {}, scorer.calib))
    for alpha in alphas:
        for method, params, calib in settings:
            t0 = time.perf_counter()
            m, _ = run_passes(base, [MergeChannels(alpha=alpha, **params), "cleanup"], exact=False,
                              ctx=PassContext(shapes=shapes or None, calibration=calib))  # fmt: skip
            c = model_cost(m, shapes or None)
            rows.append({"model": label, "method": method, "alpha": alpha, "score": scorer.score(m),
                         "params -%": 100 * (1 - c.params / c0.params), "MACs -%": 100 * (1 - c.macs / c0.macs),
                         "seconds": time.perf_counter() - t0})  # fmt: skip
        ours = rows[-len(settings) + 1]  # the data-free reconstruction point
        sim, sp = onnxsim_at(base, ours["MACs -%"] / 100, c0, shapes)
        if sim is not None:
            c = model_cost(sim, shapes or None)
            rows.append({"model": label, "method": f"onnxsim L2 (sparsity {sp:.3f})", "alpha": alpha,
                         "score": scorer.score(sim), "params -%": 100 * (1 - c.params / c0.params),
                         "MACs -%": 100 * (1 - c.macs / c0.macs)})  # fmt: skip
        print(f"{label} alpha {alpha}: done", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", help="comma-separated subset, e.g. resnet20,paddle_ocr_cls")
    args = ap.parse_args()
    wanted = set(args.models.split(",")) if args.models else None
    alphas = (0.05, 0.1, 0.2) if args.quick else (0.05, 0.1, 0.2, 0.3)
    rows = []
    for label, rel, cifar_kw, shapes in MODELS:
        if (SHARED / rel).exists() and (wanted is None or label in wanted) and not (args.quick and label != "resnet20"):
            rows += sweep(label, rel, cifar_kw, shapes, alphas)
            write_json("merging", rows)
    print(table(rows, ["model", "method", "alpha", "params -%", "MACs -%", "score", "seconds"]))
    print("score: top-1 on CIFAR-10 (resnet20, tf_resnet8), output cosine on random inputs (others)")
    print(f"wrote {write_json('merging', rows)}")


if __name__ == "__main__":
    main()
