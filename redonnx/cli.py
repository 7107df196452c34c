"""Command line: ``redonnx prune | verify | inspect | bench``.

Exit codes: 0 success, 1 verification failed (nothing written), 2 bad input or usage
(one line on stderr, no traceback, no partial file).

Parsing imports nothing heavy (onnx costs about a second through ml_dtypes): each command imports
what it runs, and ``--help`` fills in the pass names and defaults when it prints them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from redonnx.errors import RedonnxError

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2
PASS_NAMES, SAMPLES = "{passes}", "{samples}"  # filled in when help is printed


class _Formatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and PASS_NAMES in text:
            from redonnx.passes import PASSES

            text = text.replace(PASS_NAMES, ", ".join(PASSES))
        if text and SAMPLES in text:
            from redonnx.measure.verify import DEFAULT_SAMPLES

            text = text.replace(SAMPLES, str(DEFAULT_SAMPLES))
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)

    def error(self, message: str) -> None:  # one line, exit 2
        raise RedonnxError(f"{message} (see '{self.prog} --help')")


def check_writable(path: Path) -> Path:
    from redonnx.io.files import check_writable as check

    return check(path)


def _common_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", metavar="NAME=D0,D1,...", help="static shape for an input")


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", metavar="FILE.npz", help="real inputs, one array per input name")
    p.add_argument("--samples", type=int, help=f"random samples (default {SAMPLES})")
    p.add_argument("--atol", type=float, help="absolute tolerance (default 1e-6)")
    p.add_argument("--rtol", type=float, help="tolerance relative to max|ref| (default 1e-4; 0.5 with lossy passes)")
    p.add_argument("--min-cosine", type=float, help="minimum cosine similarity per output (0.99 with lossy passes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def _hash_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hash-weights")
    g.add_argument("--tau", type=float, help="contrast: merge modes closer than TAU %% of a layer's range")
    g.add_argument("--tau-strategy", choices=["constant", "block", "ascending", "descending"])
    g.add_argument("--hash-rule", choices=["bounded", "paper"], help="bandwidth and value rule (default bounded)")
    g.add_argument("--hash-error", type=float, help="bounded rule: max relative error per tensor (default 0.06)")
    g.add_argument("--bandwidth", help="fixed KDE bandwidth: paper, silverman, scott or a number")
    g.add_argument("--grid", type=int, help="density grid points (default 4096)")
    g.add_argument("--hash-biases", action="store_true", help="hash biases too")
    g.add_argument("--plot-dir", metavar="DIR", help="write a density plot per hashed layer (needs matplotlib)")
    g = p.add_argument_group("merge-channels")
    g.add_argument("--alpha", type=float, help="relaxed merging: fraction of channels to remove (default 0: exact)")
    g.add_argument("--merge-criterion", choices=["reconstruct", "paper"], help="relaxed rule (default reconstruct)")
    g.add_argument("--alpha-strategy", choices=["constant", "block"], help="paper rule: per-layer alpha")
    g.add_argument("--calibration", metavar="FILE.npz",
                   help="real inputs: channel statistics from them and a least-squares refit of the pruned layers "
                        "(default: synthetic statistics, no refit)")  # fmt: skip
    g.add_argument("--no-refit", action="store_true", help="with --calibration: statistics only, no refit")
    g.add_argument("--channel-multiple", type=int, help="keep channel counts multiples of N (8 suits onnxruntime CPU)")
    g = p.add_argument_group("separate-depthwise")
    g.add_argument("--separate-error", type=float, help="truncate per-channel ranks within this relative error")


def _configured(args: argparse.Namespace, plot_dir: str | None = None) -> list[Any]:
    """Pass instances configured by the flags (only for the passes whose flags were given); they
    stand in for the pipeline's passes of the same names."""
    from redonnx.passes import DEFAULT_HASH_ERROR, HashWeights, MergeChannels, SeparateDepthwise

    out: list[Any] = []
    hashing = _given(args, {"tau": "tau", "tau_strategy": "tau_strategy", "hash_rule": "rule",
                            "hash_error": "max_error", "bandwidth": "bandwidth", "grid": "grid"})  # fmt: skip
    if args.hash_biases:
        hashing["biases"] = True
    if plot_dir is not None:
        hashing.update(plot_dir=plot_dir, plot_limit=4)
    if args.plot_dir:
        hashing["plot_dir"] = args.plot_dir
    if hashing:
        if not args.passes and not args.exact:  # the default pipeline's bound unless one is given
            hashing.setdefault("max_error", DEFAULT_HASH_ERROR)
        out.append(HashWeights(**hashing))
    merging = _given(args, {"alpha": "alpha", "merge_criterion": "criterion", "alpha_strategy": "alpha_strategy",
                            "channel_multiple": "channel_multiple"})  # fmt: skip
    if merging:
        out.append(MergeChannels(**merging))
    if args.separate_error is not None:
        out.append(SeparateDepthwise(max_error=args.separate_error))
    return out


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """Pass parameters (flag name -> parameter name) for the flags given on the command line."""
    return {param: getattr(args, flag) for flag, param in flags.items() if getattr(args, flag) is not None}


