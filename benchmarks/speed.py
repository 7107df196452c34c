"""Speed of the outputs: redonnx default, --exact, --target trt, --precision fp32 / int8, onnxsim,
onnxslim and onnxruntime's own INT8 (quantize_static with real and with noise calibration,
quantize_dynamic), in one run.

Run: python benchmarks/speed.py [--models a,b] [--seconds S] [--variants "redonnx default,onnxsim"]
Prints a Markdown table and writes benchmarks/results/speed.json. Needs onnxsim and onnxslim
(pip install onnxsim onnxslim); a tool that is missing or fails on a model is recorded as such.

For every shared model (and the tf2onnx-style ResNet-20 of benchmarks/fidelity.py) each variant
is timed against the input model, interleaved (redonnx.measure.latency.compare: onnxruntime CPU, one
thread, batch 1, graph optimizations on, every round in another order): the latency ratio
(variant / input; below 1 is faster) is the median of per-round ratios, with its 90 % interval.
Fidelity: top-1 on the shared CIFAR-10 images for the CIFAR models, else the output cosine to the
input model on real images (resized) or on validly drawn inputs (see fidelity.py). The last row
is the geometric mean of the ratios over the models every variant ran on.

onnxruntime's INT8 peers are run as a user following its guide would: ``quant_pre_process``, then
``quantize_static`` (QDQ, per-channel weights, MinMax, the library's default types) calibrated on
100 real inputs (the last 100 of the evaluation set; validly drawn inputs where the model has no
real data) or on standard-normal noise of the input's shape, and ``quantize_dynamic`` (defaults).
A peer whose model onnxruntime cannot load or run is recorded as failing.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
from common import table, write_json
from fidelity import as_float32, cosine, models, outputs, real_data

from redonnx.inputs.model import infer
from redonnx.inputs.sizes import settle
from redonnx.measure.cost import model_cost
from redonnx.measure.latency import compare
from redonnx.measure.runtime import session
from redonnx.pipeline import prune

VARIANTS = [
    "redonnx default",
    "redonnx --precision fp32",
    "redonnx --precision int8",
    "redonnx --exact",
    "redonnx --target trt",
    "onnxsim",
    "onnxslim",
    "ort static (real calib)",
    "ort static (noise calib)",
    "ort dynamic",
]
CALIB = 100  # real calibration inputs of onnxruntime's quantize_static


def ort_int8(name: str, model: onnx.ModelProto, calib: dict[str, np.ndarray] | None) -> onnx.ModelProto:
    """onnxruntime's own INT8 of ``model``: static (calibrated on ``calib``) or dynamic (None)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from redonnx.io.external_data import inline_copy

    class Reader:
        def __init__(self, feeds: dict[str, np.ndarray]) -> None:
            n = len(next(iter(feeds.values())))
            self.it = iter([{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "out.onnx"
        onnx.save(inline_copy(model), str(src))  # a user quantizes the file itself, weights and all
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:
            pre = src
        if calib is None:
            quantize_dynamic(str(pre), str(out))
        else:
            quantize_static(str(pre), str(out), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True)
        return onnx.load(str(out))


def variant(name: str, model: onnx.ModelProto, shapes: dict,
            calib: dict | None = None) -> tuple[onnx.ModelProto | None, str]:  # fmt: skip
    """The variant's output model, or None and why."""
    try:
        if name == "redonnx default":
            return prune(model, shapes=shapes or None).model, ""
        if name.startswith("redonnx --precision"):
            return prune(model, shapes=shapes or None, precision=name.split()[-1]).model, ""
        if name.startswith("ort static"):
            feeds = calib if "real" in name else {k: np.random.default_rng(5).standard_normal(v.shape).astype(v.dtype)
                                                  for k, v in calib.items()}  # fmt: skip
            out = ort_int8(name, model, feeds)
            session(out, optimize=True).run(None, {k: v[:1] for k, v in calib.items()})
            return out, ""
        if name == "ort dynamic":
            out = ort_int8(name, model, None)
            session(out, optimize=True).run(None, {k: v[:1] for k, v in calib.items()})
            return out, ""
        if name == "redonnx --exact":
            return prune(model, shapes=shapes or None, exact=True).model, ""
        if name == "redonnx --target trt":
            return prune(model, shapes=shapes or None, target="trt").model, ""
        if name == "onnxsim":
            import onnxsim

            out, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes or None)
            return (out, "") if ok else (None, "onnxsim: check failed")
        import onnxslim

        return onnxslim.slim(model), ""
    except Exception as exc:  # a competitor failing is a result, not a crash
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def cost_model_check(model: onnx.ModelProto, shapes: dict) -> tuple[float, int, int]:
    """The cost model's sum over the model's layers (ms), and how many layers it could time."""
    import onnx_graphsurgeon as gs

    from redonnx.inputs.shapes import annotate_graph
    from redonnx.io.graph import to_graph
    from redonnx.measure.latency import CostModel, layer_shape

    g = to_graph(model)
    for t in g.inputs:
        if t.name in shapes:
            t.shape = [1, *shapes[t.name][1:]]
        elif t.shape:
            t.shape = [1 if not isinstance(d, int) else d for d in t.shape]
    annotate_graph(g)
    cm = CostModel()
    ops = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    layers = [n for n in g.nodes if n.op in ops and isinstance(n.inputs[1], gs.Constant)]
    timed = [cm.ms(s) for n in layers if (s := layer_shape(n)) is not None]
    cm.save()
    return float(sum(timed)), len(timed), len(layers)


def fidelity(ref: onnx.ModelProto, cand: onnx.ModelProto, feeds: dict, labels: np.ndarray | None) -> str:
    try:
        a, b = outputs(ref, feeds), outputs(cand, feeds)
    except Exception as exc:
        return f"fails: {type(exc).__name__}"
    if labels is not None:
        return f"top-1 {100 * np.mean(a.argmax(1) == labels):.1f} -> {100 * np.mean(b.argmax(1) == labels):.1f}"
    return f"cosine {cosine(a, b):.5f}"


def measure(name: str, model: onnx.ModelProto, shapes: dict, seconds: float) -> list[dict]:
    feeds, labels, what = real_data(name, 1017)
    _, sh, _ = settle(model, None, shapes or None)
    feeds = as_float32(feeds) if feeds is not None else infer(model, sh).draw(model, sh, batch=64, seed=99)
    one = infer(model, sh).draw(model, sh, batch=1, seed=0)
    calib = {k: v[-CALIB:] for k, v in feeds.items()}
    outs, rows = [], []
    for v in VARIANTS:
        t0 = time.perf_counter()
        out, why = variant(v, model, shapes, calib)
        outs.append((v, out, why, time.perf_counter() - t0))
    unique: dict[bytes, int] = {}  # identical outputs are timed once (two sessions of one model differ by ~1.5 %)
    for _v, out, _why, _s in outs:
        if out is not None:
            unique.setdefault(out.SerializeToString(), len(unique) + 1)
    timed = sorted(unique.items(), key=lambda kv: kv[1])
    cmp = compare([model] + [onnx.load_from_string(b) for b, _ in timed], one, max_seconds=seconds, max_rounds=2000)
    macs0 = model_cost(model, sh).macs
    layer_sum, n_timed, n_layers = cost_model_check(model, sh)
    whole = cmp.against(0, 0).median_ms
    rows.append({"model": name, "variant": "input (cost model check)", "latency ratio": 1.0,
                 "fidelity": f"whole model {whole:.3f} ms; cost model, {n_timed} of {n_layers} layers timed "
                             f"alone: {layer_sum:.3f} ms ({100 * layer_sum / whole:.0f} %)"})  # fmt: skip
    for v, out, why, tool_s in outs:
        row = {"model": name, "variant": v, "tool s": tool_s}
        if out is None:
            row.update({"latency ratio": "-", "fidelity": why})
        else:
            t = cmp.against(unique[out.SerializeToString()], 0)
            macs = model_cost(out, sh).macs
            row.update({
                "latency ratio": t.ratio, "interval": f"{t.ratio_low:.3f}-{t.ratio_high:.3f}",
                "MACs -%": 100 * (1 - macs / macs0) if macs and macs0 else None,
                "fidelity": fidelity(model, out, feeds, labels), "data": what,
            })  # fmt: skip
        rows.append(row)
    return rows


def geomeans(rows: list[dict]) -> list[dict]:
    by_model: dict[str, dict[str, float]] = {}
    for r in rows:
        if isinstance(r.get("latency ratio"), float):
            by_model.setdefault(r["model"], {})[r["variant"]] = r["latency ratio"]
    common = [m for m, d in by_model.items() if all(v in d for v in VARIANTS)]
    out = []
    for v in VARIANTS:
        vals = [by_model[m][v] for m in common]
        out.append({"model": f"geometric mean ({len(common)} models)", "variant": v,
                    "latency ratio": float(np.exp(np.mean(np.log(vals)))) if vals else None})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="comma-separated names (see fidelity.py)")
    ap.add_argument("--seconds", type=float, default=15.0, help="timing budget per model")
    ap.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    args = ap.parse_args()
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {VARIANTS}")
        VARIANTS[:] = chosen
    wanted = set(args.models.split(",")) if args.models else None
    rows: list[dict] = []
    for name, model, shapes in models():
        if (wanted and name not in wanted) or name.startswith("digits_"):
            continue
        rows += measure(name, model, shapes, args.seconds)
        print(f"{name}: done", file=sys.stderr)
    rows += geomeans(rows)
    print(f"written {write_json('speed', rows)}")
    for r in rows:
        if isinstance(r.get("latency ratio"), float):
            r["latency ratio"] = f"{r['latency ratio']:.3f}"
    print(table(rows, ["model", "variant", "latency ratio", "interval", "MACs -%", "fidelity", "tool s"]))


if __name__ == "__main__":
    main()
