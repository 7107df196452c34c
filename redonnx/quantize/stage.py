"""The INT8 stage: which layers run in INT8, under the fidelity budget, where this CPU is faster.

Given the float result (pruned or lossless) and the budget pruning was held to (one budget for
both: the check is always against the *original* model on the verification inputs):

1. **speed** (``precision auto`` with a cost model): every weighted layer is timed alone in float
   and in INT8 (:mod:`redonnx.quantize.timing`); a layer whose INT8 form is not at least
   :data:`MIN_LAYER_GAIN` faster stays float (depthwise convolutions, small layers on CPUs without
   fast int8 dot products);
   then, before any fidelity trial, whether INT8 can pay at all: the cost model's sum of what the
   faster layers save must reach the speed gate's margin of the layers' float time, and the model
   with every such layer in INT8 (the fastest the search could propose) is timed against the float
   result once (``probe``, its ranges from one sample: the speed does not depend on them); if it
   is not faster by that margin, no subset is tried (probed again with the other ops float once
   every op in INT8 is over the budget);
2. **calibration method**: the remaining layers are quantized together with the ranges of each
   method in :data:`redonnx.quantize.calibration.METHODS` in turn (MinMax, Percentile); the first
   whose model meets the budget is chosen, else the one whose model came closest;
3. **sensitivity**: if no method meets it, each layer is quantized alone and scored by its output
   deviation (1 - cosine, on the verification samples) per millisecond its INT8 form saves; the
   worst are kept in float, as few as the budget needs (bisection on how many, assuming more
   float layers never hurt). These trials' models are cut from the model with every layer in
   INT8 (:mod:`redonnx.quantize.cut`: the library's own build of those layers, bit for bit,
   without a build each); the library builds the one chosen, which is checked again and written.

The stage proposes; the pipeline's speed gate times the INT8 model against the float result and
keeps it only if measurably faster (``precision auto``). Dynamic quantization (MatMul weights,
activations quantized at run time) is a second candidate on models without convolutions.

Where this CPU's speed decides, what the search found is kept in the latency cache: a decline for
speed, or the plan of the model proposed (rebuilt and verified once by the next run); the
calibration ranges are kept too, by everything they are computed from, so a rebuilt plan does not
calibrate again.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from redonnx.errors import RedonnxError, first_line
from redonnx.io import weights
from redonnx.measure.runtime import in_order
from redonnx.planner.search import smallest_passing
from redonnx.quantize import calibration as C
from redonnx.quantize.cpu import Int8Cpu, detect
from redonnx.quantize.cut import Cutter
from redonnx.quantize.quantizer import (
    LAYER_OPS,
    Layer,
    Quantizer,
    Scheme,
    _quiet,
    activation_matmuls,
    for_scheme,
    int8_nodes,
    layers,
    prepare,
)
from redonnx.quantize.resumed import worst_cosines

MIN_LAYER_GAIN = 0.05  # a layer goes INT8 for speed only if timed at least 5 % faster alone
PLAN_VERSION = 3  # kept plans of another version of the search are not recalled

Check = Callable[[onnx.ModelProto], Any]  # a model -> VerificationResult (truthy when within budget)


#: why the fidelity budget, not speed, kept layers float (what :attr:`QuantResult.budget_bound` reads)
OVER_BUDGET = "over the budget in INT8"
BUDGET_NEEDS_IT = "kept float: among the most sensitive per ms saved, the budget needs it"
NO_LAYER_FITS = "no layer fits the budget in INT8"


@dataclass
class LayerChoice:
    """One weighted layer's precision and why."""

    name: str
    op: str
    precision: str = "int8"
    why: str = "within the budget"
    deviation: float | None = None  # 1 - output cosine with this layer alone in INT8
    float_ms: float | None = None
    int8_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class QuantResult:
    """What the stage proposes for one scheme: an INT8 model (or why none), per-layer choices."""

    scheme: Scheme
    cpu: Int8Cpu
    model: onnx.ModelProto | None = None
    method: str | None = None
    calibration: str = ""
    layers: list[LayerChoice] = field(default_factory=list)
    verification: Any = None
    trials: int = 0
    seconds: float = 0.0
    declined: str | None = None
    notes: list[str] = field(default_factory=list)
    of: str = ""  # what was quantized when not the float result (the planner's second candidate)

    @property
    def int8_layers(self) -> int:
        return sum(1 for lay in self.layers if lay.precision == "int8")

    @property
    def budget_bound(self) -> bool:
        """Whether the fidelity budget, not speed, kept some layer float (or every layer)."""
        return any(lay.precision == "float" and lay.why in (OVER_BUDGET, BUDGET_NEEDS_IT) for lay in self.layers) or (
            self.model is None and self.declined == NO_LAYER_FITS)  # fmt: skip

    def describe(self) -> str:
        what = f"int8 ({self.scheme.describe()})" + (f" of the {self.of}" if self.of else "")
        if self.model is None:
            return f"{what}: none, {self.declined}"
        cos = f", cosine {self.verification.worst_cosine:.5f}" if self.verification is not None else ""
        how = f"calibration {self.method} on {self.calibration}" if self.method else "no calibration (dynamic)"
        return (f"{what}: {self.int8_layers} of {len(self.layers)} layers in INT8, "
                f"{how}{cos}; {self.trials} trials, {self.seconds:.1f} s")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme.describe(), "of": self.of or "float result", "cpu": self.cpu.to_dict(),
                "method": self.method,
                "calibration": self.calibration, "int8_layers": self.int8_layers, "layers_total": len(self.layers),
                "layers": [lay.to_dict() for lay in self.layers], "declined": self.declined, "trials": self.trials,
                "seconds": round(self.seconds, 3), "notes": self.notes,
                "verification": self.verification.to_dict() if self.verification is not None else None}  # fmt: skip


