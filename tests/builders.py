"""Small ONNX graphs built in tests with onnx.helper, with seeded random weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG_SEED = 0


class Builder:
    """Accumulates nodes and initializers, then makes a model."""

    def __init__(self, seed: int = RNG_SEED) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def const(self, values: np.ndarray, base: str = "c") -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values), n))
        return n

    def rand(self, *shape: int, scale: float = 0.5, base: str = "w") -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), base)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type + "_"), **attrs))
        return outs[0] if n_out == 1 else outs

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            (r.random(c) + 0.5).astype(np.float32),
            r.standard_normal(c).astype(np.float32),
            r.standard_normal(c).astype(np.float32) * 0.5,
            (r.random(c) + 0.2).astype(np.float32),
        ]
        return self.op("BatchNormalization", [x, *[self.const(p, "bn") for p in params]], epsilon=1e-5)

    def conv(
        self, x: str, cin: int, cout: int, k: int = 3, pad: int = 1, group: int = 1, bias: bool = True, **attrs
    ) -> str:
        ins = [x, self.rand(cout, cin // group, k, k)]
        if bias:
            ins.append(self.rand(cout))
        return self.op("Conv", ins, pads=[pad] * 4, group=group, kernel_shape=[k, k], **attrs)

    def model(
        self,
        inputs: list[tuple[str, list]],
        outputs: list[str],
        opset: int = 17,
        ir_version: int | None = None,
        out_type: int = TensorProto.FLOAT,
    ) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(o, out_type, None) for o in outputs],
            initializer=self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
        m.ir_version = ir_version or min(onnx.IR_VERSION, 8)
        return m
