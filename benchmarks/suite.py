"""The benchmark suite, one command: python benchmarks/suite.py [--quick]

Writes benchmarks/results/suite.json and benchmarks/results/suite.md, and prints the tables:

1. tool time and peak memory (RSS of a fresh `redonnx prune` process) per model, default and --exact;
2. compression on the shared models with the default pipeline (fidelity budget: output cosine
   >= 0.995 on synthetic inputs): parameters and MACs removed, top-1 (CIFAR models, 1017 images)
   or cosine (others), deflated size ratio, onnxruntime latency ratio (CPU, batch 1, optimizations
   on); beside onnxsim's simplifier and onnxsim's L2 structured pruning at the same MACs removed;
3. the paper's ablation (Table 1) on our models: parameters removed by hashing, merge alpha = 0,
   merge alpha* (the budget's alpha) and separation, alone and combined.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, SHARED, run_measured, table, write_json
from merging import Scorer, onnxsim_at

from redonnx.io.files import load_model
from redonnx.io.weights import deflated_size
from redonnx.measure.bench import interleaved_times
from redonnx.measure.cost import model_cost
from redonnx.measure.runtime import random_inputs, session
from redonnx.passes import HashWeights, MergeChannels, PassContext
from redonnx.pipeline import prune, run_passes

MODELS = [
    ("digits_resnet (bundled)", ROOT / "models/digits_resnet.onnx", None, {}),
    ("digits_mobile (bundled)", ROOT / "models/digits_mobile.onnx", None, {}),
    ("resnet20", SHARED / "cifar10/resnet20_bn.onnx", {"nhwc": False, "normalize": True}, {}),
    ("tf_resnet8", SHARED / "tf/mlperf_tiny_resnet8_cifar10.onnx", {"nhwc": True, "normalize": False}, {}),
    ("mobilenetv2", SHARED / "imagenet/mobilenetv2_features_bn.onnx", None, {}),
    ("tf_autoencoder", SHARED / "tf/mlperf_tiny_fc_autoencoder.onnx", None, {}),
    ("paddle_ocr_cls", SHARED / "paddle/ppocr_mobile_v2_cls.onnx", None, {"x": [1, 3, 48, 192]}),
    ("cntk_mnist", SHARED / "cntk/mnist_8.onnx", None, {}),
    ("mtcnn_rnet", SHARED / "pytorch/mtcnn_rnet.onnx", None, {}),
    ("super_resolution", SHARED / "pytorch/super_resolution_10.onnx", None, {}),
]


COMPRESSION_COLUMNS = ["model", "method", "params -%", "MACs -%", "score before", "score", "deflate x", "latency x",
                       "verified"]  # fmt: skip


def shape_args(shapes: dict) -> list[str]:
    return [a for k, v in shapes.items() for a in ("--shape", f"{k}={','.join(map(str, v))}")]


def tool_cost(path: Path, shapes: dict, exact: bool) -> dict:
    """Wall time and peak RSS of one `redonnx prune` process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "redonnx.cli", "prune", str(path), "-o", f"{tmp}/o.onnx", *shape_args(shapes)]
        r = run_measured(cmd + (["--exact"] if exact else []))
    return {"seconds": r["seconds"], "peak_MB": r["peak_MB"], "exit": r["exit"]}


def latency_ratio(before, after, shapes: dict, runs: int = 100) -> float:
    feeds = random_inputs(before, shapes or None, batch=1, seed=0)
    t = interleaved_times([session(before, optimize=True, threads=1), session(after, optimize=True, threads=1)],
                          feeds, runs=runs, warmup=10)  # fmt: skip
    return statistics.median(t[0]) / statistics.median(t[1])


def compression_rows(label, path, cifar_kw, shapes) -> list[dict]:
    src = load_model(path).model
    scorer = Scorer(src, cifar_kw, shapes)
    c0 = model_cost(src, shapes or None)
    res = prune(src, shapes=shapes or None)
    rows = [_row(label, "redonnx default", src, res.model, scorer, c0, shapes, res.verification.passed)]
    try:
        import onnxsim

        sim, ok = onnxsim.simplify(src, overwrite_input_shapes=shapes or None)
        rows.append(_safe_row(label, "onnxsim simplify", src, sim, scorer, c0, shapes, ok))
        target = rows[0]["MACs -%"]
        if target > 0.5:
            pruned, sp = onnxsim_at(run_passes(src, None, True)[0], target / 100, c0, shapes)
            if pruned is not None:
                rows.append(_safe_row(label, f"onnxsim L2 {sp:.3f}", src, pruned, scorer, c0, shapes, True))
    except ImportError:
        pass
    return rows


