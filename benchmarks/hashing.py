"""Adaptive hashing: speed and memory, and what it really costs in accuracy and buys in size.

Run: python benchmarks/hashing.py [--quick]
Prints Markdown tables and writes benchmarks/results/hashing.json.

1. speed: hashing time and peak extra memory (tracemalloc) on ResNet-20 (real), and on
   ResNet-56- and ResNet-50-shaped graphs generated here (0.85 M and 25.5 M weights drawn
   from a He-initialised Laplace mix, like trained conv weights);
2. ResNet-20 on the 1017 shared CIFAR-10 images: top-1, agreement with the original, deflate
   ratio against the original file, distinct values per layer, for the paper's literal rule
   (tau 0/5/10) and the error-bounded rule across bounds and grid sizes;
3. the other shared models with the default rule: cosine and top-1 agreement on random inputs.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import onnx_graphsurgeon as gs
from common import SHARED, available, table, write_json

from redonnx.io.files import load_model
from redonnx.io.graph import to_graph, to_model
from redonnx.io.weights import deflated_size
from redonnx.measure.runtime import run, session
from redonnx.measure.verify import verify
from redonnx.passes.hash_weights import HashWeights
from redonnx.pipeline import run_passes

RESNET50 = (
    [(64, 3, 7, 7)]
    + [(64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (256, 64, 1, 1)]
    + [(64, 256, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1)] * 2
    + [(128, 256, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1), (512, 256, 1, 1)]
    + [(128, 512, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1)] * 3
    + [(256, 512, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1), (1024, 512, 1, 1)]
    + [(256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1)] * 5
    + [(512, 1024, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1), (2048, 1024, 1, 1)]
    + [(512, 2048, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1)] * 2
    + [(1000, 2048, 1, 1)]
)
RESNET56 = (
    [(16, 3, 3, 3)]
    + [(16, 16, 3, 3)] * 18
    + [(32, 16, 3, 3)]
    + [(32, 32, 3, 3)] * 17
    + [(64, 32, 3, 3)]
    + [(64, 64, 3, 3)] * 17
    + [(10, 64, 1, 1)]
)


def synthetic_graph(shapes: list[tuple[int, ...]], seed: int = 0) -> gs.Graph:
    """Conv layers with trained-looking weights (a narrow and a wide Laplace, He scale)."""
    rng = np.random.default_rng(seed)
    x = gs.Variable("x", dtype=np.float32)
    nodes = []
    for i, shape in enumerate(shapes):
        scale = np.sqrt(2.0 / np.prod(shape[1:]))
        w = np.where(rng.random(shape) < 0.3, rng.laplace(0, scale * 0.2, shape), rng.laplace(0, scale, shape))
        out = gs.Variable(f"y{i}", dtype=np.float32)
        nodes.append(gs.Node("Conv", f"conv{i}", inputs=[x, gs.Constant(f"w{i}", w.astype(np.float32))], outputs=[out]))
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[n.outputs[0] for n in nodes], opset=17)


def time_hashing(make_graph, hashing: HashWeights | None = None) -> dict:
    """Seconds (plain run) and peak extra memory (a second run under tracemalloc, which is slower)."""
    hashing = hashing or HashWeights()
    graph = make_graph()
    weights = sum(n.inputs[1].values.nbytes for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul"))
    t0 = time.perf_counter()
    res = hashing(graph)
    seconds = time.perf_counter() - t0
    graph = make_graph()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    hashing(graph)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {
        "weights": res.counts.get("weights hashed", 0),
        "seconds": seconds,
        "peak_extra_MB": peak / 2**20,
        "peak_over_weights": peak / weights,
        "mean_values_per_layer": float(np.mean([r["distinct_after"] for r in res.layers])),
    }


def speed_rows(quick: bool) -> list[dict]:
    rows = []
    p = SHARED / "cifar10/resnet20_bn.onnx"
    if p.exists():
        folded, _ = run_passes(load_model(p).model, ["fold-batchnorm"], exact=True)
        rows.append({"model": "resnet20 (real)", **time_hashing(lambda: to_graph(folded))})
    rows.append({"model": "resnet56-shaped", **time_hashing(lambda: synthetic_graph(RESNET56))})
    if not quick:
        rows.append({"model": "resnet50-shaped", **time_hashing(lambda: synthetic_graph(RESNET50))})
        paper = time_hashing(lambda: synthetic_graph(RESNET50), HashWeights(rule="paper"))
        rows.append({"model": "resnet50-shaped, paper rule", **paper})
    return rows


def cifar() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(SHARED / "cifar10/cifar10_test_1017.npz")
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    return ((data["x"].astype(np.float32) / 255 - mean) / std).astype(np.float32), data["y"].astype(np.int64)


def resnet20_rows(quick: bool) -> list[dict]:
    p = SHARED / "cifar10/resnet20_bn.onnx"
    if not p.exists():
        return []
    src = load_model(p).model
    x, y = cifar()
    ref = run(session(src), {"input": x})["logits"]
    z_src = deflated_size(src)
    settings = [(f"paper tau {t}", {"rule": "paper", "tau": t}) for t in (0, 5, 10)]
    bounds = (0.02, 0.04, 0.06, 0.08, 0.12) if not quick else (0.06,)
    settings += [(f"bounded {e}", {"max_error": e}) for e in bounds]
    if not quick:
        settings += [(f"bounded 0.06 grid {g}", {"max_error": 0.06, "grid": g}) for g in (1024, 16384)]
        settings += [("bounded 0.06 tau 5", {"max_error": 0.06, "tau": 5})]
    rows = [{"setting": "original", "top1": float(np.mean(ref.argmax(1) == y)), "agree": 1.0, "deflate x": 1.0}]
    for label, opts in settings:
        graph = to_graph(run_passes(src, ["fold-batchnorm"], exact=True)[0])
        res = HashWeights(**opts)(graph)
        model = to_model(graph, src)
        out = run(session(model), {"input": x})["logits"]
        rows.append(
            {
                "setting": label,
                "top1": float(np.mean(out.argmax(1) == y)),
                "agree": float(np.mean(out.argmax(1) == ref.argmax(1))),
                "max rel logit err": float(np.abs(out - ref).max() / np.abs(ref).max()),
                "deflate x": z_src / deflated_size(model),
                "values/layer": float(np.median([r["distinct_after"] for r in res.layers])),
                "seconds": res.stats["hashing_seconds"],
            }
        )
    return rows


def other_rows() -> list[dict]:
    rows = []
    for name, path, shapes in available():
        if name.startswith("resnet20"):
            continue
        src = load_model(path).model
        out, results = run_passes(src, ["fold-constants", "fold-batchnorm", "hash-weights"], exact=False)
        v = verify(src, out, shapes=shapes or None, samples=8, rtol=1.0)
        hashed = results[-1]
        rows.append(
            {
                "model": name,
                "weights": hashed.counts.get("weights hashed", 0),
                "cosine": v.worst_cosine,
                "top1 agree": v.min_top1 if v.min_top1 is not None else "-",
                "deflate x": deflated_size(src) / deflated_size(out),
                "seconds": hashed.stats.get("hashing_seconds", 0.0),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the 25 M-weight model and most settings")
    args = ap.parse_args()
    speed = speed_rows(args.quick)
    print("## Speed and memory\n")
    print(table(speed, ["model", "weights", "seconds", "peak_extra_MB", "peak_over_weights", "mean_values_per_layer"]))
    acc = resnet20_rows(args.quick)
    if acc:
        print("\n## ResNet-20, 1017 CIFAR-10 images\n")
        print(table(acc, ["setting", "top1", "agree", "max rel logit err", "deflate x", "values/layer", "seconds"]))
    others = other_rows()
    if others:
        print("\n## Other shared models, default rule, random inputs\n")
        print(table(others, ["model", "weights", "cosine", "top1 agree", "deflate x", "seconds"]))
    print(f"\nwrote {write_json('hashing', {'speed': speed, 'resnet20': acc, 'others': others})}")


if __name__ == "__main__":
    main()
