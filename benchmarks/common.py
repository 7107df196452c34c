"""Helpers for benchmark scripts: model lists, timing, tables, JSON output."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from redonnx.measure.bench import interleaved_times

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


def interleaved_medians(sessions: list, feeds: dict, runs: int = 200, warmup: int = 10) -> list[float]:
    """Median latency (ms) per session over interleaved runs."""
    return [statistics.median(t) for t in interleaved_times(sessions, feeds, runs=runs, warmup=warmup)]


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


def run_measured(cmd: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, exit code, output and its peak RSS in MB.

    The peak is the child's own VmHWM, polled from /proc: the rusage maxrss of a child on Linux
    starts at its parent's peak (it is kept across fork and exec), which would report the
    benchmark script's memory instead of redonnx's."""
    import subprocess
    import threading
    import time

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                break
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"seconds": time.perf_counter() - t0, "peak_MB": peak[0] / 1024, "exit": "timeout",
                "stdout": out, "stderr": err}  # fmt: skip
    watcher.join()
    return {"seconds": time.perf_counter() - t0, "peak_MB": peak[0] / 1024, "exit": proc.returncode,
            "stdout": out, "stderr": err}  # fmt: skip
