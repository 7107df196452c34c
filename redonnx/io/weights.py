"""Large weights kept on disk: *lean* models whose tensors are external-data references.

Loading a model that uses external data gives a lean ``ModelProto``: its tensors keep their
references (no weight bytes in memory) and the folder they are relative to is recorded in the
model's metadata under :data:`BASE_KEY`. ``to_graph`` turns each large external tensor into an
:class:`ExternalValues` constant that reads its bytes from the file only when a pass asks for
them. Exporting a graph whose source was lean, or that holds more than :data:`LEAN_BYTES`, is lean
too: weights a pass loaded or rewrote are written to a data file in a scratch folder and the
constant is pointed at it (the in-memory array is dropped); untouched weights keep pointing at the
source file, hard-linked into the scratch folder. onnxruntime reads lean models from their
serialized (small) proto plus the folder; saving streams every tensor into the output's data file
in chunks. A prune then holds about one copy of the weights at a time (the passes' working copy,
or one onnxruntime session) instead of the source, working copy, exported candidate, serialized
bytes and onnxruntime's copy an in-memory pipeline holds at once.

The proto-level helpers (metadata, reading tensors, :func:`write_external`) are in
:mod:`redonnx.io.external_data` and importable from here.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from redonnx.errors import RedonnxError
from redonnx.io.external_data import ALIGN as ALIGN
from redonnx.io.external_data import BASE_KEY as BASE_KEY
from redonnx.io.external_data import CHUNK as CHUNK
from redonnx.io.external_data import (
    EXTERNAL_MIN_BYTES,
    SPILL_KEY,
    _pad,
    _set_location,
    external_base,
    external_chunks,
    external_range,
    is_external,
    iter_tensors,
    model_nbytes,
    read_chunks,
    set_external_base,
    tensor_array,
)
from redonnx.io.external_data import inline_copy as inline_copy
from redonnx.io.external_data import iter_graphs as iter_graphs
from redonnx.io.external_data import write_external as write_external

#: Graphs holding more constant bytes than this are exported lean (lowered in tests).
LEAN_BYTES = 512 * 2**20
#: External tensors smaller than this are read into memory when the graph is imported.
INLINE_BYTES = 64 * 2**10


# ---------------------------------------------------------------- size on disk


#: Above this size the deflated size is estimated from a sample of 1 MiB blocks (16 MiB in all).
DEFLATE_EXACT_BYTES = 16 * 2**20
_BLOCK = 2**20


def deflate_estimated(model: onnx.ModelProto) -> bool:
    return model_nbytes(model) > DEFLATE_EXACT_BYTES


def deflated_size(model: onnx.ModelProto) -> int:
    """Bytes of the model (proto and external tensors) after deflate at level 6, the paper's size
    measure. Above :data:`DEFLATE_EXACT_BYTES` every k-th 1 MiB block is compressed and the total
    scaled up (deflate runs at about 15 MB/s on weights: gigabytes would take minutes)."""
    total = model_nbytes(model)
    step = max(1, total // DEFLATE_EXACT_BYTES) if total > DEFLATE_EXACT_BYTES else 1
    z = zlib.compressobj(6)
    out = seen = 0
    for i, block in enumerate(_blocks(model)):
        if i % step == 0:
            out += len(z.compress(block))
            seen += len(block)
    out += len(z.flush())
    return out if step == 1 else round(out * total / max(seen, 1))


def _blocks(model: onnx.ModelProto) -> Iterator[bytes]:
    """The model's bytes (proto, then external tensors) in blocks of at most 1 MiB."""
    proto = model.SerializeToString()
    for k in range(0, len(proto), _BLOCK):
        yield proto[k : k + _BLOCK]
    base = external_base(model)
    if base is None:
        return
    for t in iter_tensors(model):
        if is_external(t):
            for chunk in external_chunks(t, base):
                for k in range(0, len(chunk), _BLOCK):
                    yield chunk[k : k + _BLOCK]


def content_digest(model: onnx.ModelProto) -> str:
    """sha1 of what the model computes with: its proto, and for a lean model the bytes of its
    external tensors instead of where they lie (scratch files are named afresh in every process, so
    the serialized proto of the same model differs from run to run; caches keyed by it missed)."""
    h = hashlib.sha1()
    base = external_base(model)
    if base is None:
        h.update(model.SerializeToString())
        return h.hexdigest()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for prop in [p for p in copy.metadata_props if p.key in (BASE_KEY, SPILL_KEY)]:
        copy.metadata_props.remove(prop)
    for t, c in zip(iter_tensors(model), iter_tensors(copy), strict=True):
        if is_external(t):
            h.update(t.name.encode() + b"=")
            for chunk in external_chunks(t, base):
                h.update(chunk)
            del c.external_data[:]
    h.update(copy.SerializeToString())
    return h.hexdigest()


# ---------------------------------------------------------------- graphs over lean models


class ExternalValues(LazyValues):
    """A constant's values in an external data file, read when first asked for."""

    def __init__(self, tensor: onnx.TensorProto, base: Path) -> None:
        super().__init__(tensor)
        self.base = base
        self.path, self.offset, self.length = external_range(tensor, base)

    def load(self) -> np.ndarray:
        return tensor_array(self.tensor, self.base)

    def digest(self) -> str:
        h = hashlib.sha1()
        for chunk in read_chunks(self.path, self.offset, self.length):
            h.update(chunk)
        return h.hexdigest()

    def __str__(self) -> str:
        return f"ExternalValues (shape={self.shape}, dtype={self.dtype}, file={self.path.name})"


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    return [graph, *graph.subgraphs(recursive=True)]


def _constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    from redonnx.io.graph import tensor_map  # io.graph imports this module

    seen: set[int] = set()
    for g in all_graphs(graph):
        for t in tensor_map(g).values():
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                yield t


