"""Tool time per phase: where a `redonnx prune` run spends its seconds, in fresh processes.

Run: python benchmarks/tool_time.py [--repeats N] [--root DIR] [--profile NAME]

Cases: the CIFAR ResNet-20 (BatchNorm kept) default; a ResNet-56-shaped model (the ResNet-20 deepened
here to 9 blocks per stage, each added block a copy of its stage's last block with its weights
perturbed by 5 % and its residual branch scaled by 0.05; BatchNorm kept) default and ``--passes
fold-batchnorm,hash-weights``; MobileNetV2 (BatchNorm kept) default. Each case runs once to warm
the latency cache (``$REDONNX_CACHE``, default a folder under /tmp shared by the runs), then
``--repeats`` times in fresh processes; the median of each phase is reported.

Python's bytecode caches are kept (as an installed copy has them), so the first run of a case
(the warm-up) compiles and the timed runs do not.

Phases are measured from outside the package by wrapping its functions (self time: a phase nested
in another is subtracted from it): imports (redonnx.cli, redonnx.io.files, redonnx.pipeline), load, sizes,
evidence (input model, realism, corrections), reference (the original's verification outputs),
planner (its trials included), speed gate, precision (the INT8 stage and its gate), passes (pipelines
the planner does not size), cost (MAC counts), verification (the final check), report, save; setup is
the rest of ``prune`` (resolving the passes, the context), "other" the rest of the process
(interpreter start, argument parsing).
``--root`` runs another checkout; ``--against DIR`` runs a second checkout alternately with it (before
and after back to back, under the same load) and prints the ratios; ``--profile NAME`` writes a
cProfile of that case to benchmarks/results/.
"cpu" is the child's user and system seconds: with every core busy a run cannot take less than cpu
divided by the cores. Prints a Markdown table and writes benchmarks/results/tool_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
RESULTS = ROOT / "benchmarks" / "results"

PHASES = ["imports", "load", "setup", "sizes", "evidence", "reference", "planner", "speed gate", "precision", "passes",
          "cost", "verification", "report", "save", "other"]  # fmt: skip
BRANCH = 0.05  # added blocks: their residual branch scaled so that the stream does not grow block after block
GOALS = {"resnet56 default": 3.0, "resnet56 hashing": 2.0, "mobilenetv2 default": 10.0}


def deepen_resnet(src: Path, out: Path, blocks: int = 9, seed: int = 0) -> Path:
    """A ResNet-56-shaped model from the CIFAR ResNet-20 (3 blocks per stage): copies of each
    stage's last block appended until the stage has ``blocks``; weights perturbed, branch halved."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in g.initializer}
    for stage in (1, 2, 3):
        prefix = f"/layer{stage}/layer{stage}.2/"
        block = [n for n in g.node if n.name.startswith(prefix)]
        block_in = next(x for x in block[0].input if x not in inits)
        block_out = block[-1].output[0]
        last = block_out
        pos = max(i for i, n in enumerate(g.node) if n.name.startswith(prefix)) + 1
        for k in range(3, blocks):
            tag = f"layer{stage}.{k}"
            rename = {block_in: last}
            for n in block:
                for o in n.output:
                    rename[o] = o.replace(f"layer{stage}.2", tag)
            for n in block:
                for x in n.input:
                    if x in inits and x not in rename:
                        a = numpy_helper.to_array(inits[x]).astype(np.float32)
                        if "conv" in x:
                            a = a * (1 + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
                        elif "bn2.weight" in x or "bn2.bias" in x:
                            a = BRANCH * a
                        name = x.replace(f"layer{stage}.2", tag)
                        g.initializer.append(numpy_helper.from_array(a, name))
                        rename[x] = name
            for n in block:
                c = onnx.NodeProto()
                c.CopyFrom(n)
                c.name = n.name.replace(f"layer{stage}.2", tag)
                c.input[:] = [rename.get(x, x) for x in n.input]
                c.output[:] = [rename[o] for o in n.output]
                g.node.insert(pos, c)
                pos += 1
            last = rename[block_out]
        for n in g.node[pos:]:
            n.input[:] = [last if x == block_out else x for x in n.input]
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


def cases(tmp: Path) -> list[tuple[str, Path, list[str]]]:
    resnet20 = SHARED / "cifar10" / "resnet20_bn.onnx"
    mobilenet = SHARED / "imagenet" / "mobilenetv2_features_bn.onnx"
    out = []
    if resnet20.exists():
        out.append(("resnet20 default", resnet20, []))
        out.append(("resnet20 int8", resnet20, ["--precision", "int8"]))  # the INT8 stage's search, any CPU
        resnet56 = deepen_resnet(resnet20, tmp / "resnet56_bn.onnx")
        out.append(("resnet56 default", resnet56, []))
        out.append(("resnet56 hashing", resnet56, ["--passes", "fold-batchnorm,hash-weights"]))
    if mobilenet.exists():
        out.append(("mobilenetv2 default", mobilenet, []))
    return out


# ------------------------------------------------------------------ the child: one timed prune


def child(argv: list[str], profile: str | None) -> None:
    """Run ``redonnx prune argv`` in this process with its phases timed; print them as JSON."""
    t_start = time.perf_counter()
    import redonnx.cli
    import redonnx.io.files
    import redonnx.pipeline

    times: dict[str, float] = {"imports": time.perf_counter() - t_start}
    stack: list[list] = []  # [phase, start, time spent in nested phases]

    def wrap(owner, attr: str, phase: str, nested: bool = True) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return

        def timed(*a, **kw):
            if not nested and stack and stack[-1][0] != "setup":
                return fn(*a, **kw)
            stack.append([phase, time.perf_counter(), 0.0])
            try:
                return fn(*a, **kw)
            finally:
                name, start, inner = stack.pop()
                spent = time.perf_counter() - start
                times[name] = times.get(name, 0.0) + spent - inner
                if stack:
                    stack[-1][2] += spent

        setattr(owner, attr, timed)

    from importlib import import_module

    from redonnx.planner import Planner

    pl, res, sz, vf = (
        import_module(f"redonnx.{m}") for m in ("pipeline", "report.result", "inputs.sizes", "measure.verify")
    )

    wrap(redonnx.io.files, "load_model", "load")
    wrap(redonnx.io.files, "save_model", "save")
    wrap(pl, "prune", "setup")
    wrap(sz, "settle", "sizes")
    for name in ("_evidence", "_settle_inputs", "settle_inputs"):
        wrap(pl, name, "evidence")
    wrap(pl, "_reference", "reference")
    wrap(pl, "run_passes", "passes")
    wrap(pl, "model_cost", "cost", nested=False)
    wrap(pl, "cost_and_shapes", "cost", nested=False)
    wrap(Planner, "plan", "planner")
    wrap(Planner, "_speed_gate", "speed gate")
    from redonnx.planner.precision import PrecisionStage

    wrap(PrecisionStage, "run", "precision")
    wrap(vf.Reference, "check", "verification", nested=False)
    wrap(vf.AtTwoSizes, "check", "verification", nested=False)
    wrap(res.PruneResult, "report", "report", nested=False)
    if profile:
        import cProfile

        prof = cProfile.Profile()
        code = prof.runcall(redonnx.cli.main, argv)
        prof.dump_stats(profile)
    else:
        with open(os.devnull, "w") as null:
            saved, sys.stdout = sys.stdout, null
            try:
                code = redonnx.cli.main(argv)
            finally:
                sys.stdout = saved
    times["in process"] = time.perf_counter() - t_start
    times["exit"] = code
    print(json.dumps(times))
    leave = getattr(redonnx.cli, "leave", None)  # checkouts before it end with the interpreter's teardown
    if leave is not None:
        leave(0)  # as the redonnx command ends


# ------------------------------------------------------------------ the parent


def run_case(root: Path, model: Path, flags: list[str], out: Path, env: dict, profile: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--", "prune", str(model), "-o", str(out),
           *flags]  # fmt: skip
    if profile:
        cmd[3:3] = ["--profile", profile]
    t0, used = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, cwd=root, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{model.name} {' '.join(flags)}: child failed:\n{proc.stderr[-3000:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    times["total"] = wall
    times["cpu"] = _children_cpu() - used
    known = sum(times.get(p, 0.0) for p in PHASES if p != "other")
    times["other"] = wall - known
    return times


def _children_cpu() -> float:
    """User and system seconds of the finished child processes so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _row(name: str, runs: list[dict], root: Path) -> dict:
    row = {"case": name, "root": str(root), **{k: statistics.median(r.get(k, 0.0) for r in runs)
                                               for k in [*PHASES, "total", "cpu"]}}  # fmt: skip
    row["runs"] = [round(r["total"], 3) for r in runs]
    row["goal"] = GOALS.get(name)
    return row


def _table(rows: list[dict]) -> str:
    cols = ["case", *PHASES, "total", "cpu", "goal"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["case"]] + [f"{r[c]:.2f}" for c in [*PHASES, "total", "cpu"]] + [
            f"<= {r['goal']:g}" if r["goal"] else ""]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout to time (default: this working tree)")
    ap.add_argument("--against", type=Path, help="another checkout, run alternately with --root: ratios")
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--profile", metavar="CASE", help="write a cProfile of this case to benchmarks/results/")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.rest, args.profile)
        return 0
    # bytecode caches as a user's Python keeps them (a sandbox's PYTHONDONTWRITEBYTECODE would make
    # every run compile the package again: 0.4 s no installed copy pays)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("REDONNX_CACHE", str(Path(tempfile.gettempdir()) / "redonnx-tool-time-cache"))
    roots = [args.root.resolve()] + ([args.against.resolve()] if args.against else [])
    rows: dict[Path, list[dict]] = {root: [] for root in roots}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="redonnx-tool-time-") as tmp:
        chosen = [c for c in cases(Path(tmp)) if not args.only or c[0] in args.only.split(",")]
        for name, model, flags in chosen:
            out = Path(tmp) / "out.onnx"
            for root in roots:
                run_case(root, model, flags, out, env)  # warm the latency cache
            runs: dict[Path, list[dict]] = {root: [] for root in roots}
            for _ in range(args.repeats):  # alternately: both see the same load
                for root in roots:
                    runs[root].append(run_case(root, model, flags, out, env))
            for root in roots:
                rows[root].append(_row(name, runs[root], root))
                print(f"{name} ({root}): {rows[root][-1]['total']:.2f} s (runs {rows[root][-1]['runs']})",
                      file=sys.stderr)  # fmt: skip
            if args.profile == name:
                dump = RESULTS / f"tool_time_{name.replace(' ', '_')}.prof"
                run_case(roots[0], model, flags, out, env, profile=str(dump))
                print(f"wrote {dump}", file=sys.stderr)
    for root in roots:
        print(f"\n{root}:\n" + _table(rows[root]))
    if args.against:
        a, b = roots
        ratios = [f"{ra['case']} {ra['total'] / rb['total']:.2f}" for ra, rb in zip(rows[a], rows[b], strict=True)]
        print(f"\ntotal time, {a} / {b}: " + ", ".join(ratios))
    load = os.getloadavg()[0]
    print(f"seconds, median of {args.repeats} fresh processes, warm latency cache; load average {load:.1f} "
          f"({os.cpu_count()} CPUs): on a shared machine compare runs back to back (--against)")  # fmt: skip
    path = RESULTS / f"tool_time{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps({"repeats": args.repeats, "load_average": load,
                                "rows": [r for root in roots for r in rows[root]]}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
