"""How fast this CPU runs one layer in INT8, against float: the cost model's int8 column.

Each weighted layer is timed alone at its shape (:func:`redonnx.measure.latency.layer_model`), in float and
as the library quantizes it. For static QDQ the library's model is timed between int8 tensors: its
boundary QuantizeLinear (graph input) and DequantizeLinear (graph output) are cut off, so what is
timed is the fused QLinearConv / QLinear MatMul a chain of int8 layers runs, not the conversions at
a chain's ends (the whole-model speed gate pays those). Dynamic MatMuls are timed whole, since they
quantize their input on every run. Measurements are cached with the float ones, per CPU and
onnxruntime version. Depthwise convolutions and small layers are where int8 kernels lose here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from redonnx.measure.latency import CostModel, LayerShape, layer_model
from redonnx.quantize.quantizer import Quantizer, Scheme

CALIB_RUNS = 4  # random inputs that calibrate the single-layer model


def _calibrated(model: onnx.ModelProto, feeds: dict[str, np.ndarray], scheme: Scheme, work: Path) -> onnx.ModelProto:
    from redonnx.quantize import calibration as C

    q = Quantizer(model, scheme, work)
    if scheme.mode == "dynamic":
        return q.build()
    rng = np.random.default_rng(1)
    runs = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in feeds.items()} for _ in range(CALIB_RUNS)]
    cache = C.write_cache(C.tensor_ranges(model, runs, "MinMax", work), work / "layer_ranges.json")
    return q.build(cache=cache)


def int8_core(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The quantized layer between int8 tensors: the input's QuantizeLinear and the output's
    DequantizeLinear removed, the graph taking and giving their integer tensors."""
    g = model.graph
    inp, out = g.input[0].name, g.output[0].name
    q_in = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == inp)
    dq_out = next(n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == out)
    zp = {t.name: t for t in g.initializer}
    dtype = zp[q_in.input[2]].data_type if len(q_in.input) > 2 and q_in.input[2] in zp else TensorProto.UINT8
    shape = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    nodes = [n for n in g.node if n is not q_in and n is not dq_out]
    for n in nodes:
        n.input[:] = [inp if i == q_in.output[0] else i for i in n.input]
    graph = helper.make_graph(nodes, "int8_core", [helper.make_tensor_value_info(inp, dtype, shape)],
                              [helper.make_tensor_value_info(dq_out.input[0], dtype, None)],
                              list(g.initializer))  # fmt: skip
    core = helper.make_model(graph, opset_imports=list(model.opset_import))
    core.ir_version = model.ir_version
    np_dtype = np.uint8 if dtype == TensorProto.UINT8 else np.int8
    x = np.random.default_rng(0).integers(0, 128, size=shape).astype(np_dtype)
    return core, {inp: x}


def _int8_layer(shape: LayerShape, scheme: Scheme) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The layer as the library quantizes it under ``scheme``, as timed (static: between int8 tensors)."""
    model, feeds = layer_model(shape)
    with tempfile.TemporaryDirectory(prefix="redonnx-int8-") as tmp:
        q = _calibrated(model, feeds, scheme, Path(tmp))
    if scheme.mode == "dynamic":
        return q, feeds
    return int8_core(q)


def int8_vs_float(cost: CostModel, shape: LayerShape, scheme: Scheme) -> tuple[float, float | None]:
    """Milliseconds of the layer in float and in INT8 under ``scheme`` (None where the library leaves
    it float): both timed in one comparison where the cost model pairs timings, else each alone."""
    key = f"int8 {scheme.mode} rr{int(scheme.reduce_range)} {shape.key()}"
    try:
        got = cost.pair(key, lambda: layer_model(shape), lambda: _int8_layer(shape, scheme))
        if got is None:
            return cost.ms(shape), cost.timed(key, lambda: _int8_layer(shape, scheme))
    except (StopIteration, ValueError, RuntimeError, KeyError):
        return cost.ms(shape), None
    return got[0], got[1]