def lift_external(graph: gs.Graph, base: Path | None) -> int:
    """Point imported external constants at their files; small ones are read right away.
    Returns how many stay on disk until a pass asks for them."""
    lazy = 0
    for c in _constants(graph):
        vals = c._values
        if not isinstance(vals, LazyValues) or not is_external(vals.tensor):
            continue
        if base is None:
            raise RedonnxError(f"tensor {c.name!r} is stored externally but its folder is unknown")
        c.data_location = None
        c._values = ExternalValues(vals.tensor, base)
        if c._values.length < INLINE_BYTES:
            c._values = c._values.load()
        else:
            lazy += 1
    return lazy


def is_lean_graph(graph: gs.Graph) -> bool:
    """Should ``graph`` be exported lean: any weight still on disk, or too much in memory?"""
    consts = list(_constants(graph))
    if any(isinstance(c._values, ExternalValues) for c in consts):
        return True
    return sum(int(c._values.nbytes) for c in consts) > LEAN_BYTES


def digest(c: gs.Constant) -> str:
    """A content hash of a constant, streamed from disk when it is not loaded."""
    try:
        kind = f"{np.dtype(c.dtype).str}{tuple(c.shape)}"
    except TypeError:
        kind = f"{c.dtype}{tuple(c.shape)}"
    if isinstance(c._values, ExternalValues):
        return kind + c._values.digest()
    return kind + hashlib.sha1(np.ascontiguousarray(c.values).tobytes()).hexdigest()


class Scratch:
    """The folder lean exports write their data files in; removed when the process ends."""

    def __init__(self) -> None:
        self.parent: str | None = os.environ.get("REDONNX_TMPDIR") or None
        self._folder: Path | None = None
        self._links: dict[Path, str] = {}
        self._count = itertools.count()

    def folder(self) -> Path:
        if self._folder is None or not self._folder.is_dir():
            self._folder = Path(tempfile.mkdtemp(prefix=".redonnx-scratch-", dir=self.parent)).resolve()
            self._links = {}
            atexit.register(shutil.rmtree, self._folder, True)
        return self._folder

    def use(self, parent: str | os.PathLike | None) -> None:
        """Put scratch files under ``parent`` (the CLI uses the output folder: same disk, no /tmp)."""
        self.close()
        self.parent = str(parent) if parent is not None else None

    def close(self) -> None:
        """Remove the scratch folder; lean models pointing into it are no longer readable."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = None
        self._links = {}
        self.parent = os.environ.get("REDONNX_TMPDIR") or None

    def new_data_file(self) -> Path:
        return self.folder() / f"w{next(self._count)}.data"

    def place(self, path: Path) -> str | None:
        """A name in the scratch folder for the existing data file ``path`` (hard link), or None."""
        folder = self.folder()
        path = path.resolve()
        if path.parent == folder:
            return path.name
        if path not in self._links:
            name = f"src{len(self._links)}.data"
            try:
                os.link(path, folder / name)
            except OSError:
                return None  # another disk: the caller copies the bytes
            self._links[path] = name
        return self._links[path]

    def owns(self, folder: Path) -> bool:
        return self._folder is not None and folder == self._folder


SCRATCH = Scratch()


def export_lean(graph: gs.Graph, export) -> onnx.ModelProto:
    """``export(graph)`` with every constant of 1 KiB or more referenced from a scratch data file.

    Loaded or rewritten weights are written out and the graph's constants now read from that file,
    so the arrays are freed; untouched external weights are referenced where they are."""
    folder = SCRATCH.folder()
    data = SCRATCH.new_data_file()
    with open(data, "wb") as f:
        for c in _constants(graph):
            vals = c._values
            if isinstance(vals, ExternalValues):
                name = SCRATCH.place(vals.path)
                if name is not None:
                    ref = _external_ref(vals.tensor, name, vals.offset, vals.length)
                else:
                    offset = _pad(f)
                    for chunk in read_chunks(vals.path, vals.offset, vals.length):
                        f.write(chunk)
                    ref = _external_ref(vals.tensor, data.name, offset, vals.length)
            else:
                ref = _spill(c, f, data.name)
                if ref is None:
                    continue
            c.data_location = None
            c._values = ExternalValues(ref, folder)
    model = export(graph)
    set_external_base(model, folder, spill=data.name)
    return model


def _external_ref(t: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    ref = onnx.TensorProto()
    ref.name = t.name
    ref.data_type = t.data_type
    ref.dims.extend(t.dims)
    _set_location(ref, location, offset, length)
    return ref


def _spill(c: gs.Constant, f, location: str) -> onnx.TensorProto | None:
    """Write a constant's bytes to ``f``; None when it is small or not plain numbers."""
    if isinstance(c._values, LazyValues):
        t = c._values.tensor
        if not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_MIN_BYTES:
            return None
        offset = _pad(f)
        f.write(t.raw_data)
        return _external_ref(t, location, offset, len(t.raw_data))
    values = np.asarray(c._values)
    if values.nbytes < EXTERNAL_MIN_BYTES or values.dtype.kind not in "biuf":
        return None
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    offset = _pad(f)
    f.write(memoryview(values).cast("B"))
    t = onnx.TensorProto()
    t.name = c.name
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    t.dims.extend(values.shape)
    return _external_ref(t, location, offset, values.nbytes)


def discard(model: onnx.ModelProto) -> None:
    """Delete the scratch data file a lean export wrote (for candidates that were not kept)."""
    base = external_base(model)
    spill = next((p.value for p in model.metadata_props if p.key == SPILL_KEY), None)
    if base is not None and spill and SCRATCH.owns(base):
        (base / spill).unlink(missing_ok=True)
