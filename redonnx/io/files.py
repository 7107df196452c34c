"""Loading and saving ONNX files safely.

Loading accepts what exporters really write (opsets 7 to the newest onnx knows, old IR with
initializers listed as graph inputs, external data, subgraphs) and turns every malformed file
into one :class:`RedonnxError` with a clear sentence. Saving is atomic, keeps the model's
identity (opsets, IR version, names, metadata) and never overwrites the input by accident.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from redonnx.errors import RedonnxError
from redonnx.io import weights

MIN_OPSET = 7
TWO_GB = 2**31 - 1
#: Size above which a model is saved with external data (lowered in tests).
EXTERNAL_DATA_THRESHOLD = TWO_GB - 64 * 2**20


@dataclass
class LoadedModel:
    """A model as loaded from disk, with what we learned while loading it."""

    model: onnx.ModelProto
    path: Path | None = None
    external_data: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def opset(self) -> int:
        return default_opset(self.model)


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default ONNX domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise RedonnxError("model imports no default ONNX opset")


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load and validate an ONNX file, including its external data."""
    p = Path(path)
    if not p.exists():
        raise RedonnxError(f"{p}: no such file")
    if p.is_dir():
        raise RedonnxError(f"{p}: is a directory, not an ONNX file")
    if p.stat().st_size == 0:
        raise RedonnxError(f"{p}: empty file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise RedonnxError(f"{p}: not a valid ONNX file (truncated or not protobuf: {exc})") from None
    except OSError as exc:
        raise RedonnxError(f"{p}: cannot read: {exc.strerror or exc}") from None
    _check_header(model, p)
    external = _check_external_data(model, p.parent, p)
    if external:  # lean: weights stay in their files until a pass reads them (see redonnx.io.weights)
        weights.set_external_base(model, p.parent.resolve())
    loaded = LoadedModel(model=model, path=p, external_data=external)
    validate_structure(model, p)
    _note_legacy(loaded)
    return loaded


def _check_header(model: onnx.ModelProto, p: Path) -> None:
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise RedonnxError(f"{p}: not an ONNX model (no IR version or no graph)")
    if not model.graph.output:
        raise RedonnxError(f"{p}: the graph declares no outputs (truncated or not an ONNX model?)")
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise RedonnxError(f"{p}: opset {opset} is not supported (supported: {MIN_OPSET} to {newest})")


def _check_external_data(model: onnx.ModelProto, base: Path, p: Path) -> bool:
    """Check every external tensor's file exists and is long enough; True if any is external."""
    found = False
    for t in weights.iter_tensors(model):
        if not weights.is_external(t):
            continue
        found = True
        info = external_data_helper.ExternalDataInfo(t)
        loc = Path(info.location)
        if loc.is_absolute() or ".." in loc.parts:
            raise RedonnxError(f"{p}: external data location {info.location!r} leaves the model folder")
        f = base / loc
        if not f.is_file():
            raise RedonnxError(f"{p}: missing external data file {f} (tensor {t.name!r})")
        need = (info.offset or 0) + (info.length or 0)
        if need > f.stat().st_size:
            raise RedonnxError(f"{p}: external data file {f} is truncated (tensor {t.name!r})")
    return found


def validate_structure(model: onnx.ModelProto, p: Path | str = "model") -> None:
    """Reject dangling tensor names, missing outputs and cycles, with the offending name."""
    _validate_graph(model.graph, set(), p)


def _validate_graph(graph: onnx.GraphProto, outer: set[str], p: Path | str) -> None:
    known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {t.values.name for t in graph.sparse_initializer}
    produced: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for o in node.output:
            if o:
                produced[o] = idx
    available = known | set(produced)
    for node in graph.node:
        for name in node.input:
            if name and name not in available:
                raise RedonnxError(
                    f"{p}: node {node.name or node.op_type!r} reads tensor {name!r} that nothing produces"
                )
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                _validate_graph(sub, available, p)
    for out in graph.output:
        if out.name not in available:
            raise RedonnxError(f"{p}: graph output {out.name!r} is produced by no node")
    _check_acyclic(graph, produced, p)


def _check_acyclic(graph: onnx.GraphProto, produced: dict[str, int], p: Path | str) -> None:
    n = len(graph.node)
    deps: list[set[int]] = [set() for _ in range(n)]
    readers: list[list[int]] = [[] for _ in range(n)]
    for idx, node in enumerate(graph.node):
        for name in node.input:
            src = produced.get(name)
            if src is not None and src not in deps[idx]:
                deps[idx].add(src)
                readers[src].append(idx)
    indeg = [len(d) for d in deps]
    ready = [i for i in range(n) if indeg[i] == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for r in readers[i]:
            indeg[r] -= 1
            if indeg[r] == 0:
                ready.append(r)
    if seen < n:
        stuck = next(graph.node[i] for i in range(n) if indeg[i] > 0)
        raise RedonnxError(f"{p}: the graph has a cycle through node {stuck.name or stuck.op_type!r}")


def _note_legacy(loaded: LoadedModel) -> None:
    g = loaded.model.graph
    inits = {t.name for t in g.initializer}
    as_inputs = [i.name for i in g.input if i.name in inits]
    if as_inputs:
        loaded.notes.append(
            f"{len(as_inputs)} initializers are also graph inputs (IR {loaded.model.ir_version});"
            " they are treated as constants"
        )
    consts = sum(n.op_type == "Constant" for n in g.node)
    if consts:
        loaded.notes.append(f"{consts} Constant nodes are treated like initializers")


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    source: LoadedModel | None = None,
    external_data: bool | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` atomically; external data when asked, when the source used it, or > 2 GB."""
    out = Path(path)
    if source is not None and source.path is not None and not force and _same_file(out, source.path):
        raise RedonnxError(f"{out}: refusing to overwrite the input model (use --force)")
    folder = check_writable(out)
    if external_data is None:
        external_data = (
            bool(source and source.external_data)
            or weights.external_base(model) is not None
            or weights.model_nbytes(model) > EXTERNAL_DATA_THRESHOLD
        )
    _write_atomic(model, out, folder, external_data)
    return out


def check_writable(out: Path) -> Path:
    """The folder ``out`` will be written in, after checking that writing there can work."""
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise RedonnxError(f"{out}: is a directory")
    if not folder.is_dir():
        raise RedonnxError(f"{out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise RedonnxError(f"{out}: folder {folder} is not writable")
    return folder


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def publish(tmp: Path, out: Path) -> None:
    """Usual permissions (umask), then an atomic rename into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


def _write_atomic(model: onnx.ModelProto, out: Path, folder: Path, external: bool) -> None:
    tmpdir = Path(tempfile.mkdtemp(prefix=".redonnx-", dir=folder))
    try:
        tmp_model = tmpdir / out.name
        data_name = out.name + ".data"
        if external:
            weights.write_external(model, tmp_model, data_name)
            # The data file must be in place before the model that points to it.
            if (tmpdir / data_name).exists():
                publish(tmpdir / data_name, folder / data_name)
        else:
            if weights.external_base(model) is not None:
                if weights.model_nbytes(model) > EXTERNAL_DATA_THRESHOLD:
                    raise RedonnxError(f"{out}: the model is over 2 GB; it can only be saved with external data")
                model = weights.inline_copy(model)
            onnx.save_model(model, str(tmp_model))
        publish(tmp_model, out)
    except OSError as exc:
        raise RedonnxError(f"{out}: cannot write: {exc.strerror or exc}") from None
    finally:
        for f in tmpdir.iterdir():
            f.unlink()
        tmpdir.rmdir()
