"""External data at the proto level: where a lean model's tensors live (recorded in its metadata),
reading their bytes, and saving a model with its tensors streamed into one data file.

The graph side (lazy constants, lean exports, the scratch folder) is in :mod:`redonnx.io.weights`,
which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from redonnx.errors import RedonnxError

BASE_KEY = "redonnx:external_base"
SPILL_KEY = "redonnx:spill"
#: Tensors at least this large go to the data file when a model is saved with external data.
EXTERNAL_MIN_BYTES = 1024
ALIGN = 4096
CHUNK = 16 * 2**20


# ---------------------------------------------------------------- lean models


def external_base(model: onnx.ModelProto) -> Path | None:
    """The folder a lean model's external tensors are relative to, or None for in-memory models."""
    for prop in model.metadata_props:
        if prop.key == BASE_KEY:
            return Path(prop.value)
    return None


def set_external_base(model: onnx.ModelProto, folder: Path | None, spill: str | None = None) -> None:
    """Record (or with None, forget) where a lean model's external tensors live."""
    keep = [p for p in model.metadata_props if p.key not in (BASE_KEY, SPILL_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if folder is not None:
        model.metadata_props.add(key=BASE_KEY, value=str(folder))
        if spill:
            model.metadata_props.add(key=SPILL_KEY, value=spill)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and tensor attribute, in subgraphs too."""
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def is_external(t: onnx.TensorProto) -> bool:
    return external_data_helper.uses_external_data(t)


def external_range(t: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """File, offset and length of an external tensor's bytes."""
    info = external_data_helper.ExternalDataInfo(t)
    path = base / info.location
    offset = int(info.offset or 0)
    length = int(info.length) if info.length else path.stat().st_size - offset
    return path, offset, length


def tensor_array(t: onnx.TensorProto, base: Path | None) -> np.ndarray:
    """The values of ``t``, read from its external file if it has one."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    if base is None:
        raise RedonnxError(f"tensor {t.name!r} is stored externally but its folder is unknown")
    path, offset, length = external_range(t, base)
    dtype = _plain_dtype(t)
    count = int(np.prod(t.dims, dtype=np.int64))
    if dtype is None or count * dtype.itemsize != length:
        dup = onnx.TensorProto()
        dup.CopyFrom(t)
        external_data_helper.load_external_data_for_tensor(dup, str(base))
        dup.data_location = onnx.TensorProto.DEFAULT
        del dup.external_data[:]
        return numpy_helper.to_array(dup)
    return np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(tuple(t.dims))


def _plain_dtype(t: onnx.TensorProto) -> np.dtype | None:
    """Numpy dtype whose bytes are the tensor's raw bytes (plain numbers), else None."""
    plain = {
        onnx.TensorProto.FLOAT: np.float32,
        onnx.TensorProto.DOUBLE: np.float64,
        onnx.TensorProto.FLOAT16: np.float16,
        onnx.TensorProto.INT8: np.int8,
        onnx.TensorProto.UINT8: np.uint8,
        onnx.TensorProto.INT16: np.int16,
        onnx.TensorProto.UINT16: np.uint16,
        onnx.TensorProto.INT32: np.int32,
        onnx.TensorProto.UINT32: np.uint32,
        onnx.TensorProto.INT64: np.int64,
        onnx.TensorProto.UINT64: np.uint64,
        onnx.TensorProto.BOOL: np.bool_,
    }
    dtype = plain.get(t.data_type)
    return np.dtype(dtype).newbyteorder("<") if dtype is not None else None


def model_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the model on disk: the proto plus its external tensors."""
    base = external_base(model)
    total = model.ByteSize()
    if base is not None:
        total += sum(external_range(t, base)[2] for t in iter_tensors(model) if is_external(t))
    return total


def external_chunks(t: onnx.TensorProto, base: Path) -> Iterator[bytes]:
    """An external tensor's bytes, read in chunks from its file."""
    yield from read_chunks(*external_range(t, base))


def read_chunks(path: Path, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(CHUNK, length))
            if not chunk:
                raise RedonnxError(f"{path}: external data file is shorter than the model says")
            length -= len(chunk)
            yield chunk


def inline_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a lean model with every tensor's bytes in the proto (for small models only)."""
    base = external_base(model)
    dup = onnx.ModelProto()
    dup.CopyFrom(model)
    if base is not None:
        for t in iter_tensors(dup):
            if is_external(t):
                data = b"".join(read_chunks(*external_range(t, base)))
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = data
        set_external_base(dup, None)
    return dup


def _pad(f, align: int = ALIGN) -> int:
    pos = f.tell()
    if pos % align:
        f.write(b"\0" * (align - pos % align))
    return f.tell()


def _set_location(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)


def write_external(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Save ``model`` to ``path`` with every tensor of 1 KiB or more in ``path.parent/data_name``.

    Streams tensor by tensor: in-memory tensors are moved out and put back, external ones are
    copied in chunks from their current files. The caller's model is left as it was."""
    base = external_base(model)
    restore: list[tuple[onnx.TensorProto, onnx.TensorProto]] = []
    try:
        with open(path.parent / data_name, "wb") as f:
            for t in iter_tensors(model):
                if is_external(t):
                    if base is None:
                        raise RedonnxError(f"tensor {t.name!r} is stored externally but its folder is unknown")
                    src = external_range(t, base)
                    saved = _snapshot(t)
                    offset = _pad(f)
                    for chunk in read_chunks(*src):
                        f.write(chunk)
                elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
                    saved = _snapshot(t)
                    offset = _pad(f)
                    f.write(t.raw_data)
                else:
                    continue
                restore.append((t, saved))
                _set_location(t, data_name, offset, f.tell() - offset)
        props = [(p.key, p.value) for p in model.metadata_props]
        set_external_base(model, None)
        try:
            onnx.save_model(model, str(path))
        finally:
            del model.metadata_props[:]
            for k, v in props:
                model.metadata_props.add(key=k, value=v)
    finally:
        for t, saved in restore:
            t.CopyFrom(saved)


def _snapshot(t: onnx.TensorProto) -> onnx.TensorProto:
    saved = onnx.TensorProto()
    saved.CopyFrom(t)
    return saved
