"""Large models: time and peak memory of redonnx on a synthetic model over 2 GB (external data).

Run: python benchmarks/large_model.py [--layers 33] [--width 4096] [--default-layers 4]
Builds (once, cached in $REDONNX_CACHE/large, default ~/.cache/redonnx) an MLP of `layers`
MatMul(width x width)/Relu layers whose weights are in an external data file (33 x 4096^2 float32
= 2.2 GB, over protobuf's 2 GB limit), then runs in fresh processes: `redonnx inspect`,
`redonnx prune --exact` (writes the output beside the model), `redonnx verify` of the output against
the source, and the default `redonnx prune` (hashing + budgeted merging) on a smaller model of
`default-layers` layers. Each row: wall time, peak RSS (the process's ru_maxrss) and peak RSS
over the weight bytes. Writes benchmarks/results/large_model.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from common import run_measured, table, write_json
from onnx import TensorProto, helper

ALIGN = 4096


def cache_dir() -> Path:
    d = Path(os.environ.get("REDONNX_CACHE", Path.home() / ".cache" / "redonnx")) / "large"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(layers: int, width: int, seed: int = 0) -> Path:
    """The MLP, written tensor by tensor (never all weights in memory)."""
    path = cache_dir() / f"mlp_{layers}x{width}.onnx"
    data = path.with_name(path.name + ".data")
    if path.exists() and data.exists():
        return path
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    with open(data, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
            f.write(b"\0" * (-f.tell() % ALIGN))
            offset = f.tell()
            f.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            y = f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y], name=f"fc{i}"))
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
                y = f"r{i}"
            x = y
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="redonnx-bench")
    model.ir_version = 8
    onnx.save_model(model, str(path))  # the proto only: tensors already point at the data file
    return path


def run(args: list[str]) -> dict:
    """Wall time, peak RSS and exit code of one `redonnx` process."""
    r = run_measured([sys.executable, "-m", "redonnx.cli", *args])
    lines = (r["stderr"].strip() or r["stdout"].strip()).splitlines()
    return {"seconds": round(r["seconds"], 1), "peak_MB": round(r["peak_MB"]), "exit": r["exit"],
            "last_line": lines[-1] if lines else ""}  # fmt: skip


def weight_bytes(path: Path) -> int:
    return path.with_name(path.name + ".data").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=33)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--default-layers", type=int, default=4)
    a = ap.parse_args()
    big = build(a.layers, a.width)
    out = big.with_name(big.stem + "_exact.onnx")
    rows = []
    jobs = [
        ("inspect", big, ["inspect", str(big)]),
        ("prune --exact", big, ["prune", str(big), "-o", str(out), "--exact"]),
        ("verify source vs output", big, ["verify", str(big), str(out)]),
    ]
    if a.default_layers:
        small = build(a.default_layers, a.width)
        jobs.append(("prune (default)", small, ["prune", str(small), "-o", str(small.with_name("default_out.onnx"))]))
    for name, model, args in jobs:
        print(f"running {name} on {model.name} ...", file=sys.stderr, flush=True)
        r = run(args)
        size = weight_bytes(model)
        rows.append({"command": name, "model": model.name, "weights_MB": round(size / 2**20),
                     **r, "peak_over_weights": round(r["peak_MB"] * 2**20 / size, 2)})  # fmt: skip
    cols = ["command", "model", "weights_MB", "seconds", "peak_MB", "peak_over_weights", "exit", "last_line"]
    print(table(rows, cols))
    print(f"\nwrote {write_json('large_model', {'rows': rows, 'layers': a.layers, 'width': a.width})}")
    for p in big.parent.glob("*_out.onnx*"):
        p.unlink()
    for p in big.parent.glob("*_exact.onnx*"):
        p.unlink()


if __name__ == "__main__":
    main()
