"""Uneven depthwise separation: MACs and onnxruntime CPU latency of the separated forms.

Run: python benchmarks/separation.py [--runs 200]
Prints Markdown tables and writes benchmarks/results/separation.json.

Variants of the shared ResNet-20 (BN folded) whose 3x3 convs are truncated to rank 1, 2 or
uneven ranks (1 or 3) per input channel are separated with each ONNX form; latency is the
median of interleaved runs (onnxruntime, all graph optimizations on, batch 1 and 32, 1 and 2
threads). Then the real ResNet-20: truncated separation (lossy) across error bounds, top-1 on
the shared CIFAR-10 images.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx_graphsurgeon as gs
from common import SHARED, interleaved_medians, table, write_json

from redonnx.io.files import load_model
from redonnx.measure.cost import model_cost
from redonnx.measure.runtime import random_inputs, run, session
from redonnx.passes import SeparateDepthwise
from redonnx.pipeline import run_passes


def low_rank(w: np.ndarray, ranks: list[int]) -> np.ndarray:
    out = np.array(w, dtype=np.float64)
    for i, r in enumerate(ranks):
        m = out[:, i].reshape(w.shape[0], -1)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        out[:, i] = ((u[:, :r] * s[:r]) @ vt[:r]).reshape(out[:, i].shape)
    return out.astype(w.dtype)


def variant(base, rank_of) -> object:
    g = gs.import_onnx(base)
    rng = np.random.default_rng(0)
    for n in g.nodes:
        if n.op == "Conv" and n.inputs[1].shape[2:] == [3, 3] and n.inputs[1].shape[1] > 3:
            w = n.inputs[1]
            w.values = low_rank(w.values, [rank_of(rng) for _ in range(w.shape[1])])
    return gs.export_onnx(g)


def latency_rows(base, runs: int) -> list[dict]:
    rows = []
    cases = [("rank 1", lambda r: 1), ("rank 2", lambda r: 2), ("ranks 1 or 3", lambda r: int(r.choice([1, 3])))]
    for label, rank_of in cases:
        m = variant(base, rank_of)
        forms = {"original": m}
        for form in ("multiplier", "gather", "stacked"):
            out, _ = run_passes(m, [SeparateDepthwise(form=form), "cleanup"], exact=True)
            forms[form] = out
        c0 = model_cost(m).macs
        for batch in (1, 32):
            feeds = random_inputs(m, batch=batch, seed=0)
            for threads in (1, 2):
                sessions = [session(x, optimize=True, threads=threads) for x in forms.values()]
                med = interleaved_medians(sessions, feeds, runs=runs if batch == 1 else max(runs // 8, 10))
                for (form, x), t in zip(forms.items(), med, strict=True):
                    rows.append({"variant": label, "form": form, "batch": batch, "threads": threads,
                                 "MACs -%": 100 * (1 - model_cost(x).macs / c0), "median ms": t,
                                 "speedup": med[0] / t})  # fmt: skip
        print(f"{label}: done", flush=True)
    return rows


def cifar():
    data = np.load(SHARED / "cifar10/cifar10_test_1017.npz")
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    return ((data["x"].astype(np.float32) / 255 - mean) / std).astype(np.float32), data["y"]


def truncation_rows(base) -> list[dict]:
    x, y = cifar()
    c0 = model_cost(base).macs
    rows = []
    for err in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5):
        out, (res, _) = run_passes(base, [SeparateDepthwise(max_error=err), "cleanup"], exact=not err)
        top1 = float(np.mean(run(session(out), {"input": x})["logits"].argmax(1) == y))
        rows.append({"separate_error": err, "convs separated": sum(res.counts.values()),
                     "MACs -%": 100 * (1 - model_cost(out).macs / c0), "top1": top1})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    p = SHARED / "cifar10/resnet20_bn.onnx"
    if not p.exists():
        print("../shared/models absent: nothing to measure")
        return
    base, _ = run_passes(load_model(p).model, None, exact=True)
    lat = latency_rows(base, args.runs)
    print(table(lat, ["variant", "form", "batch", "threads", "MACs -%", "median ms", "speedup"]))
    trunc = truncation_rows(base)
    print()
    print(table(trunc, ["separate_error", "convs separated", "MACs -%", "top1"]))
    print(f"wrote {write_json('separation', {'latency': lat, 'truncation': trunc})}")


if __name__ == "__main__":
    main()
