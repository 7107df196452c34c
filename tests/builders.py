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


def tf2onnx_style(model: onnx.ModelProto, fold_normalization: bool = True) -> onnx.ModelProto:
    """The shared CIFAR-10 ResNet-20 as a TFLite model converted by tf2onnx would be: BatchNorm
    folded, input NHWC raw 0..255 pixels, a Transpose before the first conv, whose weight is
    stored OHWI and transposed by a node. ``fold_normalization``: the (x / 255 - mean) / std
    normalization is folded into the first conv's weights (as training on raw pixels would leave
    them; exact except at the zero-padded borders), else kept as Mul and Add nodes."""
    from redonnx.pipeline import run_passes

    folded, _ = run_passes(model, ["fold-constants", "fold-batchnorm"], exact=True)
    g = folded.graph
    name = g.input[0].name
    first = next(n for n in g.node if n.op_type == "Conv" and n.input[0] == name)
    inits = {t.name: t for t in g.initializer}
    w = numpy_helper.to_array(inits[first.input[1]]).astype(np.float64)
    b = numpy_helper.to_array(inits[first.input[2]]).astype(np.float64)
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    nodes = [helper.make_node("Transpose", [name], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw")]
    conv_in = "nchw"
    if fold_normalization:
        b = b - np.einsum("oikl,i->o", w, mean / std)
        w = w / (255.0 * std)[None, :, None, None]
    else:
        scale = numpy_helper.from_array((1 / (255 * std)).reshape(1, 3, 1, 1).astype(np.float32), "rescale")
        shift = numpy_helper.from_array((-mean / std).reshape(1, 3, 1, 1).astype(np.float32), "offset")
        g.initializer.extend([scale, shift])
        nodes += [helper.make_node("Mul", ["nchw", "rescale"], ["scaled"]),
                  helper.make_node("Add", ["scaled", "offset"], ["normalized"])]  # fmt: skip
        conv_in = "normalized"
    ohwi = numpy_helper.from_array(w.transpose(0, 2, 3, 1).astype(np.float32), "first_conv_ohwi")
    g.initializer.remove(inits[first.input[1]])
    inits[first.input[2]].CopyFrom(numpy_helper.from_array(b.astype(np.float32), first.input[2]))
    g.initializer.append(ohwi)
    nodes.append(helper.make_node("Transpose", ["first_conv_ohwi"], ["first_conv_w"], perm=[0, 3, 1, 2]))
    first.input[0], first.input[1] = conv_in, "first_conv_w"
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    dims = g.input[0].type.tensor_type.shape.dim
    n, c, h, wd = (dims[i].dim_param or dims[i].dim_value for i in range(4))
    g.input[0].CopyFrom(helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, h, wd, c]))
    return folded
