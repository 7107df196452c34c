"""onnxruntime's quantizers, driven: prepare a float model once, then write it in INT8 with any set
of layers kept in float.

Nothing here inserts QuantizeLinear/DequantizeLinear by hand: static models are written by
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel weights) from a calibration cache
(:mod:`redonnx.quantize.calibration`), dynamic ones by ``quantize_dynamic`` (MatMul weights, the
activations quantized at run time). Weights are quantized per output channel in both (a MatMul's
columns, a convolution's filters): one scale per tensor lets the column of largest magnitude set
every column's step, and a trained encoder's columns differ by an order of magnitude (all of
all-MiniLM-L6-v2's MatMuls dynamic: output cosine 0.845 per tensor, 0.988 per column, same speed).
The float model is prepared once with the library's own pre-processing (``quant_pre_process``:
shape inference and onnxruntime's basic optimizations) and every unnamed node is named, since the
quantizers select nodes by name.

A :class:`Scheme` is how a model is quantized: static or dynamic, weight range (7-bit on CPUs
whose int8 kernels saturate, :mod:`redonnx.quantize.cpu`), symmetric activations (TensorRT explicit
quantization), and which op types the library may quantize.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from redonnx.errors import RedonnxError
from redonnx.measure.segments import node_reads

#: layers whose precision the stage decides, one by one: weighted ops with a constant weight
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: TensorRT explicit quantization, following NVIDIA's "Q/DQ layer-placement recommendations"
#: (TensorRT developer guide, "Working with Quantized Types"): symmetric int8 (zero point 0) for
#: activations and weights, per-channel weights, Q/DQ on the *inputs* of weighted layers and of
#: residual Adds, none on their outputs (TensorRT fuses the following Q into the layer, and folds
#: BatchNorm, ReLU and the float bias itself).
TRT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")

#: onnxruntime's quantizers take the model as one proto (2 GiB at most, with the scales added)
MAX_BYTES = 2**30


@dataclass(frozen=True)
class Scheme:
    """How a model is quantized."""

    mode: str = "static"  # static (QDQ, calibrated) | dynamic (MatMul weights; activations at run time)
    reduce_range: bool = False  # 7-bit weights
    symmetric: bool = False  # symmetric int8 activations (TensorRT)
    op_types: tuple[str, ...] | None = None  # what the library may quantize; None: its default set

    def describe(self) -> str:
        what = "static QDQ, per-channel weights" if self.mode == "static" else "dynamic (MatMul weights per column)"
        if self.symmetric:
            what += ", symmetric int8 activations and weights (TensorRT explicit quantization)"
        if self.reduce_range:
            what += ", 7-bit weights"
        if self.op_types is not None:
            what += f", ops {'/'.join(self.op_types)}"
        return what

    @property
    def output_pairs(self) -> bool:
        """Whether the library pairs a quantized layer's output too (static; not under TensorRT's
        placement, which :meth:`Quantizer._build` excludes from output quantization)."""
        return self.mode == "static" and not self.symmetric


@contextlib.contextmanager
def _quiet(level: int = logging.ERROR):
    """The library logs advice and progress on the root logger: not ours to print."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(before)


