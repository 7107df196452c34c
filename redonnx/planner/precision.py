"""Precision, planned with the channels: INT8 where it fits the budget left and runs faster.

After the channel and depth stages chose the float result, the INT8 stage
(:mod:`redonnx.quantize.stage`) proposes a model per scheme (static QDQ; dynamic MatMul weights on
models without convolutions), each held to the same budget against the original. Under
``precision auto`` each proposal is timed against the float result and the input
(:func:`redonnx.planner.speed.measure`, interleaved) and the fastest that is measurably faster (the speed
gate's rule) is kept, else the float result. ``precision int8`` keeps the INT8 proposal even when
not faster (timed where a cost model is set, to say so). The channels and the precision share one
budget: INT8 gets what pruning left of it. Where pruning spent what INT8 needed (the budget, not
speed, kept some layer float) and the speed gate timed a lossless result, that result is quantized
too, held to the same budget: pruning and INT8 are two ways to spend one budget, and the faster
model that keeps it is written (its proposals say "of the lossless result").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from redonnx.errors import RedonnxError
from redonnx.passes.base import PassResult
from redonnx.planner import speed as speed_mod
from redonnx.quantize import QuantResult, Scheme, StageInputs, run_stage
from redonnx.quantize.cpu import detect
from redonnx.quantize.quantizer import TRT_OPS

PRECISIONS = ("auto", "fp32", "int8")


def resolve(precision: str | None, target: str, exact: bool) -> str:
    """The precision asked for: ``auto`` by default under ort-cpu, ``int8`` under trt-int8, else fp32;
    ``--exact`` is lossless, so fp32."""
    if precision is not None and precision not in PRECISIONS:
        raise RedonnxError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if exact:
        if precision == "int8":
            raise RedonnxError("--exact is lossless: it cannot be combined with --precision int8")
        return "fp32"
    if precision is not None:
        return precision
    return "auto" if target == "ort-cpu" else "int8" if target == "trt-int8" else "fp32"


def schemes(target: str, model: onnx.ModelProto) -> list[Scheme]:
    """What to propose: TensorRT's symmetric QDQ for trt-int8; for onnxruntime static QDQ with the
    CPU's weight range, and dynamic MatMul quantization where the model has no convolution."""
    if target == "trt-int8":
        return [Scheme("static", reduce_range=False, symmetric=True, op_types=TRT_OPS)]
    rr = detect().reduce_range
    out = [Scheme("static", reduce_range=rr)]
    if not any(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node):
        out.append(Scheme("dynamic", reduce_range=rr))
    return out


@dataclass
class PrecisionResult:
    """What the precision stage proposed and kept, and each stage's share."""

    precision: str
    target: str
    kept: str = "float"  # the kept proposal's description, or "float"
    kept_index: int | None = None  # which proposal was kept
    proposals: list[QuantResult] = field(default_factory=list)
    measured: list[dict[str, Any]] = field(default_factory=list)  # per proposal: vs float, vs input
    float_vs_input: dict[str, Any] | None = None
    float_cosine: float | None = None
    note: str = ""

    @property
    def chosen(self) -> QuantResult | None:
        return self.proposals[self.kept_index] if self.kept_index is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "target": self.target, "kept": self.kept, "kept_index": self.kept_index,
                "cpu": detect().to_dict(),
                "proposals": [p.to_dict() for p in self.proposals], "measured": self.measured,
                "stages": self.stages(), "note": self.note}  # fmt: skip

    def stages(self) -> dict[str, Any]:
        """Each stage's share of the speed-up and of the fidelity spent."""
        chosen = next((m for m in self.measured if m["kept"]), None)
        q = self.chosen
        if q is not None and q.of:  # INT8 of the lossless result: the channel stage's share is its rewrites
            cosine = q.verification.worst_cosine if q.verification is not None else None
            return {"float": {"of": q.of, "speedup_vs_input": None, "cosine": None},
                    "int8": {"speedup_vs_input": _speedup(chosen.get("vs_input")) if chosen else None,
                             "speedup_vs_float_result": _speedup(chosen.get("vs_float")) if chosen else None,
                             "cosine": cosine}}  # fmt: skip
        return {
            "float": {"speedup_vs_input": _speedup(self.float_vs_input), "cosine": self.float_cosine},
            "int8": {"speedup_vs_float": _speedup(chosen.get("vs_float")) if chosen else None,
                     "cosine": q.verification.worst_cosine if q is not None and q.verification is not None else None},
        }  # fmt: skip

    def lines(self) -> list[str]:
        out = [f"precision {self.precision} ({detect().describe()}):"]
        for p in self.proposals:
            m = next((m for m in self.measured if m["label"] == p.describe()), None)
            speed = ""
            if m is not None and "vs_float" in m:
                f = m["vs_float"]
                speed = (f"; {1 / f['ratio']:.2f}x the float result (latency ratio {f['ratio']:.3f}, 90 % interval "
                         f"{f['ratio_low']:.3f}-{f['ratio_high']:.3f})")  # fmt: skip
            out.append(f"  {p.describe()}{speed}")
        st = self.stages()
        if self.chosen is not None and self.chosen.of:
            i8 = st["int8"]
            out.append(f"  stages: the {self.chosen.of} (pruning's choice spent the budget INT8 needed), then INT8: "
                       f"{(i8['speedup_vs_input'] or 1):.2f}x the input, {(i8['speedup_vs_float_result'] or 1):.2f}x "
                       f"the pruned float result (cosine {i8['cosine']:.5f})")  # fmt: skip
        elif self.kept != "float" and st["float"]["speedup_vs_input"] is not None:
            fl, i8 = st["float"], st["int8"]
            out.append(f"  stages: float {fl['speedup_vs_input']:.2f}x (cosine {fl['cosine']:.5f}), then INT8 "
                       f"{(i8['speedup_vs_float'] or 1):.2f}x (cosine {i8['cosine']:.5f})")  # fmt: skip
        out.append(f"  writing the {'float result' if self.kept == 'float' else 'INT8 model'}"
                   + (f": {self.note}" if self.note else ""))  # fmt: skip
        return out


