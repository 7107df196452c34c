"""The default (``--precision auto``) as a CPU with VNNI would run it, rehearsed on any x86 machine.

Run: python benchmarks/vnni_rehearsal.py [--runs 2] [--extra MODEL.onnx ...]

A simulation, not a measurement: the child process reports VNNI (8-bit weights), runs every INT8
check in float simulation (VNNI's kernels accumulate in 32 bits, as the simulation does; AVX2's
saturate), and its timings make float layers slower than measured: each timed run is stretched by
0.8 x the share of Conv/Gemm/MatMul layers still float, so a model with every layer in INT8 times
1.8x faster than float, where onnxruntime's static INT8 gives CIFAR ResNets about 2x on VNNI. Its
use: exercising the INT8 search, the gate, the lossless-result proposal and the plans recalled
from the latency cache on every shared model, and the tool time that path costs, on a machine
without VNNI. Speed-ups it prints are the simulation's, not any CPU's.

Each model runs ``--runs`` times with one cold latency cache (a folder of its own): the first run
searches, later runs recall the plans. Prints a Markdown table (seconds per run, INT8 trials per
proposal, what was written) and writes benchmarks/results/vnni_rehearsal.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ROOT, available, table, write_json  # noqa: E402

STRETCH = 0.8  # a float layer's extra share of a timed run
HEAVY = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
INTEGER = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}


def _float_share(model) -> float:
    """Share of the weighted layers still computing in float (not fed by a DequantizeLinear)."""
    made = {o: n for n in model.graph.node for o in n.output}
    heavy = [n for n in model.graph.node if n.op_type in HEAVY | INTEGER]
    if not heavy:
        return 1.0

    def quantized(n) -> bool:
        src = made.get(n.input[0]) if n.input else None
        return n.op_type in INTEGER or (src is not None and src.op_type == "DequantizeLinear")

    return sum(not quantized(n) for n in heavy) / len(heavy)


class _Stretched:
    """A timing session whose runs take (1 + extra) x as long (busy-waiting: sleep is too coarse)."""

    def __init__(self, sess, extra: float) -> None:
        self._sess, self._extra = sess, extra

    def run(self, *args, **kwargs):
        t = time.perf_counter()
        out = self._sess.run(*args, **kwargs)
        end = time.perf_counter() + (time.perf_counter() - t) * self._extra
        while time.perf_counter() < end:
            pass
        return out

    def __getattr__(self, name: str):
        return getattr(self._sess, name)


def child(argv: list[str]) -> int:
    """``redonnx prune argv`` in this process, as if on a VNNI CPU (see the module)."""
    import redonnx.measure.latency as latency
    import redonnx.measure.verify as verify
    import redonnx.planner.precision as precision
    import redonnx.quantize.cpu as cpu
    import redonnx.quantize.stage as stage

    vnni = cpu.Int8Cpu(arch="x86_64", avx2=True, avx512=True, vnni=True)
    for module in (cpu, precision, stage):
        module.detect = lambda: vnni
    real_init, real_timing = verify.Reference.__init__, latency.timing_session

    def reference(self, *args, **kwargs) -> None:
        kwargs["int8_as_deployed"] = False  # float simulation: VNNI does not saturate
        real_init(self, *args, **kwargs)

    verify.Reference.__init__ = reference
    latency.timing_session = lambda model: _Stretched(real_timing(model), STRETCH * _float_share(model))
    import redonnx.cli

    return redonnx.cli.main(argv)


def rehearse(name: str, path: Path, runs: int, tmp: Path) -> dict:
    env = {**os.environ, "REDONNX_CACHE": str(tmp / f"cache-{name}"), "PYTHONPATH": str(ROOT)}
    row: dict = {"model": name}
    for k in range(runs):
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--child", "prune", str(path), "-o", str(tmp / f"{name}.onnx")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        row[f"run {k + 1} s"] = round(time.perf_counter() - t0, 1)
        row["exit"] = row.get("exit") or proc.returncode  # the first failure stays shown
        lines = proc.stdout.splitlines() + proc.stderr.splitlines()
        trials = [m.group(1) for ln in lines if (m := re.search(r"; (\d+) trials?, [\d.]+ s", ln))]
        row[f"run {k + 1} INT8 trials"] = " + ".join(trials) or "-"
        written = next((ln.strip() for ln in lines if ln.strip().startswith("writing the ")), "")
        stages = next((ln.strip() for ln in lines if ln.strip().startswith("stages:")), "")
        row["written"] = f"{written}; {stages}" if stages else written or (lines[-1] if lines else "")
    return row


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="runs per model, one latency cache (default 2)")
    ap.add_argument("--extra", nargs="*", default=[], help="more models to rehearse")
    args = ap.parse_args()
    models = [(n, p) for n, p, _ in available()] + [(Path(p).stem, Path(p)) for p in args.extra]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vnni-") as tmp:
        for name, path in models:
            rows.append(rehearse(name, path, args.runs, Path(tmp)))
            print(f"{name}: done", file=sys.stderr)
    cols = ["model", "exit", *[f"run {k + 1} {c}" for k in range(args.runs) for c in ("s", "INT8 trials")], "written"]
    print(table(rows, cols))
    print(f"wrote {write_json('vnni_rehearsal', {'stretch': STRETCH, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
