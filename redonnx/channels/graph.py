"""The channel graph's data: per-tensor channel spaces, the union-find joining their elements,
the items (sources, sinks, rewritten ops) indexed by channels, and the pins with their reasons.

Built by :func:`redonnx.channels.coupling.analyze`; see :mod:`redonnx.channels.coupling` for what joins channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class Space:
    """The channel axis of one tensor."""

    tensor: gs.Tensor
    size: int
    axis: int  # channel axis, non-negative
    base: int  # id of element 0 in the union-find


@dataclass
class Item:
    """Something indexed by a tensor's channels that a merge must read or rewrite.

    kind: ``row`` (a layer's output rows define the channel), ``param`` (a per-channel constant
    of an op producing the tensor), ``zero`` (channels [lo, hi) are zero padding), ``sink`` (a
    layer reads the channels linearly: columns), ``op`` (Split/Slice/Pad/Reshape/depthwise
    attributes follow the new sizes).
    """

    kind: str
    node: gs.Node
    tensor: str
    index: int = 1  # input index of the constant (param / row / sink weight)
    features: np.ndarray | None = None  # sink through Flatten: feature rows per channel [C, k]
    lo: int = 0
    hi: int = 0


@dataclass
class ChannelGraph:
    """Spaces, the union-find over their elements, items, and pinned elements with reasons."""

    graph: gs.Graph
    spaces: dict[str, Space] = field(default_factory=dict)
    parent: list[int] = field(default_factory=list)
    items: dict[str, list[Item]] = field(default_factory=dict)
    pins: dict[int, str] = field(default_factory=dict)  # element -> reason
    made: set[str] = field(default_factory=set)  # tensors whose producing node is modelled
    read: dict[int, set[str]] = field(default_factory=dict)  # node id -> channel tensors it models
    flattened: set[str] = field(default_factory=set)  # Flatten outputs whose readers are sinks upstream
    _members: dict[int, list[tuple[str, int]]] | None = None  # classes(), computed once spaces are final
    _order: dict[int, int] | None = None  # node id -> position in the graph

    def node_order(self) -> dict[int, int]:
        """Each node's position in the graph (by id), computed once."""
        if self._order is None:
            self._order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        return self._order

    # ---------------------------------------------------------------- union-find

    def reads(self, node: gs.Node, tensor: gs.Tensor) -> None:
        """Record that ``node``'s use of ``tensor``'s channels is modelled."""
        self.read.setdefault(id(node), set()).add(tensor.name)

    def add_space(self, tensor: gs.Tensor, size: int, axis: int, made: bool = False) -> Space:
        """The space of ``tensor`` (created if new); ``made`` when its producer is being modelled."""
        if made:
            self.made.add(tensor.name)
        if tensor.name in self.spaces:
            sp = self.spaces[tensor.name]
            if sp.size != size:
                self.pin_tensor(tensor.name, f"{tensor.name}: inconsistent channel counts {sp.size} and {size}")
            return sp
        sp = Space(tensor, int(size), int(axis), len(self.parent))
        self.parent.extend(range(sp.base, sp.base + sp.size))
        self.spaces[tensor.name] = sp
        return sp

    def find(self, e: int) -> int:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def join_range(self, src: str, src_lo: int, dst: str, dst_lo: int, n: int) -> None:
        s, d = self.spaces[src], self.spaces[dst]
        for k in range(n):
            self.join(s.base + src_lo + k, d.base + dst_lo + k)

    def pin_tensor(self, name: str, reason: str, lo: int = 0, hi: int | None = None) -> None:
        sp = self.spaces[name]
        for c in range(lo, sp.size if hi is None else hi):
            self.pins.setdefault(sp.base + c, reason)

    def add_item(self, item: Item) -> None:
        self.items.setdefault(item.tensor, []).append(item)

    # ---------------------------------------------------------------- queries

    def element(self, tensor: str, c: int) -> int:
        return self.spaces[tensor].base + c

    def classes(self) -> dict[int, list[tuple[str, int]]]:
        """Root -> members (tensor, channel)."""
        out: dict[int, list[tuple[str, int]]] = {}
        for name, sp in self.spaces.items():
            for c in range(sp.size):
                out.setdefault(self.find(sp.base + c), []).append((name, c))
        return out

    def pinned_roots(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for e, reason in self.pins.items():
            out.setdefault(self.find(e), reason)
        return out

    def members_of(self, root: int) -> list[tuple[str, int]]:
        """(tensor, channel) pairs of the class whose root is ``root``."""
        if self._members is None:
            self._members = self.classes()
        return self._members.get(root, [])

    def producer(self, tensor: str) -> gs.Node | None:
        t = self.spaces[tensor].tensor
        return t.inputs[0] if t.inputs else None