@dataclass
class StageInputs:
    """What the stage needs from the pipeline (settled once there)."""

    source: onnx.ModelProto  # the original: corrections apply to it
    check: Check  # against the original, at the budget
    draw: Callable[[int, int], dict[str, np.ndarray]]  # (batch, seed) -> synthetic inputs
    batched: bool  # every input's first dimension is free
    calibration: dict[str, np.ndarray] | None = None  # the user's real inputs
    corrections: list | None = None  # BatchNorm corrections of the draws (realism)
    cost_model: Any = None  # CostModel: time layers (precision auto, ort-cpu)
    layer_shapes: Callable[[onnx.ModelProto], dict[str, Any]] | None = None  # node name -> LayerShape
    image: bool = True  # 4-D inputs: fewer calibration samples
    probe: Callable[[onnx.ModelProto], float] | None = None  # a model -> latency ratio to the float result
    verdicts: Any = None  # latency.Cache: speed verdicts (INT8 cannot pay) kept by the float model's bytes
    budget: str = ""  # what else a verdict depends on: the tolerance, the calibration inputs
    min_gain: float = 0.03  # the speed gate's margin (set by the planner)
    checker: Any = None  # the Checker behind ``check`` (its references): layers scored by resuming runs
    files: Any = None  # latency.Cache: calibration ranges kept by what they are computed from


