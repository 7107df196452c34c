"""onnxruntime's weight quantization, memoized across the INT8 stage's builds.

The library's quantizers compute every weight's per-channel scale and zero point, then its
quantized values, in Python, one channel at a time (the static one: ``compute_data_quant_params``
and ``quantize_onnx_initializer``, which ``qdq_quantizer`` calls by name; the dynamic one:
``quantize_data``, which ``base_quantizer`` calls per column). A whole MobileNetV2 takes
about 4 s, nearly all of it that, and the stage builds the same weights again in every trial: only
which layers stay float changes. These functions are pure: the same arguments give the same
arrays. While :func:`memoized` is active, those modules call wrappers that return a copy of the
result computed the first time for equal arguments (a digest of the array's bytes or of the
tensor's serialized bytes, the other arguments as given): the same model, bit for bit, in about a
quarter of the time. At most :data:`LIMIT_BYTES` of results are kept, and none past the stage.

Nothing is changed where the library names these functions otherwise (another version): the
wrappers are installed only over functions of those names, and calls with arguments that cannot be
keyed go through to the library.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx

#: (module of ``onnxruntime.quantization``, function it calls by that name): the static quantizer's
#: per-channel parameters and quantized weights; the dynamic quantizer's per-column quantization
TARGETS = (("qdq_quantizer", "compute_data_quant_params"), ("qdq_quantizer", "quantize_onnx_initializer"),
           ("base_quantizer", "quantize_data"))  # fmt: skip
LIMIT = 1 << 17  # results kept (a MobileNetV2 has about 17,000 channels); all dropped beyond
LIMIT_BYTES = 256 * 2**20  # or beyond this many bytes of results (quantized weights)
_results: dict[tuple, Any] = {}
_held = 0  # bytes of the results
_lock = threading.Lock()
_active = 0
_saved: list[tuple[Any, str, Callable]] = []  # (module, name, the library's function) while installed


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=20).digest()


def _key(args: tuple, kwargs: dict[str, Any]) -> tuple:
    def one(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            data = v.tobytes()
            return v.dtype.str, v.shape, data if len(data) <= 64 else _digest(data)
        if isinstance(v, onnx.TensorProto):
            return "tensor", _digest(v.SerializeToString())
        if isinstance(v, np.generic):
            return v.dtype.str, v.tobytes()
        hash(v)  # anything else keys as itself (TypeError: not keyable)
        return type(v).__name__, v

    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


def _copy(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, onnx.TensorProto):
        out = onnx.TensorProto()
        out.CopyFrom(value)
        return out
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.nbytes
    return value.ByteSize() if isinstance(value, onnx.TensorProto) else 0


def clear() -> None:
    """Drop every result (the stage's end: another model's weights come next)."""
    global _held
    _results.clear()
    _held = 0


def _memoizing(name: str, fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _held
        try:
            key = (name, _key(args, kwargs))
        except TypeError:
            return fn(*args, **kwargs)
        if key not in _results:
            value = fn(*args, **kwargs)
            size = _nbytes(value)
            if size > LIMIT_BYTES:
                return value
            if len(_results) >= LIMIT or _held + size > LIMIT_BYTES:
                clear()
            _results[key] = value
            _held += size
        return _copy(_results[key])

    return wrapper


@contextlib.contextmanager
def memoized() -> Iterator[None]:
    """The quantizers' weight quantization memoized while inside (nested and threads: installed
    by the first to enter, removed by the last to leave)."""
    global _active
    import importlib

    with _lock:
        if _active == 0:
            for module, name in TARGETS:
                owner = importlib.import_module(f"onnxruntime.quantization.{module}")
                fn = getattr(owner, name, None)
                if callable(fn):
                    _saved.append((owner, name, fn))
                    setattr(owner, name, _memoizing(name, fn))
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                for owner, name, fn in _saved:
                    setattr(owner, name, fn)
                _saved.clear()
