"""--exact on a widened ResNet-20: do the planted channels go under every target?

Run: python benchmarks/widened.py
Prints a Markdown table and writes benchmarks/results/widened.json.

The shared CIFAR ResNet-20 (BatchNorm folded) is widened with duplicate and dead filters, its
function unchanged (tests/widen.py): 16 -> 21 and 32 -> 37 channels inside two blocks, 64 -> 69
on the last stage's residual stream. ``--exact`` under each target should return the base's
channel counts and parameters (the base pruned the same way: ort-cpu rewrites shortcuts as 1x1
convs). The latency of each result against the base's (interleaved, onnxruntime CPU, 1 thread)
shows what channels left behind cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from common import ROOT, SHARED, table, write_json

from redonnx.io.files import load_model
from redonnx.measure.latency import compare
from redonnx.pipeline import TARGETS, prune, run_passes

sys.path.insert(0, str(ROOT / "tests"))
from widen import widen

STREAM = [f"/layer3/layer3.{i}/conv2/Conv" for i in range(3)]
READERS = ["/layer3/layer3.1/conv1/Conv", "/layer3/layer3.2/conv1/Conv", "/linear/Gemm"]
BLOCKS = [("/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0/conv2/Conv"),
          ("/layer2/layer2.1/conv1/Conv", "/layer2/layer2.1/conv2/Conv")]  # fmt: skip


def widened(base):
    """Five more channels (three copies, two dead) in each of two blocks and on the stage-3 stream."""
    model = base
    for producer, consumer in BLOCKS:
        for src, dead in ((3, False), (7, False), (3, False), (0, True), (5, True)):
            model = widen(model, [producer], [consumer], src=src, dead=dead)
    for src, dead in ((0, False), (5, False), (60, False), (1, True), (50, True)):  # zero-padding channels
        model = widen(model, STREAM, READERS, src=src, dead=dead, pads=["/layer3/layer3.0/Pad"])
    return model


def widths(model) -> list[int]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return sorted({shapes[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"})


def main() -> None:
    path = SHARED / "cifar10/resnet20_bn.onnx"
    if not path.exists():
        sys.exit("../shared/models/cifar10/resnet20_bn.onnx not available")
    base = run_passes(load_model(path).model, None, exact=True)[0]
    wide = widened(base)
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    rows = []
    for target in TARGETS:
        res, ref = prune(wide, exact=True, target=target), prune(base, exact=True, target=target)
        t = compare([ref.model, res.model], feeds, max_seconds=5).against(1, 0)
        rows.append({"target": target, "widened": str(widths(wide)), "--exact": str(widths(res.model)),
                     "params": res.after.params, "base params": ref.after.params, "latency vs base": round(t.ratio, 3),
                     "90 % interval": f"{t.ratio_low:.3f}-{t.ratio_high:.3f}"})  # fmt: skip
    cols = ["target", "widened", "--exact", "params", "base params", "latency vs base", "90 % interval"]
    print(table(rows, cols))
    print(f"\nwritten {write_json('widened', rows)} ({Path(__file__).name})")


if __name__ == "__main__":
    main()
