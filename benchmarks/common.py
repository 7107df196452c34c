"""Helpers for benchmark scripts: model lists, timing, tables, JSON output."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
RESULTS = ROOT / "benchmarks" / "results"

#: (name, path relative to ../shared/models, shape hints)
SHARED_MODELS: list[tuple[str, str, dict[str, list[int]]]] = [
    ("resnet20_bn", "cifar10/resnet20_bn.onnx", {}),
    ("resnet20_dynamo", "cifar10/resnet20_dynamo/model.onnx", {}),
    ("mobilenetv2", "imagenet/mobilenetv2_features_bn.onnx", {}),
    ("tf_resnet8", "tf/mlperf_tiny_resnet8_cifar10.onnx", {}),
    ("tf_autoencoder", "tf/mlperf_tiny_fc_autoencoder.onnx", {}),
    ("paddle_ocr_cls", "paddle/ppocr_mobile_v2_cls.onnx", {"x": [1, 3, 48, 192]}),
    ("cntk_mnist", "cntk/mnist_8.onnx", {}),
    ("mtcnn_rnet", "pytorch/mtcnn_rnet.onnx", {}),
    ("super_resolution", "pytorch/super_resolution_10.onnx", {}),
]


def available(models=SHARED_MODELS):
    """The shared models that exist on this machine (none when ../shared is absent)."""
    return [(n, SHARED / p, s) for n, p, s in models if (SHARED / p).exists()]


def ort_session(model: onnx.ModelProto, optimize: bool, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def interleaved_medians(sessions: list[ort.InferenceSession], feeds: dict, runs: int = 200, warmup: int = 10):
    """Median latency (ms) per session, alternating sessions every run so noise is shared."""
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[i].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A Markdown table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_json(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return out
