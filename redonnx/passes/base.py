"""Pass protocol: every pass rewrites a gs.Graph in place and returns a :class:`PassResult`.

Matching is kept apart from rewriting: a matcher returns either a plan or a :class:`Decline`
naming the node and the reason, so reports can say why a layer was left alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import onnx_graphsurgeon as gs


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

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        if n:
            self.modified = True

    def decline(self, node: gs.Node, reason: str) -> None:
        self.declined.append(Decline.of(node, reason))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("kept")  # per-channel indices: for the pipeline, too long for a report
        d["seconds"] = round(self.seconds, 4)
        return d

    def summary(self) -> str:
        done = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v) or "no change"
        tail = f"; declined {len(self.declined)}" if self.declined else ""
        return f"{self.name}: {done}{tail}"


@dataclass
class PassContext:
    """Settings shared by passes."""

    opset: int
    options: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    """A graph rewrite. ``run`` mutates ``graph`` and reports what it did."""

    name: str
    exact: bool

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult: ...
