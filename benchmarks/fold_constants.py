"""Constant folding: onnxruntime latency of redonnx --exact against onnxsim and the original.

Run: python benchmarks/fold_constants.py [--runs 200]
Prints a Markdown table and writes benchmarks/results/fold_constants.json. Latency is the median
over interleaved runs, single-threaded, batch 1, onnxruntime with graph optimizations off
("raw": what the exported graph costs) and on ("ort": what a deployment sees).
"""

from __future__ import annotations

import argparse
import time

from common import available, interleaved_medians, table, write_json

from redonnx.io.files import load_model
from redonnx.measure.runtime import random_inputs, session
from redonnx.pipeline import run_passes


def simplify(model, shapes):
    try:
        import onnxsim
    except ImportError:
        return None, "onnxsim not installed"
    try:
        t0 = time.perf_counter()
        out, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes or None)
        return (out, time.perf_counter() - t0) if ok else (None, "onnxsim check failed")
    except Exception as exc:  # onnxsim raises on models it cannot handle
        return None, str(exc).splitlines()[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for name, path, shapes in available():
        src = load_model(path).model
        t0 = time.perf_counter()
        ours, _ = run_passes(src, None, exact=True)
        ours_s = time.perf_counter() - t0
        sim, sim_s = simplify(src, shapes)
        feeds = random_inputs(src, shapes, batch=1)
        row = {"model": name, "nodes": len(src.graph.node), "redonnx nodes": len(ours.graph.node), "redonnx s": ours_s}
        models = [src, ours] + ([sim] if sim is not None else [])
        if sim is not None:
            row["onnxsim nodes"], row["onnxsim s"] = len(sim.graph.node), sim_s
        for optimize, tag in ((False, "raw"), (True, "ort")):
            sessions = [session(m, optimize=optimize, threads=1) for m in models]
            med = interleaved_medians(sessions, feeds, runs=args.runs)
            row[f"{tag} ms"] = med[0]
            row[f"{tag} redonnx x"] = med[0] / med[1]
            if sim is not None:
                row[f"{tag} onnxsim x"] = med[0] / med[2]
        rows.append(row)
        print(f"{name}: done", flush=True)
    cols = [
        "model",
        "nodes",
        "redonnx nodes",
        "onnxsim nodes",
        "raw ms",
        "raw redonnx x",
        "raw onnxsim x",
        "ort ms",
        "ort redonnx x",
        "ort onnxsim x",
        "redonnx s",
        "onnxsim s",
    ]
    print(table(rows, cols))
    print(f"wrote {write_json('fold_constants', rows)}")


if __name__ == "__main__":
    main()