def _calibration_runs(inp: StageInputs, scheme: Scheme) -> tuple[list[dict[str, np.ndarray]], str]:
    """The calibration runs and what they are (none for dynamic quantization)."""
    if scheme.mode != "static":
        return [], ""
    if inp.calibration is not None:
        n = C.sample_count(inp.calibration)
        return C.chunks(inp.calibration, inp.batched), f"the given calibration inputs ({n} samples)"
    count = C.IMAGES if inp.image else C.VECTORS
    if inp.batched:
        feeds = inp.draw(count, C.CALIBRATION_SEED)
        what = f"{count} synthetic samples (seed {C.CALIBRATION_SEED})"
        return C.chunks(feeds, True), what
    runs = [inp.draw(1, C.CALIBRATION_SEED + k) for k in range(count // C.CHUNK)]
    return runs, f"{len(runs)} synthetic samples (seeds from {C.CALIBRATION_SEED})"


@dataclass
class Stage:
    """Searches one scheme's INT8 layers for a float model (see the module)."""

    inputs: StageInputs
    scheme: Scheme
    speed: bool  # keep layers float where INT8 is not faster alone
    work: Path
    _ranges: dict[str, Path] = field(default_factory=dict)
    _calibrated: list[tuple[onnx.ModelProto, float]] | None = None  # the models calibrated, bytes a sample
    trials: int = 0
    _by_speed: bool = False  # declined for speed (a verdict worth keeping), not for fidelity
    _plan: dict[str, Any] | None = None  # how the proposed model was built: kept with the verdicts

    def run(self, float_model: onnx.ModelProto) -> QuantResult:
        """The stage's proposal. Kept by the float model's bytes (with the scheme and the budget)
        where this CPU's speed decides: a decline for speed, or the plan of the model proposed (its
        method and float layers), which the next run builds and verifies once instead of searching."""
        t0 = time.perf_counter()
        res = QuantResult(self.scheme, detect())
        key = self._verdict_key(float_model)
        hit = self.inputs.verdicts.get(key) if key else None
        try:
            if hit is not None and "plan" in hit:
                if not self._replay(float_model, res, hit["plan"]):
                    res, hit = QuantResult(self.scheme, detect()), None  # no longer holds: search again
                    self._ranges = {}  # (computed again: their notes go to this result)
                    self._run(float_model, res)
            elif hit is not None:  # a speed verdict depends on the model and this CPU alone: it is not re-timed
                res.declined, res.layers = hit["declined"], [LayerChoice(**d) for d in hit["layers"]]
                res.notes.append("speed verdict recalled from the latency cache")
            else:
                self._run(float_model, res)
        except Exception as exc:  # the library's, onnxruntime's or a load failure: the float result stays
            self._stopped(res, exc)
            hit = None
        finally:
            res.trials, res.seconds = self.trials, time.perf_counter() - t0
        if key and hit is None and self._by_speed:
            self.inputs.verdicts.put(key, {"declined": res.declined, "layers": [c.to_dict() for c in res.layers]})
        elif key and hit is None and res.model is not None and self._plan is not None:
            plan = {**self._plan, "layers": [c.to_dict() for c in res.layers], "notes": list(res.notes),
                    "calibration": res.calibration}  # fmt: skip
            self.inputs.verdicts.put(key, {"plan": plan})
        return res

    def _stopped(self, res: QuantResult, exc: Exception) -> None:
        """The stage could not go on (a model the library wrote that onnxruntime cannot load, an
        error of the library's): no INT8 model, every layer float, the reason said; nothing kept."""
        res.model, res.verification, res.method = None, None, None
        res.declined = f"stopped: {first_line(exc)}"
        for c in res.layers:
            c.precision, c.why = "float", "the stage stopped"
        self._plan, self._by_speed = None, False

    def _verdict_key(self, float_model: onnx.ModelProto) -> str | None:
        if not self.speed or self.inputs.verdicts is None:
            return None
        h = hashlib.sha1(weights.content_digest(float_model).encode())  # lean models: by their weights
        h.update(f"|{self.scheme.describe()}|{self.inputs.budget}|plan {PLAN_VERSION}".encode())
        return "int8 verdict " + h.hexdigest()

    def _replay(self, float_model: onnx.ModelProto, res: QuantResult, plan: dict[str, Any]) -> bool:
        """Build the model a plan describes (the same bytes the search built) and verify it: whether it holds."""
        try:
            exclude, method, layers_only = frozenset(plan["exclude"]), plan["method"], bool(plan["layers_only"])
            choices = [LayerChoice(**d) for d in plan["layers"]]
            notes, calibration = list(plan["notes"]), str(plan["calibration"])
            prepared = for_scheme(prepare(float_model, self.work), self.scheme)
        except (RedonnxError, KeyError, TypeError):  # a cache entry not of this form: search
            return False
        q = self._quantizer(prepared)
        runs, _ = _calibration_runs(self.inputs, self.scheme)
        model, v = self._try(q, exclude, method, runs, res, layers_only=layers_only)
        if not v:
            return False
        res.model, res.method, res.verification, res.calibration = model, method, v, calibration
        res.layers = choices
        res.notes = [*notes, "plan recalled from the latency cache: its model built and verified again"]
        return True

    def _run(self, float_model: onnx.ModelProto, res: QuantResult) -> None:
        try:
            prepared = for_scheme(prepare(float_model, self.work), self.scheme)
        except RedonnxError as exc:
            res.declined = str(exc)
            return
        found = layers(prepared)
        if not found:
            res.declined = "no weighted layer (Conv, Gemm, MatMul with a constant weight) to quantize"
            return
        q = self._quantizer(prepared)
        choices = {lay.name: LayerChoice(lay.name, lay.op) for lay in found}
        res.layers = list(choices.values())
        slow = self._timed(prepared, found, choices) if self.speed else set()
        if len(slow) == len(found):
            res.declined, self._by_speed = "INT8 is not faster than float for any layer on this CPU", True
            return
        if self.speed and (why := self._too_little(choices, slow)):
            res.declined, self._by_speed = why, True
            return
        if self.speed and (why := self._probe(q, frozenset(slow))):
            res.declined, self._by_speed = why, True
            return
        runs, res.calibration = _calibration_runs(self.inputs, self.scheme)  # drawn once INT8 may pay
        self._search(q, [lay for lay in found if lay.name not in slow], frozenset(slow), runs, choices, res)
        if res.model is not None:
            quantized = int8_nodes(res.model, [lay.name for lay in found if choices[lay.name].precision == "int8"])
            for lay in found:
                if choices[lay.name].precision == "int8" and lay.name not in quantized:
                    c = choices[lay.name]
                    c.precision, c.why = "float", "left float by onnxruntime's quantizer"

    def _too_little(self, choices: dict[str, LayerChoice], slow: set[str]) -> str:
        """Why INT8 cannot pass the speed gate by the cost model ("" if it may): what the layers
        faster alone save, against the layers' float time (an upper bound of the model's share)."""
        timed = [c for c in choices.values() if c.float_ms is not None and c.int8_ms is not None]
        total = sum(c.float_ms for c in timed)
        saved = sum(c.float_ms - c.int8_ms for c in timed if c.name not in slow)
        if total <= 0 or saved >= self.inputs.min_gain * total:
            return ""
        return (f"the {len(choices) - len(slow)} layers faster alone in INT8 would save {saved / total:.1%} of the "
                f"layers' float time (cost model): under the speed gate's {self.inputs.min_gain:.0%}")  # fmt: skip

    def _probe(self, q: Quantizer, slow: frozenset[str], layers_only: bool | None = None) -> str:
        """Why INT8 cannot pass the speed gate as timed ("" if it may): the model with every layer
        faster alone in INT8, the fastest the search could still propose, against the float result
        (first with every op the library quantizes; once that is over the budget, the weighted
        layers alone, whose Q/DQ pairs around the float ops cost time of their own)."""
        if self.inputs.probe is None:
            return ""
        method, first = self._tries()[0]
        layers_only = first if layers_only is None else layers_only
        cache = self._probe_ranges(q) if method else None
        ratio = self.inputs.probe(q.build(slow, None, cache, "MinMax", layers_only))
        if ratio < 1.0 - self.inputs.min_gain:
            return ""
        what = "the weighted layers" if layers_only and not first else "every layer"
        return (f"with {what} faster alone in INT8 the model ran at {ratio:.3f}x the float result's latency: "
                f"not faster by the speed gate's {self.inputs.min_gain:.0%}")  # fmt: skip

    def _probe_ranges(self, q: Quantizer) -> Path:
        """Ranges for the probe, which is timed, not verified: the model's MinMax on one sample
        (the given inputs' first, else one draw of the calibration seed). Where the tensors are
        quantized does not depend on the ranges' values, and the int8 kernels' speed does not
        either; the calibration proper (drawing every sample, through the corrected original too)
        is spent only once the probe says INT8 may pay (MobileNetV2's 64 draws: 1.4 s)."""
        if "probe" not in self._ranges:
            inp = self.inputs
            if inp.calibration is not None:
                first = C.chunks(inp.calibration, inp.batched)[0]
                one = [{k: v[:1] for k, v in first.items()}] if inp.batched else [first]
            else:
                one = [inp.draw(1, C.CALIBRATION_SEED)]
            with _quiet():
                data = C.tensor_ranges(q.prepared, one, "MinMax", self.work)
            self._ranges["probe"] = C.write_cache(data, self.work / "ranges_probe.json")
        return self._ranges["probe"]

    def _tries(self) -> list[tuple[str | None, bool]]:
        """The first trials' (calibration method, weighted layers only), in order: every op the library
        quantizes with MinMax (static), then the weighted layers alone with each method."""
        methods: list[str | None] = list(C.METHODS) if self.scheme.mode == "static" else [None]
        tries = [(m, True) for m in methods]
        ops = self.scheme.op_types  # dynamic quantizes the weighted layers' MatMuls alone either way
        if self.scheme.mode == "static" and (ops is None or set(ops) - set(LAYER_OPS)):
            tries.insert(0, (methods[0], False))
        return tries

    def _timed(self, prepared: onnx.ModelProto, found: list[Layer], choices: dict[str, LayerChoice]) -> set[str]:
        from redonnx.quantize.timing import int8_vs_float

        cost = self.inputs.cost_model
        shapes = self.inputs.layer_shapes(prepared) if self.inputs.layer_shapes is not None else {}
        slow = set()
        for lay in found:
            shape = shapes.get(lay.name)
            if shape is None or cost is None:
                continue
            c = choices[lay.name]
            c.float_ms, c.int8_ms = int8_vs_float(cost, shape, self.scheme)  # one comparison
            if c.int8_ms is None or c.int8_ms > (1 - MIN_LAYER_GAIN) * c.float_ms:
                slow.add(lay.name)
                c.precision = "float"
                c.why = (f"int8 not faster on this CPU ({c.int8_ms:.3f} vs {c.float_ms:.3f} ms alone)"
                         if c.int8_ms is not None else "the quantizer leaves it float")  # fmt: skip
        return slow

    def _ranges_for(self, q: Quantizer, runs: list[dict[str, np.ndarray]], method: str, res: QuantResult) -> Path:
        """``method``'s ranges as onnxruntime's calibration cache file: computed once per stage, and
        kept in the latency cache by everything they are computed from (:meth:`_ranges_key`), so a
        recalled plan builds its model without calibrating again (ResNet-56: 1.4 s a proposal)."""
        if method not in self._ranges:
            path = self.work / f"ranges_{method}.json"
            key = self._ranges_key(q, runs, method)
            kept = _kept_ranges(self.inputs.files.get_text(key)) if key else None
            if kept is None:
                notes = self._calibrate(q, runs, method, path)
                if key:
                    self.inputs.files.put_text(key, json.dumps({"ranges": path.read_text(), "notes": notes}))
            else:
                path.write_text(kept["ranges"])
                notes = kept["notes"]
            for n in notes:  # the BatchNorm note once, whichever method's count it carries
                said = n in res.notes or ("BatchNorm" in n and any("BatchNorm" in m for m in res.notes))
                if not said:
                    res.notes.append(n)
            self._ranges[method] = path
        return self._ranges[method]

    def _calibrate(self, q: Quantizer, runs: list[dict[str, np.ndarray]], method: str, path: Path) -> list[str]:
        """Compute ``method``'s ranges into ``path``; what to say of them."""
        histogram = method != "MinMax"  # a pass each and numpy time per tensor: 64 samples at most
        jobs = [(m, C.within_memory(runs, per, histogram, self.inputs.batched)) for m, per in self._models(q, runs)]
        with _quiet():
            data, shared = C.ranges(jobs, method, self.work)
        notes = [f"ranges of {shared} tensors read from the BatchNorm-corrected original"] if shared else []
        offered = sum(C.sample_count(r) for r in C.first_samples(runs, C.HISTOGRAM_SAMPLES))
        used = min(sum(C.sample_count(r) for r in job[1]) for job in jobs)
        if histogram and used < offered:
            notes.append(f"{method} ranges from {used} of {offered} samples: onnxruntime's histogram "
                         f"calibrators hold every sample's activations, and more would exceed "
                         f"{C.HISTOGRAM_BYTES / 2**20:.0f} MiB")  # fmt: skip
        C.write_cache(data, path)
        return notes

    def _corrected(self) -> bool:
        """Whether ranges are read from the BatchNorm-corrected original too (synthetic draws)."""
        return bool(self.inputs.corrections) and self.inputs.calibration is None

    def _ranges_key(self, q: Quantizer, runs: list[dict[str, np.ndarray]], method: str) -> str | None:
        """What a calibration's ranges are computed from: onnxruntime's version, the method and the
        memory limits, the model quantized, the runs' samples, and where the draws are corrected the
        original and its corrections (the latency cache is per CPU: its kernels' last bits too)."""
        if self.inputs.files is None:
            return None
        import onnxruntime

        limits = f"{C.RUN_BYTES}|{C.HISTOGRAM_BYTES}|{C.HISTOGRAM_SAMPLES}"
        h = hashlib.sha1(f"ranges 1|{onnxruntime.__version__}|{method}|{self.inputs.batched}|{limits}|".encode())
        h.update(weights.content_digest(q.prepared).encode())
        for run in runs:
            for name in sorted(run):
                _update(h, name, run[name])
        if self._corrected():
            h.update(f"|corrected {weights.content_digest(self.inputs.source)}".encode())
            for c in self.inputs.corrections:
                h.update(f"|{c.tensor}|{c.rank}|{c.input}".encode())
                for part, arr in (("scale", c.scale), ("shift", c.shift), ("input_shift", c.input_shift)):
                    _update(h, part, arr)
        return h.hexdigest()

    def _models(self, q: Quantizer, runs: list[dict[str, np.ndarray]]) -> list[tuple[onnx.ModelProto, float]]:
        """The models whose ranges are read (the prepared one; the BatchNorm-corrected original where
        the draws are synthetic) and the bytes one sample's activations take in each: once."""
        if self._calibrated is None:
            models = [q.prepared]
            if self._corrected():
                from redonnx.inputs.realism import intervene
                from redonnx.io.external_data import inline_copy

                models.append(inline_copy(intervene(self.inputs.source, self.inputs.corrections)))
            self._calibrated = [(m, C.sample_bytes(m, runs[0], self.inputs.batched)) for m in models]
        return self._calibrated

    def _quantizer(self, prepared: onnx.ModelProto) -> Quantizer:
        return Quantizer(prepared, self.scheme, self.work, frozenset(activation_matmuls(prepared)))

    def _build(self, q: Quantizer, exclude: frozenset[str], method: str | None, runs, res, only=None,
               layers_only: bool = True) -> onnx.ModelProto:  # fmt: skip
        """One trial's model (with ``method``'s ranges)."""
        cache = self._ranges_for(q, runs, method, res) if method else None
        self.trials += 1
        return q.build(exclude, only, cache, method or "MinMax", layers_only)

    def _try(self, q: Quantizer, exclude: frozenset[str], method: str | None, runs, res, only=None,
             layers_only: bool = True):  # fmt: skip
        model = self._build(q, exclude, method, runs, res, only, layers_only)
        return model, self.inputs.check(model)

    def _search(self, q: Quantizer, cands: list[Layer], slow: frozenset[str], runs, choices, res: QuantResult) -> None:
        best = None
        tries = self._tries()
        for method, layers_only in tries:
            other_ops_float = layers_only and not tries[0][1] and method == tries[0][0]
            if other_ops_float and self.speed and (why := self._probe(q, slow, layers_only=True)):
                res.declined, self._by_speed = why, True
                return
            model, v = self._try(q, slow, method, runs, res, layers_only=layers_only)
            if best is None or v.worst_cosine > best[2].worst_cosine:
                best = (method, model, v)
            if v:
                res.model, res.method, res.verification = model, method, v
                self._plan = {"exclude": sorted(slow), "method": method, "layers_only": layers_only}
                if layers_only and tries[0] != (method, True):
                    res.notes.append("other ops (Add, pooling...) kept float: in INT8 they were over the budget")
                return
        method = best[0]
        res.method = method
        res.notes.append(f"every layer in INT8 is over the budget (best: {method or 'dynamic'}, cosine "
                         f"{best[2].worst_cosine:.5f}): sensitive layers kept float")  # fmt: skip
        self._sensitive_float(q, cands, slow, method, runs, choices, res)

    def _sensitive_float(self, q: Quantizer, cands: list[Layer], slow: frozenset[str], method: str | None, runs,
                         choices: dict[str, LayerChoice], res: QuantResult) -> None:  # fmt: skip
        """Keep the most sensitive layers float, as few as the budget needs. Every trial's model is
        cut from the model with every candidate in INT8 (:mod:`redonnx.quantize.cut`: what the
        library writes for those layers, bit for bit, without a build each); the one chosen is
        then built by the library, checked, and written."""
        cache = self._ranges_for(q, runs, method, res) if method else None
        cutter = Cutter(q.prepared, q.build(slow, None, cache, method or "MinMax", True), self.scheme.output_pairs)

        def cut(int8: list[str], exclude: frozenset[str]) -> onnx.ModelProto:
            model = cutter.cut(int8)
            if model is None:  # not cut: the library builds it (a trial counted there)
                return self._build(q, exclude, method, runs, res, only=frozenset(int8))
            self.trials += 1
            return model

        resumed = {}
        if self.inputs.checker is not None:  # each layer's run resumed where its INT8 form starts
            names = [lay.name for lay in cands]
            resumed = worst_cosines(q.prepared, cutter, names, self.inputs.checker, self.inputs.batched)
            self.trials += len(resumed)
        order = self._sensitivity(cands, choices, lambda lay: cut([lay.name], slow), resumed)
        trials: dict[int, tuple] = {}

        def passes(k: int) -> bool:  # the k most sensitive layers float
            if k not in trials:
                model = cut([lay.name for lay in cands if lay.name not in order[:k]], slow | frozenset(order[:k]))
                trials[k] = (model, self.inputs.check(model))
            return bool(trials[k][1])

        top = len(order) - 1  # k = 0 failed above; k = len(order) would leave no layer in INT8
        k = smallest_passing(passes, top) if top >= 1 else 0  # bisection (see smallest_passing)
        if not k or not passes(k):
            res.declined = NO_LAYER_FITS
            for name in order:
                choices[name].precision, choices[name].why = "float", OVER_BUDGET
            return
        exclude = slow | frozenset(order[:k])
        res.model, res.verification = self._try(q, exclude, method, runs, res)  # the library's, to write
        if res.verification:
            self._plan = {"exclude": sorted(exclude), "method": method, "layers_only": True}
        else:  # not the cut after all: the cut, as verified, is written, and no plan (the library builds another)
            res.model, res.verification = trials[k]
            res.notes.append("the library's build of the chosen layers differed from their cut: the cut is written")
        for name in order[:k]:
            choices[name].precision = "float"
            choices[name].why = BUDGET_NEEDS_IT

    def _sensitivity(self, cands: list[Layer], choices: dict[str, LayerChoice],
                     alone: Callable[[Layer], onnx.ModelProto], resumed: dict[str, float]) -> list[str]:  # fmt: skip
        """Layer names, worst first: output deviation ``alone`` in INT8 per ms saved, on the samples
        every verdict is on (fewer or other samples ranked worse: where pruning left little of the
        budget, ResNet-56 kept 1-4 of 48 layers in INT8 where these keep 36). ``resumed``: the worst
        cosines of the layers scored by resuming the float model's run (:mod:`redonnx.quantize.resumed`);
        the others are checked whole, on the workers, in order."""
        whole = [lay for lay in cands if lay.name not in resumed]
        cosines = dict(resumed)
        for lay, v in zip(whole, in_order(self.inputs.check, (alone(lay) for lay in whole)), strict=True):
            cosines[lay.name] = v.worst_cosine
        scored = []
        for lay in cands:
            c = choices[lay.name]
            c.deviation = max(0.0, 1.0 - cosines[lay.name])
            saved = (c.float_ms - c.int8_ms) if c.float_ms is not None and c.int8_ms is not None else 1.0
            scored.append((c.deviation / max(saved, 1e-4), lay.name))
        return [name for _, name in sorted(scored, key=lambda s: (-s[0], s[1]))]


def _update(h: Any, name: str, arr: np.ndarray | None) -> None:
    """Feed an array (its name, type and shape too) to a hash."""
    if arr is None:
        h.update(f"|{name}: none".encode())
        return
    a = np.ascontiguousarray(arr)
    h.update(f"|{name}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())


def _kept_ranges(text: str | None) -> dict[str, Any] | None:
    """A kept calibration (its cache file's text, its notes), or None where absent or not of that form."""
    if text is None:
        return None
    try:
        entry = json.loads(text)
        ok = isinstance(entry["notes"], list) and isinstance(json.loads(entry["ranges"]), dict)
    except (ValueError, TypeError, KeyError):
        return None
    return entry if ok else None


def run_stage(float_model: onnx.ModelProto, inputs: StageInputs, schemes: list[Scheme],
              speed: bool) -> list[QuantResult]:  # fmt: skip
    """The stage for each scheme, on a scratch folder removed afterwards (and the memoized weight
    quantization dropped)."""
    from redonnx.quantize import memo

    out = []
    try:
        with tempfile.TemporaryDirectory(prefix="redonnx-int8-") as tmp:
            for k, scheme in enumerate(schemes):
                work = Path(tmp) / str(k)
                work.mkdir()
                out.append(Stage(inputs, scheme, speed, work).run(float_model))
    finally:
        memo.clear()  # the weights' quantization is not kept past the stage
    return out