@contextlib.contextmanager
def _inside(folder: Path):
    """Run in ``folder``: onnxruntime's symbolic shape inference, when it cannot complete, saves
    ``sym_shape_infer_temp.onnx`` and its external data into the current directory (the user's)."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose unnamed (or duplicate-named) nodes get deterministic names."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_redonnx"
        seen.add(node.name)
    return out


#: per-channel QuantizeLinear/DequantizeLinear (their ``axis``) exist from this opset on: the library
#: writes them into older models anyway (it only renumbers opsets below 10 to 11), and onnxruntime
#: refuses the result (CNTK's MNIST at opset 8, a PyTorch super-resolution net at 10, PP-OCR at 11)
PER_CHANNEL_OPSET = 13


def upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` at :data:`PER_CHANNEL_OPSET` or later (onnx's version converter; the model as it is
    where it cannot convert: the INT8 stage then declines what onnxruntime cannot load)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if version >= PER_CHANNEL_OPSET:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, PER_CHANNEL_OPSET)
    except Exception:  # the converter's own errors (an op without an adapter)
        return model


def prepare(model: onnx.ModelProto, work: Path) -> onnx.ModelProto:
    """The library's pre-processing (shape inference, basic optimizations) of the named model (at
    :data:`PER_CHANNEL_OPSET` where it was older); the named model as it is when pre-processing
    fails (symbolic shape inference knows fewer ops).
    A failed attempt is the library's to log, not ours: it is silenced, and what it leaves on disk
    stays in ``work``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from redonnx.io.external_data import external_base, inline_copy, model_nbytes

    if external_base(model) is not None:  # a lean model: its weights live in our scratch files
        if model_nbytes(model) > MAX_BYTES:
            raise RedonnxError(f"the model holds {model_nbytes(model) / 2**30:.1f} GiB: onnxruntime's quantizers "
                               f"need it in one proto (at most {MAX_BYTES / 2**30:.0f} GiB here)")  # fmt: skip
        model = inline_copy(model)
    named = name_nodes(upgraded(model))
    path = (work / "prepared.onnx").resolve()
    source = (work / "named.onnx").resolve()  # a file, not the proto: given a proto without sympy's
    onnx.save(named, str(source))  # symbolic inference, the library moves its weights out to "foo.bin"
    # onnx's own shape inference first: where it gives every node output a type and a rank, symbolic
    # inference (sympy: 0.4 s to import) has nothing to add that the quantizer reads
    for skip_symbolic, only_if_typed in ((True, True), (False, False), (True, False)):
        try:
            with _quiet(logging.CRITICAL + 1), _inside(work):
                quant_pre_process(str(source), str(path), skip_symbolic_shape=skip_symbolic)
            prepared = onnx.load(str(path))
        except Exception:
            continue
        if not only_if_typed or _typed(prepared):
            return own_weights(name_nodes(prepared))
    return own_weights(named)


def own_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a copy of each weight or bias initializer for every layer that reads one some
    other node reads too (tied weights; biases our cleanup shared because their values were equal).
    The library quantizes a shared initializer once, under its name, for every reader: a layer kept
    float read the INT8 layer's weights or bias dequantized (the bias at the other layer's scale), so
    the library's build of a set of layers differed from the layers cut alone (:mod:`redonnx.quantize.cut`)
    and from the float layer it claimed (ResNet-56-shaped, 5 convolutions sharing a folded bias: output
    cosine 0.99780 against the cut's 0.99802)."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}  # nodes reading each initializer (subgraphs' outer reads included)
    for n in model.graph.node:
        for name in node_reads(n) & inits.keys():
            readers[name] = readers.get(name, 0) + 1
    shared = [(n, k) for n in model.graph.node if n.op_type in LAYER_OPS
              for k in (1, 2) if k < len(n.input) and readers.get(n.input[k], 0) > 1]  # fmt: skip
    if not shared:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    taken = set(inits) | {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input}
    for node, k in shared:
        name = node.input[k]
        copy_name = f"{name}__{node.name}"
        while copy_name in taken:
            copy_name += "_"
        taken.add(copy_name)
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = copy_name
        out.graph.initializer.append(copy)
        nodes[node.name].input[k] = copy_name
    read = {i for n in out.graph.node for i in node_reads(n)} | {i.name for i in out.graph.input}  # IR 3 lists them
    kept = [t for t in out.graph.initializer if t.name in read or t.name not in readers]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def for_scheme(prepared: onnx.ModelProto, scheme: Scheme) -> onnx.ModelProto:
    """``prepared`` as the scheme's quantizer rewrites it before it selects nodes, so that the nodes
    it quantizes carry the names the stage keeps float or quantizes alone: the dynamic quantizer
    replaces every Gemm (pre-processing fuses a 2-D MatMul and its bias into one) with a MatMul
    named ``<gemm>_MatMul`` and an Add, so a Gemm layer named in ``nodes_to_exclude`` or
    ``nodes_to_quantize`` was quantized anyway, or not at all (a dense network's dynamic proposal
    found no layer to keep float under a tight budget). Done here with the library's own rewrite,
    which then has nothing left to do."""
    if scheme.mode != "dynamic" or not any(n.op_type == "Gemm" for n in prepared.graph.node):
        return prepared
    from onnxruntime.quantization.onnx_model import ONNXModel

    out = onnx.ModelProto()
    out.CopyFrom(prepared)
    ONNXModel(out).replace_gemm_with_matmul()
    return out


def _typed(model: onnx.ModelProto) -> bool:
    """Whether every main-graph node output has an element type and a rank (value info, graph output
    or initializer): all that symbolic shape inference would otherwise supply."""
    known = {t.name for t in model.graph.initializer}
    for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type and tt.HasField("shape"):
            known.add(vi.name)
    return all(o in known for n in model.graph.node for o in n.output if o)


