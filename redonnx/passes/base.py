"""Pass protocol: every pass is a configured :class:`Pass` object that rewrites a gs.Graph in place
and returns a :class:`PassResult`.

Matching is kept apart from rewriting: a matcher returns either a plan or a :class:`Decline`
naming the node and the reason, so reports can say why a layer was left alone.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    import onnx

    from redonnx.inputs.model import InputModel
    from redonnx.inputs.sizes import Settled
    from redonnx.measure.latency import CostModel


@dataclass
class Decline:
    """A rewrite that was considered and refused, with the reason."""

    node: str
    op: str
    reason: str

    @classmethod
    def of(cls, node: gs.Node, reason: str) -> Decline:
        name = node.name or (node.outputs[0].name if node.outputs else "")
        return cls(node=name, op=node.op, reason=reason)


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, counts, per-layer records and declines."""

    name: str
    modified: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    declined: list[Decline] = field(default_factory=list)
    seconds: float = 0.0
    kept: dict[str, list[int]] = field(default_factory=dict)  # tensor -> channels kept (channel passes)
    same_for: tuple[float, float] | None = None  # [low, high): values of the searched tunable making this rewrite

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        if n:
            self.modified = True

    def decline(self, node: gs.Node, reason: str) -> None:
        self.declined.append(Decline.of(node, reason))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("kept")  # per-channel indices: for the pipeline, too long for a report
        d.pop("same_for")  # for the search
        d["seconds"] = round(self.seconds, 4)
        return d

    def summary(self) -> str:
        done = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v) or "no change"
        tail = f"; declined {len(self.declined)}" if self.declined else ""
        return f"{self.name}: {done}{tail}"


@dataclass
class PassContext:
    """What passes share besides their own parameters: the model's input sizes, the target, and
    the services the pipeline sets up (cost model, input model, statistics inputs, a memo).

    The pipeline settles the inputs once (``inputs``: shapes, chosen sizes, input model, draws);
    ``shapes`` and ``input_model`` are its hints and input model, kept for contexts built by hand
    (tests), which :meth:`settled` completes on demand."""

    shapes: dict[str, list[int]] | None = None
    target: str = "macs"
    cost_model: CostModel | None = None  # --target ort-cpu: measured layer latencies
    input_model: InputModel | None = None  # how synthetic statistics inputs are drawn
    corrections: list | None = None  # BatchNorm corrections of the synthetic activations
    calibration: dict[str, np.ndarray] | None = None  # real inputs for channel statistics
    memo: dict[str, Any] | None = None  # results that depend only on the graph a pass starts from
    inputs: Settled | None = None  # the run's inputs, settled once by the pipeline

    @classmethod
    def of(cls, inputs: Settled, **kw: Any) -> PassContext:
        """A context for a run whose inputs are settled."""
        return cls(shapes=inputs.hints, input_model=inputs.input_model, inputs=inputs, **kw)

    def settled(self, model: onnx.ModelProto) -> Settled:
        """The run's settled inputs; for a context built by hand, settled from ``model`` (a graph
        with the run's inputs) at ``shapes``, the input model inferred if none was given."""
        if self.inputs is not None:
            return self.inputs
        from redonnx.inputs.model import infer
        from redonnx.inputs.sizes import Settled

        im = self.input_model if self.input_model is not None else infer(model, self.shapes)
        return Settled.of(model, self.shapes, im)


class Pass(ABC):
    """A graph rewrite with typed parameters (subclasses are dataclasses): ``pass_(graph, ctx)``
    mutates ``graph`` and returns what it did. ``name`` is the CLI's and the registry's name;
    ``exact`` says whether this instance is lossless (a property of its parameters)."""

    name: ClassVar[str]

    @property
    def exact(self) -> bool:
        return True

    @property
    def uses_statistics(self) -> bool:
        """Whether this instance reads channel statistics of synthetic activations (the pipeline
        then measures their realism and BatchNorm corrections)."""
        return False

    def __call__(self, graph: gs.Graph, ctx: PassContext | None = None) -> PassResult:
        t0 = time.perf_counter()
        res = self.run(graph, ctx if ctx is not None else PassContext())
        res.seconds = time.perf_counter() - t0
        return res

    @abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult: ...

    def result(self) -> PassResult:
        return PassResult(self.name)

    def with_params(self, **params: Any) -> Pass:
        """A copy with some parameters changed (how the planner tries values of a tunable)."""
        return dataclasses.replace(self, **params)  # type: ignore[type-var]
