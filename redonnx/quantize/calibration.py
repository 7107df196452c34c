"""Calibration without data: activation ranges for static INT8 from the input model's draws.

Static quantization needs each activation's range. Without data the ranges come from the input
model's realistic draws (:mod:`redonnx.inputs.model`) of their own seed, so calibration and
verification never share a sample; where the model has BatchNorm and its draws were corrected
(:mod:`redonnx.inputs.realism`: a per-channel affine after each BatchNorm brings the synthetic activations
to the running mean and variance), the ranges of every tensor the corrected original shares by
name with the model being quantized (folding keeps the BatchNorm's output name) are read from the
corrected original, so they are the ranges real data would give. ``--calibration c.npz`` replaces
both with the user's inputs.

The ranges are computed by onnxruntime's calibrators (MinMax, Percentile: which one is chosen per
model by the fidelity budget, :mod:`redonnx.quantize.stage`), once per method, and written as
onnxruntime's calibration cache, so every quantization trial reuses them. Each histogram is
collected once: from the corrected original for the tensors it shares, from the model being
quantized for the others.

Not tried: onnxruntime's Entropy calibration. With its defaults (128 bins, 128 quantized bins) its
threshold search has one candidate, the whole histogram, clipped to the tensor's minimum and
maximum: the MinMax ranges, bit for bit (a test holds the library to it), at the cost of a
histogram pass. With the 2048 bins TensorRT uses, its Python loop over about 1000 thresholds a
tensor takes seconds on a CIFAR ResNet.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

CALIBRATION_SEED = 200_017  # neither verification (0...), realism (1), depth (2) nor statistics (100_003)
IMAGES = 64  # calibration draws of image inputs
VECTORS = 256  # of other inputs
CHUNK = 16  # samples per calibration run
METHODS = ("MinMax", "Percentile")  # in order of cost (Entropy: see the module)
HISTOGRAM_SAMPLES = 64  # the histogram methods calibrate on at most this many samples
#: activations a calibration may hold. onnxruntime's calibration sessions keep every tensor of a run
#: to its end (the Reduce nodes MinMax adds come last), and its histogram calibrators keep every
#: tensor of every run, then copy each: MobileNetV2 at 224 takes about 50 MiB a sample (120 MiB
#: with the BatchNorm corrections), and 64 samples in runs of 16 held 4.5 GiB (MinMax) and 12 GiB
#: (histograms; the process was killed). Runs are cut to :data:`RUN_BYTES`; the histogram methods
#: take as many samples as fit in :data:`HISTOGRAM_BYTES`. Exact for MinMax: a range is the same
#: minimum and maximum over the same samples, however they are split.
RUN_BYTES = 256 * 2**20
HISTOGRAM_BYTES = 512 * 2**20


def sample_count(feeds: dict[str, np.ndarray]) -> int:
    return min((len(v) for v in feeds.values() if np.ndim(v)), default=1)


def chunks(feeds: dict[str, np.ndarray], batched: bool) -> list[dict[str, np.ndarray]]:
    """The calibration inputs in runs of :data:`CHUNK` samples (one run when the batch is fixed)."""
    if not batched:
        return [feeds]
    n = sample_count(feeds)
    return [{k: v[i : i + CHUNK] for k, v in feeds.items()} for i in range(0, n, CHUNK)]


def first_samples(runs: list[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The runs that hold the first ``n`` samples."""
    out, total = [], 0
    for r in runs:
        if total >= n:
            break
        out.append(r)
        total += sample_count(r)
    return out


def sample_bytes(model: onnx.ModelProto, run: dict[str, np.ndarray], batched: bool) -> float:
    """Bytes of every tensor ``model`` computes, per sample (one sample of ``run`` through
    onnxruntime with every node output exposed); 0 where onnxruntime cannot run it so (the runs are
    then taken as they are)."""
    from redonnx.measure.runtime import run as ort_run
    from redonnx.measure.runtime import session, with_outputs

    exposed = with_outputs(model, (o for node in model.graph.node for o in node.output if o))
    names = {i.name for i in model.graph.input}
    probe = {k: (v[:1] if batched else v) for k, v in run.items() if k in names}
    try:
        outs = ort_run(session(exposed), probe)
    except Exception:  # onnxruntime's own exception types; the calibration itself reports real failures
        return 0.0
    return sum(v.nbytes for v in outs.values() if isinstance(v, np.ndarray)) / max(sample_count(probe), 1)


