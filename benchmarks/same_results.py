"""Same results as another revision: every shared model pruned by both, the written bytes compared.

Run: python benchmarks/same_results.py [REV] [--quick] [--only NAME,...]
REV (default HEAD) is checked out into a temporary git worktree; each shared model is pruned by
REV and by this working tree in fresh processes (``python -m redonnx.cli prune``), with one
latency cache for both, under flag sets whose decisions do not depend on timing (``--exact``,
``--target macs``, ``--target trt``, relaxed merging, hashing, truncated separation) and the
default (``--target ort-cpu``, whose speed gate times: a rare difference there can be noise).
Outputs are compared byte for byte (external data files too), and so are the exit code and the
verification line (for refused runs, the only evidence).
Prints a Markdown table and writes benchmarks/results/same_results.json. For refactors: a
refactor must print "same" everywhere (or explain each difference).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, available, table, write_json

FLAGS = [
    ["--exact"],
    ["--target", "macs"],
    ["--target", "trt"],
    ["--target", "macs", "--alpha", "0.2", "--merge-criterion", "paper"],
    ["--target", "macs", "--tau", "3", "--alpha", "0.1"],
    ["--target", "macs", "--separate-error", "0.3"],
    [],
]


def prune(root: Path, model: Path, out: Path, flags: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Exit code and the verification line of one prune by the checkout at ``root``."""
    cmd = [sys.executable, "-m", "redonnx.cli", "prune", str(model), "-o", str(out), *flags]
    proc = subprocess.run(cmd, cwd=root, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("verification")]
    errors = proc.stderr.strip().splitlines()
    return proc.returncode, lines[0] if lines else (errors[-1] if errors else "")


def digest(out: Path) -> str:
    """Hash of the written model and of its external data (both sides write the same file names)."""
    if not out.exists():
        return "-"
    h = hashlib.sha256(out.read_bytes())
    data = out.with_name(out.name + ".data")
    if data.exists():
        h.update(data.read_bytes())
    return h.hexdigest()[:12]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", nargs="?", default="HEAD")
    ap.add_argument("--quick", action="store_true", help="--exact and --target macs only")
    ap.add_argument("--only", help="comma-separated model names (default: every shared model)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="redonnx-same-") as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.rev], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        env = {**os.environ, "REDONNX_CACHE": str(Path(tmp) / "cache")}
        try:
            for name, path, _ in available():
                if args.only and name not in args.only.split(","):
                    continue
                for flags in FLAGS[:2] if args.quick else FLAGS:
                    got = {}
                    for side, root in (("rev", other), ("tree", ROOT)):
                        out = Path(tmp) / side / f"{name}.onnx"
                        out.parent.mkdir(exist_ok=True)
                        code, line = prune(root, path, out, flags, env)
                        got[side] = (code, line, digest(out))
                        for f in (out, out.with_name(out.name + ".data")):
                            f.unlink(missing_ok=True)
                    same = got["rev"] == got["tree"]
                    rows.append({"model": name, "flags": " ".join(flags) or "(default)", "exit": got["tree"][0],
                                 "result": "same" if same else "DIFFERENT", "rev": got["rev"][2],
                                 "tree": got["tree"][2]})  # fmt: skip
                    print(f"{name} {' '.join(flags)}: {rows[-1]['result']}", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True)
    print(table(rows, ["model", "flags", "exit", "result", "rev", "tree"]))
    print(f"{sum(r['result'] == 'same' for r in rows)} of {len(rows)} the same")
    print(f"wrote {write_json('same_results', rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