def build_parser() -> argparse.ArgumentParser:
    from redonnx import __version__

    parser = _Parser(prog="redonnx", description="Data-free ONNX pruning verified with onnxruntime.")
    parser.add_argument("--version", action="version", version=f"redonnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="rewrite a model and verify it against the original")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--exact", action="store_true", help="lossless rewrites only")
    p.add_argument("--passes", help=f"comma-separated passes: {PASS_NAMES}")
    p.add_argument("--report", metavar="R.json", help="write a JSON report")
    p.add_argument("--force", action="store_true", help="allow overwriting the input file")
    p.add_argument("--external-data", action="store_true", help="store weights beside the model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--html", metavar="PAGE.html", help="write an HTML report with plots (needs matplotlib)")
    p.add_argument("--bench", action="store_true", help="measure onnxruntime latency before and after")
    p.add_argument("--no-verify", action="store_true", help="with --exact only: write without running onnxruntime")
    p.add_argument("--target", choices=["ort-cpu", "trt", "trt-int8", "macs"], default="ort-cpu",
                   help="what to optimize: ort-cpu (measured onnxruntime CPU latency, default), trt / trt-int8 (MACs "
                        "with channel counts in multiples of 8 / 16 for TensorRT), macs (MACs, any count; hashing "
                        "for size)")  # fmt: skip
    p.add_argument("--precision", choices=["auto", "fp32", "int8"],
                   help="auto (default with --target ort-cpu): INT8 layers where they fit the budget and the "
                        "model runs measurably faster; int8: every layer the budget allows, even if not faster "
                        "(default with --target trt-int8: TensorRT QDQ); fp32: keep float")  # fmt: skip
    g = p.add_argument_group("fidelity budget (default: output cosine >= 0.998 on the verification inputs)")
    g.add_argument("--max-error", type=float, help="max |diff| as a fraction of max |ref|, per output")
    g.add_argument("--min-agreement", type=float, help="top-1 agreement of 2-D score outputs (0..1)")
    g.add_argument("--target-macs", type=float, metavar="P", help="remove at least P %% of the MACs instead")
    _common_inputs(p)
    _verify_args(p)
    _hash_args(p)

    p = sub.add_parser("verify", help="compare a candidate model with its reference")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--json", action="store_true")
    _common_inputs(p)
    _verify_args(p)

    p = sub.add_parser("inspect", help="parameters, MACs per layer, op histogram")
    p.add_argument("input")
    p.add_argument("--json", action="store_true")
    p.add_argument("--top", type=int, default=0, help="only the N layers with most MACs")
    _common_inputs(p)

    p = sub.add_parser("bench", help="onnxruntime CPU latency of one model or two")
    p.add_argument("input")
    p.add_argument("input2", nargs="?")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime default)")
    p.add_argument("--inputs", metavar="FILE.npz", help="inputs to time on (default: valid ones drawn as inferred)")
    p.add_argument("--json", action="store_true")
    _common_inputs(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"prune": cmd_prune, "verify": cmd_verify, "inspect": cmd_inspect, "bench": cmd_bench}[args.command](
            args
        )
    except RedonnxError as exc:
        print(f"redonnx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("redonnx: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("redonnx: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `redonnx ... | head`: stop quietly, as tools killed by SIGPIPE do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # e.g. the disk filled up while writing scratch or output files
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"redonnx: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # never a traceback for users; REDONNX_DEBUG=1 shows it
        if os.environ.get("REDONNX_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"redonnx: error: internal error {type(exc).__name__}: {msg} (REDONNX_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    finally:
        if "redonnx.io.weights" in sys.modules:  # lean exports' data files live only as long as the command
            sys.modules["redonnx.io.weights"].SCRATCH.close()


def _shapes(args: argparse.Namespace) -> dict[str, list[int]]:
    from redonnx.inputs.shapes import parse_shape_args

    return parse_shape_args(args.shape)


def _verify_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.samples is None:
        from redonnx.measure.verify import DEFAULT_SAMPLES

        args.samples = DEFAULT_SAMPLES
    if args.samples < 1:
        raise RedonnxError("--samples must be at least 1")
    if (args.atol or 0) < 0 or (args.rtol or 0) < 0:
        raise RedonnxError("--atol and --rtol must not be negative")
    if args.min_cosine is not None and not -1 <= args.min_cosine <= 1:
        raise RedonnxError("--min-cosine must be between -1 and 1")
    if args.inputs and not Path(args.inputs).is_file():
        raise RedonnxError(f"--inputs {args.inputs}: no such file")
    return {
        "inputs": args.inputs,
        "samples": args.samples,
        "atol": args.atol,
        "rtol": args.rtol,
        "min_cosine": args.min_cosine,
    }


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON next to ``path`` then rename, so a reader never sees half a file."""
    out = Path(path)
    folder = check_writable(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".redonnx-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
        from redonnx.io.files import publish

        publish(Path(tmp), out)
    except OSError as exc:
        raise RedonnxError(f"{out}: cannot write: {exc.strerror or exc}") from None


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def cmd_prune(args: argparse.Namespace) -> int:
    from redonnx.io.files import load_model, save_model
    from redonnx.pipeline import prune

    names = [n.strip() for n in args.passes.split(",") if n.strip()] if args.passes else None
    out = Path(args.output)
    src = load_model(args.input)
    if not args.force and out.exists() and src.path and os.path.samefile(out, src.path):
        raise RedonnxError(f"{out}: refusing to overwrite the input model (use --force)")
    check_writable(out)
    if args.report:
        check_writable(Path(args.report))
    from redonnx.io.weights import SCRATCH

    SCRATCH.use(out.parent)  # large models: scratch data files on the output's disk, not in /tmp
    calibration = None
    if args.calibration:
        from redonnx.measure.runtime import load_npz_inputs

        calibration = load_npz_inputs(args.calibration, src.model)
    kw = _verify_kwargs(args)
    if args.max_error is not None:
        kw["rtol"] = args.max_error
    if args.target_macs is not None and not 0 < args.target_macs < 100:
        raise RedonnxError("--target-macs must be a percentage between 0 and 100")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise RedonnxError("--min-agreement must be between 0 and 1")
    if args.no_verify and not args.exact:
        raise RedonnxError("--no-verify needs --exact: lossy rewrites are only written once verified")
    density_dir = None
    if args.html:
        check_writable(Path(args.html))
        density_dir = tempfile.mkdtemp(prefix="redonnx-plots-")
    progress = (lambda msg: print(f"  {msg}", file=sys.stderr)) if sys.stderr.isatty() and not args.json else None
    result = prune(src, passes=names, configured=_configured(args, density_dir), exact=args.exact,
                   shapes=_shapes(args), calibration=calibration, refit=not args.no_refit, progress=progress,
                   min_agreement=args.min_agreement, target_macs=args.target_macs, check=not args.no_verify,
                   target=args.target, precision=args.precision, **kw)  # fmt: skip
    report = result.report()
    if args.bench:
        from redonnx.report.tables import latency

        feeds = result.evidence.inputs.draw(src.model, result.before.input_shapes, batch=1, seed=0)
        report["latency"] = latency(src.model, result.model, feeds)
    report["output"] = str(out)
    ok = bool(result.verification) if result.verification is not None else True
    if result.verification is None:
        report["notes"].append("not verified (--no-verify): onnxruntime was not run")
    if ok:
        save_model(result.model, out, source=src, external_data=args.external_data or None, force=args.force)
    else:
        report["output"] = None
    if args.report:
        write_json_atomic(args.report, report)
    if args.html:
        from redonnx.report.tables import write_html

        write_html(report, args.html, sorted(Path(density_dir).glob("*.png")) if density_dir else None)
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        print(result.summary(command=f"redonnx prune {args.input} -o {args.output}"))
        if "latency" in report:
            lat = report["latency"]
            print(
                f"latency {lat['before_ms']:.3f} -> {lat['after_ms']:.3f} ms ({lat['speedup']:.2f}x, onnxruntime CPU)"
            )
        if result.verification is None:
            print("NOT verified (--no-verify): lossless rewrites only, onnxruntime was not run")
        print(f"wrote {out}" if ok else "verification failed: nothing written")
    return EXIT_OK if ok else EXIT_VERIFY


def cmd_verify(args: argparse.Namespace) -> int:
    """Exact tolerances by default; a cosine budget (``--min-cosine``) is a lossy comparison, with
    prune's lossy rtol unless ``--rtol`` is given."""
    from redonnx.measure.verify import DEFAULT_ATOL, DEFAULT_RTOL, LOSSY_RTOL, verify

    kw = _verify_kwargs(args)
    lossy = kw.get("min_cosine") is not None
    kw["atol"] = DEFAULT_ATOL if kw["atol"] is None else kw["atol"]
    kw["rtol"] = (LOSSY_RTOL if lossy else DEFAULT_RTOL) if kw["rtol"] is None else kw["rtol"]
    result = verify(args.reference, args.candidate, shapes=_shapes(args), seed=args.seed, **kw)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=_json_default))
    else:
        print(result.summary())
        if not result and not lossy and args.rtol is None:
            print(
                "  (exact tolerances: a model `prune` wrote under a fidelity budget, pruned or INT8, is held "
                "to that budget; its summary names it: redonnx verify REFERENCE CANDIDATE --min-cosine 0.998)"
            )
    return EXIT_OK if result else EXIT_VERIFY


def cmd_inspect(args: argparse.Namespace) -> int:
    from redonnx.io.files import load_model
    from redonnx.measure.cost import format_cost, model_cost

    src = load_model(args.input)
    cost = model_cost(src.model, _shapes(args))
    cost.notes = src.notes + cost.notes
    if args.json:
        print(json.dumps(cost.to_dict(), indent=2, default=_json_default))
    else:
        print(format_cost(cost, top=args.top))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from redonnx.measure.bench import bench_models, format_bench

    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        raise RedonnxError("--runs and --batch must be positive, --warmup not negative")
    paths = [p for p in (args.input, args.input2) if p]
    if args.inputs and not Path(args.inputs).is_file():
        raise RedonnxError(f"--inputs {args.inputs}: no such file")
    result = bench_models(paths, shapes=_shapes(args), runs=args.runs, warmup=args.warmup, batch=args.batch,
                          threads=args.threads, inputs=args.inputs)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2, default=_json_default))
    else:
        print(format_bench(result))
    return EXIT_OK


def entry() -> None:
    """The ``redonnx`` command: :func:`main`, then :func:`leave`."""
    leave(main())


def leave(code: int) -> None:
    """End the process with ``code`` once output is flushed and the exit handlers have run (scratch
    files removed), skipping the interpreter's teardown: freeing every module, session and array
    costs a tenth of a second that a finished command has no use for. Output that cannot be written
    fails the command with 120, as Python's own exit does; a reader that has gone (a closed pipe)
    does not."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass
        except (OSError, ValueError):  # a full disk, a closed stream: the output is not all there
            code = code or 120
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    entry()