def within_memory(runs: list[dict[str, np.ndarray]], per_sample: float, histogram: bool,
                  batched: bool) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """``runs`` cut to what a calibration can hold (see :data:`RUN_BYTES`): batched runs of at most
    RUN_BYTES of activations each; for the histogram methods the first samples that fit in
    HISTOGRAM_BYTES, in runs of one size (onnxruntime stacks them). Unchanged where they fit."""
    if histogram:
        runs = first_samples(runs, HISTOGRAM_SAMPLES)
    total = sum(sample_count(r) for r in runs)
    keep = min(total, max(1, int(HISTOGRAM_BYTES // max(per_sample, 1.0)))) if histogram else total
    if not batched:
        return first_samples(runs, keep)  # whole runs
    size = min(CHUNK, max(1, int(RUN_BYTES // max(per_sample, 1.0))), keep)
    if histogram:
        keep -= keep % size
    if keep == total and all(sample_count(r) == size for r in runs):
        return runs
    feeds = {k: np.concatenate([r[k] for r in runs])[:keep] for k in runs[0]}
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, keep, size)]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared runs."""

    def __init__(self, runs: list[dict[str, np.ndarray]], names: set[str]) -> None:
        self._runs = [{k: v for k, v in r.items() if k in names} for r in runs]
        self._it: Iterator = iter(self._runs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self):
        return iter(self._runs)


def _one_thread(calibrator) -> None:
    """Recreate the calibrator's session with one intra-op thread: sums split by the thread count
    differ in their last bits, and the ranges (so the scales, so the file) would follow."""
    import onnxruntime as ort

    from redonnx.measure.runtime import REPRODUCIBLE_THREADS

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = REPRODUCIBLE_THREADS
    opts.log_severity_level = 4
    calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, opts,
                                                    providers=["CPUExecutionProvider"])  # fmt: skip


def _calibrator(model: onnx.ModelProto, method: str, folder: Path):
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    calibrator = create_calibrator(path, [], augmented_model_path=str(folder / "augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, method))  # fmt: skip
    _one_thread(calibrator)
    return calibrator


def _collected(calibrator, runs: list[dict[str, np.ndarray]], names: set[str]):
    """The calibrator's ranges on ``runs`` (TensorsData)."""
    calibrator.collect_data(_Reader(runs, names))
    return calibrator.compute_data()


def tensor_ranges(model: onnx.ModelProto, runs: list[dict[str, np.ndarray]], method: str, work: Path):
    """onnxruntime's calibration of every float tensor of ``model`` on ``runs`` (TensorsData)."""
    return ranges([(model, runs)], method, work)[0]


def ranges(jobs: list[tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]], method: str,
           work: Path) -> tuple[object, int]:  # fmt: skip
    """onnxruntime's ``method`` ranges of the first model's float tensors, on its runs; with a
    second job (the BatchNorm-corrected original), those of every tensor the two share by name are
    the second's (TensorsData, how many). The calibrations run side by side, each on one thread;
    a histogram method histograms each tensor in one of them only (the one whose range is kept)."""
    from onnxruntime.quantization.calibrate import TensorsData

    from redonnx.measure.runtime import in_order

    def names(m: onnx.ModelProto) -> set[str]:
        return {i.name for i in m.graph.input}

    restricted = len(jobs) == 2 and method != "MinMax"
    got: list = [None] * len(jobs)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        folders = [Path(tmp) / str(k) for k in range(len(jobs))]
        cals = [_calibrator(m, method, f) for (m, _), f in zip(jobs, folders, strict=True)] if restricted else None
        if cals is not None:  # histograms: each tensor only where its range is kept
            shared = cals[0].tensors_to_calibrate & cals[1].tensors_to_calibrate
            cals[0].tensors_to_calibrate -= shared
            cals[1].tensors_to_calibrate &= shared
        todo = [k for k in range(len(jobs)) if cals is None or cals[k].tensors_to_calibrate]  # empty: not run

        def collect(k: int):  # MinMax: made on the worker too, one's augmentation beside the other's runs
            cal = cals[k] if cals is not None else _calibrator(jobs[k][0], method, folders[k])
            return _collected(cal, jobs[k][1], names(jobs[k][0]))

        for k, data in zip(todo, in_order(collect, todo), strict=True):
            got[k] = data
        cals = None  # (the calibrators and their sessions go before their folder)
    if len(got) == 1:
        return got[0], 0
    plain, corrected = (dict(d.data) if d is not None else {} for d in got)
    if not restricted:
        shared = set(plain) & set(corrected)
    data = {**plain, **{k: corrected[k] for k in shared}}
    kind = next(d for d in got if d is not None).calibration_method
    return TensorsData(kind, dict(sorted(data.items()))), len(shared)


def write_cache(data, path: Path) -> Path:
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(data, path)
    return path
