"""How far real calibration inputs move the frontier: ResNet-20, 256 CIFAR-10 images.

Run: python benchmarks/calibration.py
Prints a Markdown table and writes benchmarks/results/calibration.json.

The last 256 shared CIFAR-10 images are the calibration set (unlabeled, as a TensorRT INT8 user
would have), the first 761 the evaluation set. At fixed shares of MACs removed (--target-macs,
any channel count: the frontier) and with the default (speed target, fidelity budget), top-1 on
the evaluation images for: data-free statistics, calibration statistics, calibration statistics
plus the layer-by-layer least-squares refit of the pruned layers.
"""

from __future__ import annotations

import time

import numpy as np
from common import SHARED, table, write_json
from fidelity import MEAN, STD

from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.pipeline import prune

N_CALIB = 256


def main() -> None:
    data = np.load(SHARED / "cifar10/cifar10_test_1017.npz")
    x = ((data["x"].astype(np.float32) / 255 - MEAN) / STD).astype(np.float32)
    y = data["y"].astype(np.int64)
    xe, ye, calib = x[:-N_CALIB], y[:-N_CALIB], {"input": x[-N_CALIB:]}
    src = load_model(SHARED / "cifar10/resnet20_bn.onnx").model
    top1 = lambda m: 100 * float(np.mean(run(session(m), {"input": xe})["logits"].argmax(1) == ye))  # noqa: E731
    base = top1(src)
    rows = []
    settings = [("data-free", {}), ("calibration statistics", {"calibration": calib, "refit": False}),
                ("calibration + refit", {"calibration": calib, "refit": True})]  # fmt: skip
    for goal in (10, 20, 30, 40, None):
        for label, opts in settings:
            t0 = time.perf_counter()
            goal_kw = {} if goal is None else {"target_macs": goal, "target": "macs"}
            res = prune(src, **goal_kw, **opts)
            speed = res.speed.final_vs_input["speedup"] if res.speed and res.speed.final_vs_input else None
            rows.append({"goal": f"{goal} % MACs" if goal else "default (speed, budget)", "statistics": label,
                         "MACs -%": res.report()["removed"]["macs_pct"], "top-1": top1(res.model),
                         "top-1 before": base, "speed-up": speed, "seconds": time.perf_counter() - t0})  # fmt: skip
            print(rows[-1])
    print(f"written {write_json('calibration', rows)}")
    print(table(rows, ["goal", "statistics", "MACs -%", "top-1 before", "top-1", "speed-up", "seconds"]))


if __name__ == "__main__":
    main()