@dataclass
class Layer:
    """A weighted node whose precision is decided."""

    name: str
    op: str
    weight: str


def _constants(model: onnx.ModelProto) -> set[str]:
    """Names of the initializers and Constant nodes' outputs."""
    return {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}  # fmt: skip


def layers(model: onnx.ModelProto) -> list[Layer]:
    """The weighted layers (a constant weight input) of a prepared model, in graph order."""
    consts = _constants(model)
    out = []
    for n in model.graph.node:
        if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in consts:
            out.append(Layer(n.name, n.op_type, n.input[1]))
    return out


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls of two activations (attention scores and context): kept float, both operands move."""
    consts = _constants(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input[:2])]


@dataclass
class Quantizer:
    """Writes ``prepared`` in INT8 under ``scheme`` with chosen nodes kept float (memoized)."""

    prepared: onnx.ModelProto
    scheme: Scheme
    work: Path
    always_float: frozenset[str] = frozenset()
    _memo: dict = field(default_factory=dict, repr=False)
    _path: Path | None = None

    def _source(self) -> Path:
        if self._path is None:
            self._path = self.work / "float.onnx"
            onnx.save(self.prepared, str(self._path))
        return self._path

    def build(self, exclude: frozenset[str] = frozenset(), only: frozenset[str] | None = None,
              cache: Path | None = None, method: str = "MinMax",
              layers_only: bool = False) -> onnx.ModelProto:  # fmt: skip
        """The model with every quantizable node but ``exclude`` (or only ``only``) in INT8;
        ``layers_only``: of the weighted layers alone (other ops stay float)."""
        key = (exclude, only, str(cache), method, layers_only)
        if key not in self._memo:
            self._memo[key] = self._build(exclude | self.always_float, only, cache, method, layers_only)
        return self._memo[key]

    def _build(self, exclude: frozenset[str], only: frozenset[str] | None, cache: Path | None,
               method: str, layers_only: bool) -> onnx.ModelProto:  # fmt: skip
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        s = self.scheme
        ops = list(LAYER_OPS) if layers_only else list(s.op_types) if s.op_types is not None else None
        include = sorted(only - exclude) if only is not None else None
        from redonnx.quantize.memo import memoized

        with tempfile.TemporaryDirectory(dir=self.work) as tmp, _quiet(), memoized():
            out = Path(tmp) / "int8.onnx"
            if s.mode == "dynamic":
                quantize_dynamic(self._source(), out, op_types_to_quantize=ops or ["MatMul"], per_channel=True,
                                 reduce_range=s.reduce_range, weight_type=QuantType.QInt8,
                                 nodes_to_quantize=include, nodes_to_exclude=sorted(exclude))  # fmt: skip
            else:
                extra = {"ActivationSymmetric": s.symmetric, "WeightSymmetric": True,
                         "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}  # fmt: skip
                if not s.output_pairs:  # TensorRT: Q/DQ on layer inputs only, biases float (it fuses them)
                    extra.update(OpTypesToExcludeOutputQuantization=list(TRT_OPS), QuantizeBias=False)
                quantize_static(self._source(), out, calibration_data_reader=None, calibration_cache_path=cache,
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=ops, per_channel=True,
                                reduce_range=s.reduce_range,
                                activation_type=QuantType.QInt8 if s.symmetric else QuantType.QUInt8,
                                weight_type=QuantType.QInt8, nodes_to_quantize=include,
                                nodes_to_exclude=sorted(exclude),
                                calibrate_method=getattr(CalibrationMethod, method), extra_options=extra)  # fmt: skip
            return onnx.load(str(out))


def int8_nodes(model: onnx.ModelProto, names: list[str]) -> set[str]:
    """Which of ``names`` run in INT8 in a quantized model: a DequantizeLinear feeds their weight,
    or a dynamic/integer op replaced them."""
    dq_out = {o for n in model.graph.node if n.op_type in ("DequantizeLinear",) for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    out = set()
    for name in names:
        n = by_name.get(name)
        replaced = n is None or n.op_type not in LAYER_OPS  # MatMulInteger, DynamicQuantizeMatMul...
        if replaced or (len(n.input) > 1 and n.input[1] in dq_out):
            out.add(name)
    return out
