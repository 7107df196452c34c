"""Run a model piece by piece, so that activations at chosen tensors can be read and replaced.

The nodes (in their topological order) are cut after the producer of each *stop* tensor; each
piece becomes a small model whose inputs are whatever earlier pieces (or the graph inputs)
computed and later nodes still read. After a piece runs, a hook sees each stop tensor it made
and may return a replacement, which every later piece then reads. One run costs one forward
pass plus a session per piece: a correction that depends on every correction upstream (see
:mod:`redonnx.inputs.realism`) is fitted in one pass instead of one pass per layer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from redonnx.inputs.shapes import graph_inputs
from redonnx.measure.runtime import run, session

Hook = Callable[[str, np.ndarray], np.ndarray | None]


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Tensor names a node reads, including outer-scope names its subgraphs read."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            inner = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                inner |= set(n.output)
            for n in g.node:
                names |= node_reads(n) - inner
    return names


@dataclass
class _Piece:
    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    stops: list[str]
    session: ort.InferenceSession | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # runs on several threads build it once


class Stepper:
    """A model cut into pieces at ``stops`` (tensor names produced by its nodes); ``optimize``: the
    pieces run with onnxruntime's graph optimizations (within each piece)."""

    def __init__(self, model: onnx.ModelProto, stops: Iterable[str], optimize: bool = False) -> None:
        self.model = model
        self.optimize = optimize
        g = model.graph
        produced_at = {o: i for i, n in enumerate(g.node) for o in n.output if o}
        wanted = sorted({s for s in stops if s in produced_at}, key=lambda s: produced_at[s])
        self.stops = wanted
        self._inits = {t.name: t for t in g.initializer}
        reads = [node_reads(n) for n in g.node]
        last_read: dict[str, int] = {}
        for i, r in enumerate(reads):
            for name in r:
                last_read[name] = i
        for o in g.output:
            last_read[o.name] = len(g.node)
        cuts = sorted({produced_at[s] for s in wanted})
        if not cuts or cuts[-1] != len(g.node) - 1:
            cuts.append(len(g.node) - 1)
        self._pieces: list[_Piece] = []
        start = 0
        for end in cuts:
            idx = range(start, end + 1)
            made = {o for i in idx for o in g.node[i].output if o}
            needed = set().union(*(reads[i] for i in idx)) - made - set(self._inits) if idx else set()
            outs = sorted(o for o in made if last_read.get(o, -1) > end or o in wanted)
            self._pieces.append(_Piece([g.node[i] for i in idx], sorted(needed), outs,
                                       [s for s in wanted if produced_at[s] in idx]))  # fmt: skip
            start = end + 1
        self._last_read = last_read
        self._graph_outputs = [o.name for o in g.output]
        self._piece_of = {s: i for i, p in enumerate(self._pieces) for s in p.stops}

    def set_initializer(self, name: str, values: np.ndarray) -> None:
        """New values for an initializer: pieces not built yet will read them."""
        self._inits[name] = onnx.numpy_helper.from_array(np.asarray(values), name)

    def _session(self, piece: _Piece, state: dict[str, np.ndarray]) -> ort.InferenceSession:
        with piece.lock:
            return self._build(piece, state)

    def _build(self, piece: _Piece, state: dict[str, np.ndarray]) -> ort.InferenceSession:
        if piece.session is None:
            inits = {n for node in piece.nodes for n in node_reads(node) if n in self._inits}
            inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(state[n].dtype), None)
                      for n in piece.inputs]  # fmt: skip
            outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in piece.outputs]
            graph = onnx.helper.make_graph(piece.nodes, "piece", inputs, outputs,
                                           [self._inits[n] for n in sorted(inits)])  # fmt: skip
            m = onnx.helper.make_model(graph, opset_imports=self.model.opset_import)
            m.ir_version = max(self.model.ir_version, 4)
            m.metadata_props.extend(self.model.metadata_props)  # lean models: where the weights are
            piece.session = session(m, optimize=self.optimize)
        return piece.session

    def run(
        self,
        feeds: dict[str, np.ndarray],
        hook: Hook | None = None,
        until: str | None = None,
        keep: list | None = None,
        resume: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run every piece (up to the one making ``until``); returns the graph outputs reached
        (and ``until``). ``hook(name, value)`` is called for each stop; a returned array replaces it.

        ``keep``: a list this run fills with what the pieces read before each of them. ``resume``: a
        stop, with ``keep`` from an earlier run on the same feeds whose hook replaced nothing before
        it: the pieces before the one making it are not run again (they would compute the same;
        the hook is not called for their stops). Replacing one stop after another costs then the
        pieces from that stop on, not a whole run each. Runs on one stepper may go on several
        threads at once (a resumed run only reads ``keep``)."""
        first, done = 0, 0
        if resume is not None and keep:
            first = self._piece_of[resume]
            done, state = keep[first]
            state = dict(state)
        else:
            real = {vi.name for vi in graph_inputs(self.model)}
            state = {k: v for k, v in feeds.items() if k in real}
            if keep is not None:
                keep.clear()
        for i in range(first, len(self._pieces)):
            piece = self._pieces[i]
            if keep is not None and resume is None:
                keep.append((done, dict(state)))
            if not piece.nodes:
                continue
            outs = run(self._session(piece, state), {n: state[n] for n in piece.inputs})
            state.update(outs)
            done += len(piece.nodes)
            for s in piece.stops:
                new = hook(s, state[s]) if hook is not None else None
                if new is not None:
                    state[s] = new
            if until is not None and until in piece.stops:
                return {until: state[until]}
            for name in [n for n in state if self._last_read.get(n, -1) < done and n not in self._graph_outputs]:
                del state[name]  # nobody reads it any more
        return {o: state[o] for o in self._graph_outputs if o in state}
