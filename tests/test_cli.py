"""The prune command end to end: report contents, verification failure writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS

from redonnx.cli import main
from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session

RESNET = MODELS / "digits_resnet.onnx"


def test_prune_writes_verified_model_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["prune", str(RESNET), "-o", str(out), "--exact", "--report", str(rep)]) == 0
    assert "verification passed" in capsys.readouterr().out
    r = json.loads(rep.read_text())
    assert r["output"] == str(out) and r["verification"]["passed"]
    assert {"params", "macs", "deflated_bytes", "ops", "layers"} <= set(r["before"])
    assert r["before"]["ops"]["BatchNormalization"] == 8 and "BatchNormalization" not in r["after"]["ops"]
    assert r["after"]["macs"] == r["before"]["macs"]
    assert r["removed"]["params"] == r["before"]["params"] - r["after"]["params"] > 0
    names = [p["name"] for p in r["passes"]]
    assert names == ["fold-constants", "fold-batchnorm", "prune-heads", "drop-branches", "merge-channels",
                     "separate-depthwise", "shortcut-conv", "cleanup"]  # fmt: skip
    fold = r["passes"][1]
    assert fold["modified"] and fold["counts"]["BatchNormalization folded"] == 8
    assert all(isinstance(p["declined"], list) for p in r["passes"])
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(out).graph.node]


def test_failed_verification_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main(["prune", str(RESNET), "-o", str(out), "--atol", "0", "--rtol", "0", "--report", str(rep)])
    assert code == 1  # folding in float64 then rounding to float32 is not bit-exact
    assert not out.exists()
    assert "nothing written" in capsys.readouterr().out
    r = json.loads(rep.read_text())
    assert r["output"] is None and not r["verification"]["passed"]


def test_passes_option_and_declines_in_report(tmp_path: Path) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["prune", str(RESNET), "-o", str(out), "--passes", "cleanup", "--report", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert [p["name"] for p in r["passes"]] == ["cleanup"]
    assert r["after"]["ops"]["BatchNormalization"] == 8


def test_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(RESNET), str(RESNET), "--runs", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["models"]) == 2 and r["speedup"] > 0


def test_relaxed_merging_from_the_command_line(tmp_path: Path) -> None:
    data = np.load(MODELS / "digits_test.npz")
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=(data["x"][:64].astype(np.float32) / 16).reshape(64, 1, 8, 8))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    # --target macs: under ort-cpu the channels chosen follow this machine's cached layer timings, which
    # for these microsecond layers are noise (a unit test must not depend on timing)
    args = ["prune", str(RESNET), "-o", str(out), "--passes", "fold-batchnorm,merge-channels,cleanup",
            "--alpha", "0.1", "--calibration", str(calib), "--inputs", str(calib), "--min-cosine", "0.9",
            "--target", "macs", "--report", str(rep)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(rep.read_text())
    assert r["after"]["params"] < 0.95 * r["before"]["params"]
    merge = next(p for p in r["passes"] if p["name"] == "merge-channels")
    assert merge["counts"]["channels removed with reconstruction"] > 0
    assert r["verification"]["min_cosine"] == 0.9
    x = (data["x"][64:].astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    acc = np.mean(run(session(load_model(out).model), {"input": x})["logits"].argmax(1) == data["y"][64:])
    assert acc > 0.9


def test_html_report_and_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out, page, rep = tmp_path / "o.onnx", tmp_path / "r.html", tmp_path / "r.json"
    args = ["prune", str(RESNET), "-o", str(out), "--html", str(page), "--bench", "--report", str(rep)]
    assert main([*args, "--target", "macs"]) == 0  # the size objective: hashing, whose densities are plotted
    text = page.read_text()
    for section in ("Budget", "Verification passed", "Passes", "Parameters removed per layer", "Layers"):
        assert section in text
    assert text.count("data:image/png;base64,") >= 3  # removed-parameter bars + density plots
    r = json.loads(rep.read_text())
    assert r["latency"]["before_ms"] > 0 and r["latency"]["speedup"] > 0
    assert r["budget"]["goal"] == "fidelity budget"
    assert "latency" in capsys.readouterr().out


def test_output_cut_short_by_a_pipe_is_quiet() -> None:
    """`redonnx inspect model | head -1`: the reader is gone; no error line, no traceback."""
    import os
    import subprocess
    import sys

    from conftest import MODELS

    read, write = os.pipe()
    os.close(read)  # the reader has exited before anything is written: every write fails
    try:
        proc = subprocess.run([sys.executable, "-m", "redonnx.cli", "inspect", str(MODELS / "digits_resnet.onnx")],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


def test_the_command_ends_with_output_flushed_and_exit_handlers_run(tmp_path: Path) -> None:
    """The console command skips the interpreter's teardown (os._exit): buffered output must still
    arrive whole, exit handlers (scratch files) must still run, and the exit status must be kept."""
    marker = tmp_path / "handler-ran"
    code = (
        "import atexit, pathlib, sys\n"
        "from redonnx.cli import leave\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
        "print('x' * 100000)\n"
        "print('to stderr', file=sys.stderr)\n"
        "leave(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output waits in the buffers
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 3
    assert proc.stdout == "x" * 100000 + "\n"
    assert proc.stderr == "to stderr\n"
    assert marker.read_text() == "yes"
    if Path("/dev/full").exists():  # output that cannot be written fails the command, as Python's exit does
        with open("/dev/full", "w") as full:
            short = code.replace("'x' * 100000", "'x' * 100").replace("leave(3)", "leave(0)")  # left in the buffer
            proc = subprocess.run([sys.executable, "-c", short], stdout=full, stderr=subprocess.PIPE, text=True,
                                  timeout=120, env=env)  # fmt: skip
        assert proc.returncode == 120
