"""Sizes for dynamic dimensions, chosen without hints: the smallest that onnxruntime runs.

Verification and MAC counting need concrete input shapes; the rewrites do not, and the written
model keeps its dynamic dimensions. A dynamic leading dimension is the batch (1). Every other
dynamic dimension takes, from a short ladder that suits its role, the smallest size with which
onnxruntime runs the model on validly drawn inputs; dimensions sharing a symbolic name share the
size. Roles: a non-leading dimension of an integer input (token ids, masks) is a sequence
(16, 64, 128); a spatial dimension of a 4-D float input an image side (32, 64, 128, 224, 320,
640: strides of detection and segmentation networks must divide it); anything else 16, 32, 64,
128. ``--shape`` overrides every choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from redonnx.errors import RedonnxError
from redonnx.shapes import declared_shape, graph_inputs

SEQUENCE = (16, 64, 128)
IMAGE = (32, 64, 128, 224, 320, 640)
OTHER = (16, 32, 64, 128)


@dataclass
class Chosen:
    """Shapes for every input, and what was chosen for whom."""

    shapes: dict[str, list[int]]
    picks: dict[str, int] = field(default_factory=dict)  # symbol -> size chosen
    tried: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if not self.picks:
            return ""
        sizes = ", ".join(f"{k}={v}" for k, v in self.picks.items())
        return (f"dynamic sizes chosen: {sizes} (the smallest with which onnxruntime runs the model; "
                "--shape overrides; the written model keeps its dynamic dimensions)")  # fmt: skip


def _open(model: onnx.ModelProto, hints: dict[str, list[int]]):
    """(input, declared dims) of every input the hints leave to us."""
    for vi in graph_inputs(model):
        dims = declared_shape(vi)
        if vi.name not in hints and dims is not None:
            yield vi, dims


def _symbol(vi: onnx.ValueInfoProto, axis: int, d) -> str:
    return d if isinstance(d, str) and d else f"{vi.name}:{axis}"


def _symbols(model: onnx.ModelProto, hints: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """Each dynamic non-leading dimension (by symbolic name, or input:axis), with its ladder."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    out: dict[str, tuple[int, ...]] = {}
    for vi, dims in _open(model, hints):
        integer = vi.type.tensor_type.elem_type not in floats
        for axis, d in enumerate(dims):
            if axis == 0 or (isinstance(d, int) and d > 0):
                continue
            spatial = len(dims) == 4 and axis >= 2 - (dims[-1] in (1, 3, 4))
            out.setdefault(_symbol(vi, axis, d), SEQUENCE if integer else IMAGE if spatial else OTHER)
    return out


def _shapes_for(model: onnx.ModelProto, hints: dict[str, list[int]], picks: dict[str, int]) -> dict[str, list[int]]:
    out = dict(hints)
    for vi, dims in _open(model, hints):
        out[vi.name] = [d if isinstance(d, int) and d > 0 else 1 if axis == 0 else picks[_symbol(vi, axis, d)]
                        for axis, d in enumerate(dims)]  # fmt: skip
    return out


def choose(model: onnx.ModelProto, hints: dict[str, list[int]] | None, draw) -> Chosen:
    """Shapes for every input: ``hints`` first, then the ladders (see the module doc).
    ``draw(shapes) -> feeds`` makes valid inputs at given shapes."""
    hints = dict(hints or {})
    symbols = _symbols(model, hints)
    if not symbols:
        return Chosen(hints)
    from redonnx.runtime import run, session

    sess = session(model)
    last = ""
    steps = max(len(v) for v in symbols.values())
    tried = []
    for i in range(steps):
        picks = {k: ladder[min(i, len(ladder) - 1)] for k, ladder in symbols.items()}
        shapes = _shapes_for(model, hints, picks)
        tried.append(", ".join(f"{k}={v}" for k, v in picks.items()))
        try:
            run(sess, draw(shapes))
        except RedonnxError:
            raise
        except Exception as exc:  # onnxruntime refuses this size: the next one
            last = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            continue
        return Chosen(shapes, picks, tried)
    names = ", ".join(sorted({vi.name for vi in graph_inputs(model) if vi.name not in hints}))
    raise RedonnxError(
        f"no size for the dynamic dimensions of {names} runs in onnxruntime (tried {'; '.join(tried)}; last error: "
        f"{last}); pass --shape NAME=d0,d1,... or --inputs file.npz"
    )


def settle(
    model: onnx.ModelProto, inputs: dict[str, np.ndarray] | str | Path | None, hints: dict[str, list[int]] | None
) -> tuple[dict[str, np.ndarray] | None, dict[str, list[int]], Chosen | None]:
    """The given inputs (loaded from a file if need be) and the shapes to verify and count MACs
    at: the given arrays' shapes, else the hints completed by :func:`choose`."""
    from redonnx.input_model import InputModel, given_shapes, infer_kinds_only
    from redonnx.runtime import load_npz_inputs

    if isinstance(inputs, (str, Path)):
        inputs = load_npz_inputs(inputs, model)
    if inputs is not None:
        return inputs, dict(hints or {}) or given_shapes(model, inputs), None
    kinds = InputModel(infer_kinds_only(model), "")
    chosen = choose(model, hints, lambda sh: kinds.draw(model, sh, batch=1, seed=0))
    return None, chosen.shapes, chosen