def _speedup(t: dict[str, Any] | None) -> float | None:
    return round(1.0 / t["ratio"], 4) if t and t.get("ratio") else None


@dataclass
class PrecisionStage:
    """Runs the INT8 stage on the float result and gates it (see the module)."""

    precision: str
    target: str
    inputs: StageInputs
    feeds: dict[str, np.ndarray] | None = None  # batch-1 timing inputs (ort-cpu)
    cache: Any = None  # latency.Cache

    def run(
        self,
        float_model: onnx.ModelProto,
        results: list[PassResult],
        float_speed: Any = None,
        float_cosine: float | None = None,
        lossless: tuple[onnx.ModelProto, list[PassResult]] | None = None,
    ) -> tuple[onnx.ModelProto, list[PassResult], PrecisionResult]:
        """INT8 proposals for ``float_model`` (and, where pruning spent the budget they needed, for
        ``lossless``: the lossless result and its passes' results), gated against ``float_model``."""
        out = PrecisionResult(self.precision, self.target, float_cosine=float_cosine)
        if float_speed is not None:
            out.float_vs_input = float_speed.final_vs_input
        timed = self.feeds is not None and self.cache is not None and self.target == "ort-cpu"
        inputs = replace(self.inputs, min_gain=speed_mod.MIN_GAIN, files=self.cache)
        if timed and self.precision == "auto":

            def probe(cand: onnx.ModelProto) -> float:  # cached: the gate below reuses a probed model's timing
                hit = speed_mod.measure(self.inputs.source, float_model, cand, self.feeds, self.cache)
                return hit["vs_exact"]["ratio"]

            inputs = replace(inputs, probe=probe, verdicts=self.cache)
        auto = timed and self.precision == "auto"
        out.proposals = run_stage(float_model, inputs, schemes(self.target, float_model), speed=auto)
        if auto and lossless is not None and any(p.budget_bound for p in out.proposals):
            second = run_stage(lossless[0], inputs, schemes(self.target, lossless[0]), speed=True)
            for p in second:
                p.of = "lossless result"
            out.proposals += second
        best = None
        for p in out.proposals:
            if p.model is None:
                continue
            entry = {"label": p.describe(), "kept": False}
            if timed:
                hit = speed_mod.measure(self.inputs.source, float_model, p.model, self.feeds, self.cache)
                entry.update(vs_float=hit["vs_exact"], vs_input=hit["vs_input"], rounds=hit["rounds"])
                ok = hit["vs_exact"]["ratio_high"] < 1.0 - speed_mod.MIN_GAIN and hit["vs_input"]["ratio"] <= 1.0
                entry["accepted"] = ok
                if (ok or self.precision == "int8") and (best is None or hit["vs_exact"]["ratio"] < best[1]):
                    best = (p, hit["vs_exact"]["ratio"], entry)
            elif best is None:
                entry["accepted"] = True
                best = (p, 1.0, entry)
            out.measured.append(entry)
        if best is None:
            out.note = _why_float(out, timed)
            return float_model, results, out
        p, _, entry = best
        entry["kept"] = True
        out.kept, out.kept_index = p.describe(), out.proposals.index(p)
        if timed and not entry["accepted"]:
            out.note = "--precision int8: kept although not measurably faster"
        elif not timed:
            out.note = "not timed: a profile for the target" if self.target != "ort-cpu" else "not timed"
        res = PassResult("quantize-int8", modified=True, layers=[c.to_dict() for c in p.layers],
                         counts={"layers in INT8": p.int8_layers,
                                 "layers kept float": len(p.layers) - p.int8_layers})  # fmt: skip
        res.seconds = p.seconds
        return p.model, [*(lossless[1] if p.of and lossless is not None else results), res], out


def _why_float(out: PrecisionResult, timed: bool) -> str:
    if not any(p.model is not None for p in out.proposals):
        return "; ".join(sorted({p.declined or "" for p in out.proposals if p.declined}))
    return "no INT8 proposal was measurably faster than the float result" if timed else "no INT8 proposal"
