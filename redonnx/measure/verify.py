"""Numerical verification of a candidate model against its reference with onnxruntime.

Both models run with graph optimizations off on the same seeded (or given) inputs. Each output
gets absolute and relative error statistics, cosine similarity, top-1 agreement for 2-D score
outputs, and the smallest tolerance that would have passed. An output passes when

    max |cand - ref| <= atol + rtol * max |ref|    and, if set,    cosine(cand, ref) >= min_cosine

Exact rewrites are held to atol 1e-6, rtol 1e-4. atol is the floor for outputs that are all small:
onnxruntime's float32 Sigmoid resolves its outputs to ~1.5e-7 absolute, so where it saturates on
synthetic inputs (PP-OCRv4 det: max output 6e-5 on N(0, 1) images, logits near -10) any change of
rounding upstream (an exact fold, onnxruntime's own Conv+BN fusion, an input moved by one ulp) moves
them by ~1e-3 of max|ref| while the logits agree to 1e-6; such differences are reported "within
atol", and samples that differ by no more have no per-sample cosine (one of round-off).
Lossy ones (hashing, relaxed merging) change outputs by design; their default budget is
cosine >= 0.99 with no output off by more than half its range (rtol 0.5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from redonnx.errors import RedonnxError, first_line
from redonnx.inputs.model import InputModel
from redonnx.inputs.model import infer as infer_inputs
from redonnx.inputs.shapes import graph_inputs
from redonnx.io.files import LoadedModel, load_model
from redonnx.measure.runtime import in_order, load_npz_inputs, run, try_session

DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-4
LOSSY_RTOL = 0.5
LOSSY_MIN_COSINE = 0.99
BUDGET_MIN_COSINE = 0.998  # default budget when prune chooses how much to remove (see README: why 0.998)
CAUTIOUS_MIN_COSINE = 0.9995  # the same when synthetic inputs cannot be shown to look like the data
DEFAULT_SAMPLES = 8


@dataclass
class OutputComparison:
    """Error statistics for one output."""

    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    ref_max_abs: float
    cosine: float
    top1_agreement: float | None
    needed_rtol: float
    passed: bool
    worst_sample_cosine: float | None = None  # per-sample cosines' minimum (batched outputs)
    within_atol: bool = False  # max|diff| <= atol <= 1e-6: differences at the absolute floor (module doc)

    def line(self) -> str:
        top1 = f", top-1 {self.top1_agreement:.2%}" if self.top1_agreement is not None else ""
        if self.worst_sample_cosine is not None and self.worst_sample_cosine < 0.999999:
            top1 = f", worst sample {self.worst_sample_cosine:.4f}" + top1
        mark = "ok  " if self.passed else "FAIL"
        within = "within atol; " if self.within_atol and self.max_abs > 0 else ""
        return (
            f"{mark} {self.name} {self.shape}: max|diff| {self.max_abs:.3g} "
            f"({within}{self.needed_rtol:.3g} of max|ref| {self.ref_max_abs:.3g}), mean {self.mean_abs:.3g}, "
            f"cosine {self.cosine:.6f}{top1}"
        )


@dataclass
class VerificationResult:
    """Comparison of every output; truthy when all pass."""

    outputs: list[OutputComparison]
    atol: float
    rtol: float
    samples: int
    inputs: str
    min_cosine: float | None = None
    min_agreement: float | None = None
    notes: list[str] = field(default_factory=list)
    kernels: str = ""  # how the candidate ran, where not as the reference did (INT8: as deployed)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def worst_rel(self) -> float:
        return max((o.needed_rtol for o in self.outputs), default=0.0)

    @property
    def worst_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def min_top1(self) -> float | None:
        vals = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        head = "verification passed" if self.passed else "verification FAILED"
        cos = f", cosine >= {self.min_cosine:g}" if self.min_cosine is not None else ""
        agr = f", top-1 agreement >= {self.min_agreement:g}" if self.min_agreement is not None else ""
        run = f"; {self.kernels}" if self.kernels else ""
        lines = [f"{head} (atol {self.atol:g}, rtol {self.rtol:g}{cos}{agr}, {self.inputs}{run})"]
        lines += ["  " + o.line() for o in self.outputs]
        return "\n".join(lines)


def compare_arrays(
    name: str,
    ref: np.ndarray,
    cand: np.ndarray,
    atol: float,
    rtol: float,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
) -> OutputComparison:
    """Statistics of ``cand`` against ``ref`` for one output."""
    if ref.shape != cand.shape:
        raise RedonnxError(f"output {name!r}: shape {list(cand.shape)} differs from the reference {list(ref.shape)}")
    r = ref.astype(np.float64).reshape(-1)
    c = cand.astype(np.float64).reshape(-1)
    finite = _all_finite(r, c)
    if finite:  # the values the general case gives, without its passes for NaN and infinity
        diff = np.abs(r - c)
        ref_max = float(np.max(np.abs(r))) if r.size else 0.0
        rel = diff / np.maximum(np.abs(r), 1e-12)
    else:
        both_nan = np.isnan(r) & np.isnan(c)
        diff = np.where(both_nan, 0.0, np.abs(r - c))
        diff = np.where(np.isnan(diff), np.inf, diff)
        ref_max = float(np.max(np.abs(np.nan_to_num(r)))) if r.size else 0.0
        rel = np.where(both_nan, 0.0, diff / np.maximum(np.abs(r), 1e-12))
    max_abs = float(diff.max()) if diff.size else 0.0
    needed = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    floor = min(atol, DEFAULT_ATOL)  # differences at most this large are round-off (module doc)
    return OutputComparison(
        name=name,
        shape=list(ref.shape),
        max_abs=max_abs,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mean_rel=float(rel.mean()) if rel.size else 0.0,
        ref_max_abs=ref_max,
        cosine=(cos := _cosine(r, c, finite)),
        top1_agreement=(top1 := _top1(ref, cand)),
        needed_rtol=needed,
        worst_sample_cosine=_worst_sample(ref.shape, r, c, diff if finite else None, floor),
        within_atol=max_abs <= floor,
        passed=bool(
            max_abs <= atol + rtol * ref_max
            and (min_cosine is None or cos >= min_cosine)
            and (min_agreement is None or top1 is None or top1 >= min_agreement)
        ),
    )


def _all_finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _worst_sample(shape: tuple[int, ...], r: np.ndarray, c: np.ndarray, diff: np.ndarray | None,
                  floor: float = 0.0) -> float | None:  # fmt: skip
    """The lowest cosine of one sample (first axis) of a batched output (``r``, ``c``: its float64
    values flattened; ``diff``: their absolute differences where every value is finite): the
    output-wide cosine weights samples by their norm and can hide one sample that moved (a sentence
    embedding at 0.95 among 47 at 0.99+). Samples that differ by no more than ``floor`` are left
    out: their cosine is one of round-off (a saturated Sigmoid's, see the module doc)."""
    if len(shape) < 2 or shape[0] < 2 or r.size == shape[0]:
        return None
    rows, cands = r.reshape(shape[0], -1), c.reshape(shape[0], -1)
    if diff is not None:
        moved = diff.reshape(shape[0], -1).max(axis=1) > floor
        cosines = [_cosine(a, b, True) for a, b, m in zip(rows, cands, moved, strict=True) if m]
    else:
        cosines = [_cosine(a, b) for a, b in zip(rows, cands, strict=True) if not np.max(np.abs(a - b)) <= floor]
    return min(cosines, default=1.0)


def _cosine(a: np.ndarray, b: np.ndarray, finite: bool = False) -> float:
    # np.sum, not np.dot / np.linalg.norm: BLAS splits long dot products by its thread count and
    # the last bits follow (the budget compares cosines); numpy's pairwise sum has one order.
    # ``finite``: no NaN or infinity to zero (nan_to_num would copy the same values)
    if not finite:
        a, b = np.nan_to_num(a), np.nan_to_num(b)
    na, nb = np.sqrt(np.sum(a * a)), np.sqrt(np.sum(b * b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.sum(a * b) / (na * nb))


def _top1(ref: np.ndarray, cand: np.ndarray) -> float | None:
    if ref.ndim != 2 or ref.shape[1] < 2 or ref.dtype.kind != "f":
        return None
    return float(np.mean(np.argmax(ref, axis=1) == np.argmax(cand, axis=1)))


def _as_proto(model: onnx.ModelProto | LoadedModel | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, LoadedModel):
        return model.model
    return load_model(model).model


def feeds_for(
    model: onnx.ModelProto,
    inputs: dict[str, np.ndarray] | str | Path | None,
    shapes: dict[str, list[int]] | None,
    samples: int,
    seed: int,
    input_model: InputModel | None = None,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Batches of inputs for verification, and a description of them.

    Synthetic samples are drawn by the input model (inferred from the graph unless given); for
    images, half are noise with natural images' spectrum (the kind the channel statistics are
    measured on) and half white noise at the same scale, so a budget is also checked on a kind
    of input the compensation was not fitted to (measured: without the white half, the ResNet-20
    with BatchNorm folded lost 0.8 top-1 points at the default budget, with it 0.4). Inputs drawn
    from the values the graph compares them with (a sample rate) take each value on as many
    samples (a smooth and a white one each where there are samples enough; at least one each)."""
    if inputs is not None:
        given = load_npz_inputs(inputs, model) if isinstance(inputs, (str, Path)) else inputs
        n = min((len(v) for v in given.values() if np.ndim(v)), default=1)
        return [given], f"the given inputs ({n} samples)"
    im = input_model if input_model is not None else infer_inputs(model, shapes)
    what = f"{samples} synthetic samples (seed {seed}, {im.source})"
    if im.cases() > 1:  # one value of the compared inputs per sample, every value on some
        samples = max(samples, im.cases())
        every = 2 if samples >= 2 * im.cases() else 1
        what = f"{samples} synthetic samples (seed {seed}, {im.source}; {im.cases_note(samples, every)})"
        return [im.draw(model, shapes, batch=1, seed=seed + k, white=k % 2 == 1, case=k // every)
                for k in range(samples)], what  # fmt: skip
    if all(_leading_dim_dynamic(vi) for vi in graph_inputs(model)):
        half = samples // 2
        batches = [im.draw(model, shapes, batch=samples - half, seed=seed)]
        if half:  # images: the second half white noise at the same scale (see feeds_for's doc)
            batches.append(im.draw(model, shapes, batch=half, seed=seed + 1, white=True))
        return batches, what
    return [im.draw(model, shapes, batch=1, seed=seed + k, white=k % 2 == 1) for k in range(samples)], what


def _leading_dim_dynamic(vi: onnx.ValueInfoProto) -> bool:
    dims = vi.type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


@dataclass
class Tolerance:
    """What a candidate must meet, per output."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    min_cosine: float | None = None
    min_agreement: float | None = None  # top-1 agreement, 2-D score outputs only


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the model computes in integers anywhere: Q/DQ pairs, dynamic or integer ops."""
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}) or any(
        op.endswith("Integer") or op.startswith("QLinear") for op in ops)  # fmt: skip


class Reference:
    """A reference model's outputs on fixed inputs, computed once, to check many candidates."""

    def __init__(
        self,
        model: onnx.ModelProto | LoadedModel | str | Path,
        *,
        inputs: dict[str, np.ndarray] | str | Path | None = None,
        shapes: dict[str, list[int]] | None = None,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        input_model: InputModel | None = None,
        int8_as_deployed: bool = True,
    ) -> None:
        if samples < 1:
            raise RedonnxError("--samples must be at least 1")
        self.model = _as_proto(model)
        self.samples = samples
        self.int8_as_deployed = int8_as_deployed and not is_quantized(self.model)  # INT8 made of float
        self.given = inputs is not None
        if inputs is None and input_model is None:
            input_model = infer_inputs(self.model, shapes)
        self.input_model_text = input_model.describe() if input_model is not None else "given"
        self.batches, self.description = feeds_for(self.model, inputs, shapes, samples, seed, input_model)
        try:
            self.outputs = _run_all(try_session(self.model, "reference"), self.batches, "reference")
        except RedonnxError as exc:
            if inputs is not None:
                raise
            raise RedonnxError(
                f"{exc} (on synthetic inputs: {self.input_model_text}; if the model needs other values,"
                " pass real inputs with --inputs file.npz)"
            ) from None

    def leaves(self) -> list[Reference]:
        """The references a check runs the candidate against (here: this one)."""
        return [self]

    def candidate_session(self, cand: onnx.ModelProto) -> tuple[Any, str]:
        """The candidate's session, and how it runs where not as the reference does: a quantized
        candidate with onnxruntime's graph optimizations, as deployed on this CPU (its int8 kernels,
        which fake quantization would not show: AVX2's saturating u8 x s8 pairs), unless the
        target is another runtime (TensorRT computes in int32: the QDQ graph as written) or the
        reference is quantized itself (both then run as written, so exact rewrites compare)."""
        deployed = self.int8_as_deployed and is_quantized(cand)
        how = "the INT8 model run as deployed (onnxruntime's graph optimizations on: its int8 kernels)"
        return try_session(cand, "candidate", optimize=deployed), how if deployed else ""

    def check(self, candidate: onnx.ModelProto | LoadedModel | str | Path, tol: Tolerance,
              session: tuple[Any, str] | None = None) -> VerificationResult:  # fmt: skip
        """Run the candidate on the same inputs and compare every output (``session``: the
        candidate's, from :meth:`candidate_session`, shared by the checkers that hold several)."""
        cand = _as_proto(candidate)
        _check_interfaces(self.model, cand)
        sess, how = session if session is not None else self.candidate_session(cand)
        outs = _run_all(sess, self.batches, "candidate")
        comps = [
            compare_arrays(name, ref, outs[name], tol.atol, tol.rtol, tol.min_cosine, tol.min_agreement)
            for name, ref in self.outputs.items()
        ]
        return VerificationResult(
            comps, atol=tol.atol, rtol=tol.rtol, samples=self.samples, inputs=self.description,
            min_cosine=tol.min_cosine, min_agreement=tol.min_agreement, kernels=how,
        )  # fmt: skip


def _run_all(sess, batches: list[dict[str, np.ndarray]], what: str) -> dict[str, np.ndarray]:
    store: dict[str, list[np.ndarray]] = {}
    try:
        for outs in in_order(lambda feeds: run(sess, feeds), batches):  # samples side by side
            for k, v in outs.items():
                store.setdefault(k, []).append(np.asarray(v))
    except Exception as exc:  # onnxruntime runtime errors
        raise RedonnxError(f"onnxruntime failed running the {what} model: {first_line(exc)}") from None
    return {k: _stack(v) for k, v in store.items()}


def verify(
    reference: onnx.ModelProto | LoadedModel | str | Path,
    candidate: onnx.ModelProto | LoadedModel | str | Path,
    *,
    inputs: dict[str, np.ndarray] | str | Path | None = None,
    shapes: dict[str, list[int]] | None = None,
    samples: int = DEFAULT_SAMPLES,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    seed: int = 0,
) -> VerificationResult:
    """Run both models on the same inputs and compare every output (dynamic sizes chosen as
    :func:`redonnx.inputs.sizes.settle` does when neither inputs nor shapes fix them)."""
    from redonnx.inputs.sizes import settle

    ref_model = _as_proto(reference)
    inputs, shapes, chosen = settle(ref_model, inputs, shapes)
    tol = Tolerance(atol, rtol, min_cosine, min_agreement)
    result = Reference(ref_model, inputs=inputs, shapes=shapes, samples=samples, seed=seed).check(candidate, tol)
    if chosen is not None and chosen.second:
        again = Reference(ref_model, shapes=chosen.second, samples=samples, seed=seed).check(candidate, tol)
        result = at_second_size(result, again, chosen.second_picks)
    return result


class AtTwoSizes:
    """A model's references at the chosen sizes of its dynamic dimensions and at a second size: a
    candidate passes only if it passes at both (a shape baked into a constant, or a pruned model
    that holds at 16 tokens but not at 64, fails at the second). Checks like :class:`Reference`."""

    def __init__(self, first: Reference, second: Reference, picks: dict[str, int]) -> None:
        self.first, self.second, self.picks = first, second, picks

    @property
    def model(self) -> onnx.ModelProto:
        return self.first.model

    def leaves(self) -> list[Reference]:
        return [self.first, self.second]

    def candidate_session(self, cand: onnx.ModelProto) -> tuple[Any, str]:
        return self.first.candidate_session(cand)

    def check(self, candidate: onnx.ModelProto | LoadedModel | str | Path, tol: Tolerance,
              session: tuple[Any, str] | None = None) -> VerificationResult:  # fmt: skip
        cand = _as_proto(candidate)
        _check_interfaces(self.model, cand)
        session = session if session is not None else self.candidate_session(cand)  # one for both sizes
        return at_second_size(self.first.check(cand, tol, session), self.second.check(cand, tol, session),
                              self.picks)  # fmt: skip


class AcrossConventions:
    """References drawn in each plausible input convention (:func:`redonnx.inputs.model.alternatives`):
    when the evidence cannot tell, say, pixels 0..1 from -1..1, a candidate passes only if it holds
    in both; the result is the union of the outputs, each marked with its convention, so the worst
    decides. Checks like :class:`Reference` (the planner's trials use it as they use any checker)."""

    def __init__(self, chosen: Reference | AtTwoSizes, others: list[tuple[str, str, Reference | AtTwoSizes]]) -> None:
        self.chosen, self.others = chosen, others

    @property
    def conventions(self) -> list[str]:
        return [f"{name} in {conv}" for name, conv, _ in self.others]

    @property
    def model(self) -> onnx.ModelProto:
        return self.chosen.model

    def leaves(self) -> list[Reference]:
        return [*self.chosen.leaves(), *(leaf for _, _, ref in self.others for leaf in ref.leaves())]

    def candidate_session(self, cand: onnx.ModelProto) -> tuple[Any, str]:
        return self.chosen.candidate_session(cand)

    def check(self, candidate: onnx.ModelProto | LoadedModel | str | Path, tol: Tolerance) -> VerificationResult:
        cand = _as_proto(candidate)
        _check_interfaces(self.model, cand)
        session = self.candidate_session(cand)  # one for every convention
        result = self.chosen.check(cand, tol, session)
        for name, conv, ref in self.others:
            result = in_other_convention(result, ref.check(cand, tol, session), name, conv)
        return result


#: What the planner and the final check verify candidates with.
Checker = Reference | AtTwoSizes | AcrossConventions


def in_other_convention(
    first: VerificationResult, other: VerificationResult, name: str, conv: str
) -> VerificationResult:
    """One result: the outputs on the chosen convention's draws and again with input ``name`` drawn in ``conv``."""
    for o in other.outputs:
        o.name = f"{o.name} (with {name} in {conv})"
    first.outputs = first.outputs + other.outputs
    first.inputs = f"{first.inputs}; again with {name} drawn in {conv} (also plausible)"
    return first


def at_second_size(first: VerificationResult, second: VerificationResult, picks: dict[str, int]) -> VerificationResult:
    """One result: the outputs at the chosen sizes and again at the second ones (dynamic dimensions)."""
    where = ", ".join(f"{k}={v}" for k, v in picks.items())
    for o in second.outputs:
        o.name = f"{o.name} (at {where})"
    first.outputs = first.outputs + second.outputs
    first.inputs = f"{first.inputs}; again at {where}"
    return first


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0]
    try:
        return np.concatenate([a.reshape(1, *a.shape) if a.ndim == 0 else a for a in arrays])
    except ValueError:
        return np.concatenate([a.reshape(-1) for a in arrays])


def _check_interfaces(ref: onnx.ModelProto, cand: onnx.ModelProto) -> None:
    ri = sorted(vi.name for vi in graph_inputs(ref))
    ci = sorted(vi.name for vi in graph_inputs(cand))
    if ri != ci:
        raise RedonnxError(f"the models have different inputs: {ri} vs {ci}")
    ro = [o.name for o in ref.graph.output]
    co = [o.name for o in cand.graph.output]
    if sorted(ro) != sorted(co):
        raise RedonnxError(f"the models have different outputs: {ro} vs {co}")
