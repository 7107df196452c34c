"""The final speed gate: a lossy result is written only if it runs measurably faster.

Each candidate (the budget's choice, then passing trials with less pruning) is timed against the
lossless (``--exact``) result and the input model, interleaved (:func:`redonnx.measure.latency.compare`).
It is kept when the 90 % interval of its latency ratio to the lossless result lies below 0.97 and
its median ratio to the input is at most 1; otherwise the next candidate is tried, and in the end
the lossless result is written. Verdicts are cached with the measurements (keyed by both models'
bytes), so the same inputs give the same file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from redonnx.io import weights
from redonnx.measure import latency
from redonnx.passes.base import PassResult


@dataclass
class Candidate:
    label: str
    model: onnx.ModelProto
    results: list[PassResult]


@dataclass
class SpeedCheck:
    """What the gate measured and kept."""

    target: str
    kept: str = "lossless result"
    measured: list[dict[str, Any]] = field(default_factory=list)  # per candidate: label, vs_exact, vs_input
    exact_vs_input: dict[str, Any] | None = None
    final_vs_input: dict[str, Any] | None = None
    config: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kept": self.kept, "candidates": self.measured,
                "exact_vs_input": self.exact_vs_input, "speedup_vs_input": self.final_vs_input,
                "config": self.config}  # fmt: skip

    def describe(self, written: bool = True) -> str:
        """One line; ``written`` False: a later stage wrote another model (INT8 of the lossless result)."""
        if self.final_vs_input is None:
            return f"speed: not measured for target {self.target}"
        f = self.final_vs_input
        rejected = [m["label"] for m in self.measured if not m["accepted"]]
        why = f"; not faster than the lossless result, so not kept: {', '.join(rejected)}" if rejected else ""
        return (f"speed ({self.config}): {1 / f['ratio']:.2f}x the input (latency ratio {f['ratio']:.3f}, 90 % "
                f"interval {f['ratio_low']:.3f}-{f['ratio_high']:.3f}), "
                f"{'writing' if written else 'the float gate kept'} the {self.kept}{why}")  # fmt: skip


MIN_GAIN = 0.03  # a lossy result must be at least this much faster (90 % interval): identical models
# in two sessions differ by up to 2.5 % (memory placement; benchmarks/speed.py): a bare "< 1" would keep them


def _digest(*models: onnx.ModelProto) -> str:
    h = hashlib.sha1()
    for m in models:
        h.update(weights.content_digest(m).encode())  # lean models: by their weights, not scratch paths
        h.update(b"|")
    return h.hexdigest()


def measure(
    source: onnx.ModelProto, exact: onnx.ModelProto, cand: onnx.ModelProto, feeds: dict[str, np.ndarray],
    cache: latency.Cache,
) -> dict[str, Any]:  # fmt: skip
    """Timings of ``cand`` against the lossless result and the input (cached by the models' bytes)."""
    key = "gate " + _digest(source, exact, cand)
    hit = cache.get(key)
    if hit is None:
        # what the gate decides (faster than the lossless result by MIN_GAIN, not slower than the
        # input) settles the rounds; the lossless result timed alone is reported to 1 %
        decide = () if cand is exact else ((2, 1, 1.0 - MIN_GAIN), (2, 0, 1.0))
        cmp = latency.compare([source, exact, cand], feeds, decide=decide)
        hit = {"vs_exact": cmp.against(2, 1).to_dict(), "vs_input": cmp.against(2, 0).to_dict(),
               "exact_vs_input": cmp.against(1, 0).to_dict(), "rounds": cmp.rounds, "config": cmp.config}  # fmt: skip
        cache.put(key, hit)
    return hit


def gate(
    source: onnx.ModelProto,
    exact: Candidate,
    candidates: Iterable[Candidate],
    feeds: dict[str, np.ndarray],
    cache: latency.Cache,
    target: str,
) -> tuple[Candidate, SpeedCheck]:
    """The first candidate measurably faster than ``exact`` and not slower than ``source`` (later ones
    are not drawn from ``candidates``)."""
    check = SpeedCheck(target)
    for cand in candidates:
        hit = measure(source, exact.model, cand.model, feeds, cache)
        ok = hit["vs_exact"]["ratio_high"] < 1.0 - MIN_GAIN and hit["vs_input"]["ratio"] <= 1.0
        check.measured.append({"label": cand.label, "accepted": ok, "vs_exact": hit["vs_exact"],
                               "vs_input": hit["vs_input"], "rounds": hit["rounds"]})  # fmt: skip
        check.exact_vs_input, check.config = hit["exact_vs_input"], hit["config"]
        if ok:
            check.kept, check.final_vs_input = cand.label, hit["vs_input"]
            return cand, check
    if check.exact_vs_input is None:  # nothing lossy to try: time the lossless result alone
        hit = measure(source, exact.model, exact.model, feeds, cache)
        check.exact_vs_input, check.config = hit["exact_vs_input"], hit["config"]
    check.final_vs_input = check.exact_vs_input
    return exact, check