def _safe_row(label, method, src, model, scorer, c0, shapes, ok) -> dict:
    """A competitor's model may not even load in onnxruntime: record that instead of failing."""
    try:
        return _row(label, method, src, model, scorer, c0, shapes, ok)
    except Exception as exc:  # onnxruntime rejects the model
        return {"model": label, "method": method, "score": f"invalid model: {str(exc).splitlines()[0][:80]}",
                "verified": False}  # fmt: skip


def _row(label, method, src, model, scorer, c0, shapes, ok) -> dict:
    c = model_cost(model, shapes or None)
    return {
        "model": label,
        "method": method,
        "params -%": 100 * (1 - c.params / c0.params),
        "MACs -%": 100 * (1 - (c.macs or 0) / c0.macs) if c0.macs else 0.0,
        "score": scorer.score(model),
        "score before": scorer.score(src),
        "deflate x": deflated_size(src) / deflated_size(model),
        "latency x": latency_ratio(src, model, shapes),
        "verified": ok,
    }


def ablation_rows(label, path, shapes) -> list[dict]:
    src = load_model(path).model
    base, _ = run_passes(src, ["fold-constants", "fold-batchnorm"], True)
    p0 = model_cost(base, shapes or None).params
    search = prune(src, shapes=shapes or None, target="macs").search  # the budget's choice a*
    alpha = {search.knob: search.value}
    combos = [
        ("merge a=0", False, {"alpha": 0.0}, False),
        ("merge a*", False, alpha, False),
        ("hash + merge a=0", True, {"alpha": 0.0}, False),
        ("hash + merge a*", True, alpha, False),
        ("hash + merge a* + separation", True, alpha, True),
    ]
    rows = []
    for name, hashing, a, sep in combos:
        passes = [HashWeights(max_error=0.02)] if hashing else []
        passes += [MergeChannels(**a), *(["separate-depthwise"] if sep else []), "cleanup"]
        out, _ = run_passes(base, passes, False, PassContext(shapes=shapes or None))
        rows.append({"model": label, "steps": name, **a,
                     "params -%": 100 * (1 - model_cost(out, shapes or None).params / p0)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="bundled models and ResNet-20 only")
    args = ap.parse_args()
    chosen = [m for m in MODELS if m[1].exists() and (not args.quick or m[0].startswith(("digits", "resnet20")))]
    tools, comp, abl = [], [], []
    for label, path, cifar_kw, shapes in chosen:
        for exact in (False, True):
            tools.append({"model": label, "mode": "--exact" if exact else "default", **tool_cost(path, shapes, exact)})
        comp += compression_rows(label, path, cifar_kw, shapes)
        if label in ("resnet20", "mobilenetv2", "digits_resnet (bundled)", "digits_mobile (bundled)"):
            abl += ablation_rows(label, path, shapes)
        print(f"{label}: done", file=sys.stderr, flush=True)
        write_json("suite", {"tool": tools, "compression": comp, "ablation": abl})
    md = [
        "# redonnx benchmark suite\n",
        "## 1. Tool time and peak memory (fresh process)\n",
        table(tools, ["model", "mode", "seconds", "peak_MB", "exit"]),
        "\n## 2. Compression, default pipeline vs onnxsim\n",
        "score: top-1 on the 1017 CIFAR-10 images (resnet20, tf_resnet8), output cosine on random inputs"
        " (others); latency x: onnxruntime CPU speed-up, batch 1, 1 thread\n",
        table(comp, COMPRESSION_COLUMNS),
        "\n## 3. Ablation (parameters removed, the paper's Table 1)\n",
        table(abl, ["model", "steps", "alpha", "params -%"]),
    ]
    text = "\n".join(md) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "suite.md").write_text(text)
    print(text)
    print(json.dumps({"wrote": [str(RESULTS / "suite.json"), str(RESULTS / "suite.md")]}))


if __name__ == "__main__":
    main()
