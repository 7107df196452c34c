"""onnxruntime sessions and seeded inputs, shared by verification, benchmarks and tests."""

from __future__ import annotations

import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from redonnx.errors import RedonnxError, first_line
from redonnx.inputs.shapes import graph_inputs, resolve_input_shapes
from redonnx.io import weights

ORT_SIZE_LIMIT = 2**31 - 2**26
ort.set_default_logger_severity(4)  # errors reach the user once, as our own one line


#: intra-op threads of every run whose numbers decide what prune writes (channel statistics, realism,
#: verification, the budget search). onnxruntime's CPU kernels split some convolutions by the
#: thread count and the last bits of their sums follow the split (MobileNetV2, a batch of one: a 1x1
#: conv differs by 2e-6 at 4 threads from 1 or 2), and the default count is the machine's cores: one
#: thread gives the same numbers, so the same file, on any machine. Timing sets its own count.
REPRODUCIBLE_THREADS = 1

#: independent runs (verification samples, statistics chunks, branch scores) go to this many
#: threads at most, each on its own one-thread run: the same numbers as one after another (each run
#: is alone in its session call and results are taken in order), on every core the machine lends.
#: Bounded: every run in flight holds its activations.
MAX_WORKERS = 4


def session(
    model: onnx.ModelProto, optimize: bool = False, threads: int | None = None, spin: bool = False
) -> ort.InferenceSession:
    """An onnxruntime CPU session; graph optimizations off unless ``optimize``; ``threads`` None is
    :data:`REPRODUCIBLE_THREADS`, 0 onnxruntime's default (one per core). Idle threads do not spin
    unless ``spin`` (as deployed sessions do, for latency): our sessions run in turn with other
    sessions and numpy, which spinning threads would slow down."""
    threads = REPRODUCIBLE_THREADS if threads is None else threads
    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 4
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    base = weights.external_base(model)
    if base is not None:  # lean model: onnxruntime reads the weights from their files
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base))
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    data = _serialized(model)  # ByteSize costs a serialization of its own (MiniLM: 0.15 s a call)
    if data is not None:
        return ort.InferenceSession(data, opts, providers=providers)
    with tempfile.TemporaryDirectory(prefix="redonnx-", dir=weights.SCRATCH.folder()) as tmp:
        path = Path(tmp) / "model.onnx"
        weights.write_external(model, path, "model.onnx.data")  # streams, no copy of the weights
        return ort.InferenceSession(str(path), opts, providers=providers)


def _serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes where onnxruntime takes them from memory (under :data:`ORT_SIZE_LIMIT`), else None."""
    try:
        data = model.SerializeToString()
    except (EncodeError, ValueError):  # protobuf refuses messages over 2 GiB
        return None
    return data if len(data) < ORT_SIZE_LIMIT else None


def workers() -> int:
    """Threads :func:`in_order` uses: the cores this process may run on, at most :data:`MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


_T = TypeVar("_T")
_R = TypeVar("_R")
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_IN_POOL = threading.local()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(workers(), thread_name_prefix="redonnx-run", initializer=_mark_pool)
        return _POOL


def _mark_pool() -> None:
    _IN_POOL.active = True


def in_order(fn: Callable[[_T], _R], items: Iterable[_T], window: int | None = None) -> Iterator[_R]:
    """``fn`` over ``items`` on the worker threads, results yielded in the items' order, at most
    ``window`` (default: the worker count) computed ahead of the one being consumed. onnxruntime
    releases the GIL while it runs, so one-thread runs of independent feeds use the other cores.
    Called from a worker (nested), or with one worker, it runs inline."""
    n = workers()
    if n == 1 or getattr(_IN_POOL, "active", False):
        for item in items:
            yield fn(item)
        return
    pool, it = _pool(), iter(items)
    pending: deque[Future] = deque()
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= (window or n):
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(it, _END)
        if nxt is not _END:
            pending.append(pool.submit(fn, nxt))
        yield result


_END = object()
_BACKGROUND: ThreadPoolExecutor | None = None


def in_background(fn: Callable[[], _R]) -> Future[_R]:
    """``fn`` on a thread of its own, beside the workers: for work that releases the GIL (deflate)
    and whose result is wanted later, so that it runs while the process is busy in Python."""
    global _BACKGROUND
    with _POOL_LOCK:
        if _BACKGROUND is None:
            _BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="redonnx-background")
    return _BACKGROUND.submit(fn)


def try_session(model: onnx.ModelProto, what: str, optimize: bool = False) -> ort.InferenceSession:
    """Like :func:`session`, but a model onnxruntime rejects becomes a one-line RedonnxError."""
    try:
        return session(model, optimize=optimize)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise RedonnxError(f"onnxruntime cannot load the {what} model: {first_line(exc)}") from None


_NP_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def random_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, list[int]] | None = None,
    batch: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded inputs of the right dtypes: floats ~ N(0, 1), integers in [0, 8), random booleans
    (tests and benchmarks; prune and verify draw with :mod:`redonnx.inputs.model`)."""
    rng = np.random.default_rng(seed)
    concrete = resolve_input_shapes(model, shapes, batch=batch)
    feeds: dict[str, np.ndarray] = {}
    for vi in graph_inputs(model):
        elem = vi.type.tensor_type.elem_type
        dtype = _NP_DTYPES.get(elem)
        if dtype is None:
            name = onnx.TensorProto.DataType.Name(elem) if elem else "unknown"
            raise RedonnxError(f"input {vi.name!r} has type {name}; pass real inputs with --inputs file.npz")
        shape = concrete[vi.name]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[vi.name] = rng.random(shape) < 0.5
        else:
            feeds[vi.name] = rng.integers(0, 8, size=shape).astype(dtype)
    return feeds


def load_npz_inputs(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs from an .npz whose keys are the model's input names."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise RedonnxError(f"{path}: cannot read inputs: {exc}") from None
    names = [vi.name for vi in graph_inputs(model)]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise RedonnxError(f"{path}: no array for input {missing[0]!r} (has: {', '.join(arrays)})")
    return {n: arrays[n] for n in names}


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (stale value infos dropped)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in known)
    del m.graph.value_info[:]
    return m


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))
