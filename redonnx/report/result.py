"""What ``prune`` returns: the rewritten model with the evidence behind it, as a report and a summary."""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import onnx

import redonnx
from redonnx.inputs import realism as realism_mod
from redonnx.inputs.model import InputModel
from redonnx.inputs.realism import Realism
from redonnx.io import weights
from redonnx.io.files import LoadedModel
from redonnx.measure.cost import ModelCost
from redonnx.measure.runtime import in_order
from redonnx.measure.verify import VerificationResult
from redonnx.passes.base import PassResult
from redonnx.planner import speed as speed_mod
from redonnx.planner.search import SearchResult


@dataclass
class PruneResult:
    """The rewritten model and everything the report says about it."""

    model: onnx.ModelProto
    source: LoadedModel
    passes: list[PassResult]
    before: ModelCost
    after: ModelCost
    verification: VerificationResult | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    search: SearchResult | None = None
    evidence: Evidence | None = None
    speed: speed_mod.SpeedCheck | None = None
    target: str = "ort-cpu"
    precision: Any = None  # redonnx.planner.precision.PrecisionResult when the INT8 stage ran
    deflating: list[tuple[onnx.ModelProto, Future[int]]] = field(default_factory=list, repr=False)  # started early
    _sizes: tuple[dict[str, Any], dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def modified(self) -> bool:
        return any(p.modified for p in self.passes)

    def report(self) -> dict[str, Any]:
        """The JSON report: sizes before/after, what each pass did and declined, verification."""
        if self._sizes is None:  # serializing and deflating both models is the costly part: once
            models = (self.source.model, self.model)
            early = [next((f for m, f in self.deflating if m is x), None) for x in models]  # started while pruning
            pairs = list(zip(models, (self.before, self.after), early, strict=True))
            before, after = in_order(lambda pair: _sizes(*pair), pairs)  # zlib lets both deflate at once
            self._sizes = (before, after)
        before, after = self._sizes
        return {
            "tool": f"redonnx {redonnx.__version__}",
            "input": str(self.source.path) if self.source.path else None,
            "input_shapes": self.before.input_shapes,
            "target": self.target,
            "before": before,
            "after": after,
            "removed": {
                "params": before["params"] - after["params"],
                "params_pct": _pct(before["params"], after["params"]),
                "macs": (before["macs"] - after["macs"]) if before["macs"] is not None else None,
                "macs_pct": _pct(before["macs"], after["macs"]),
            },
            "layers": layer_rows(before["layers"], after["layers"]),
            "passes": [p.to_dict() for p in self.passes],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "budget": self.search.to_dict() if self.search is not None else None,
            **(self.evidence.to_dict() if self.evidence is not None else {}),
            "speed": self.speed.to_dict() if self.speed is not None else None,
            "precision": self.precision.to_dict() if self.precision is not None else None,
            "notes": self.source.notes + self.notes,
            "seconds": round(self.seconds, 3),
        }

    def summary(self, command: str | None = None) -> str:
        """A readable terminal summary; the full detail is in :meth:`report`. ``command``: how the
        user ran us (for the advice to pass real inputs)."""
        r = self.report()
        b, a = r["before"], r["after"]
        lines = [p.summary() for p in self.passes]
        for p in self.passes:
            if p.declined:
                shown = "; ".join(f"{d.node}: {d.reason}" for d in p.declined[:2])
                more = f" (+{len(p.declined) - 2} more in --report)" if len(p.declined) > 2 else ""
                lines.append(f"  {p.name} left {len(p.declined)} alone, e.g. {shown}{more}")
        if self.search is not None:
            s = self.search
            lines.append(
                f"budget: {s.goal} -> {s.knob.replace('_', ' ')} {s.value:.3g} after {len(s.trials)} "
                f"trial{'' if len(s.trials) == 1 else 's'}"
                + ("" if s.met else " (NOT met)")
                + "".join(f"; {n}" for n in s.notes)
            )
        lines.append(
            f"parameters {b['params']:,} -> {a['params']:,} ({_change(r['removed']['params_pct'])}); "
            f"MACs {_fmt(b['macs'])} -> {_fmt(a['macs'])} ({_change(r['removed']['macs_pct'])}); "
            f"deflated {'~' if a['deflated_estimated'] else ''}{b['deflated_bytes']:,} -> {a['deflated_bytes']:,} bytes"
        )
        lines += [f"note: {n}" for n in self.notes]
        if self.speed is not None:
            chosen = self.precision.chosen if self.precision is not None else None
            lines.append(self.speed.describe(written=chosen is None or not chosen.of))
        if self.precision is not None:
            lines += self.precision.lines()
        if self.evidence is not None:
            src = self.source.path or "IN.onnx"
            lines += self.evidence.summary_lines(command or f"redonnx prune {src} -o OUT.onnx")
        if self.verification is not None:
            lines.append(self.verification.summary())
        return "\n".join(lines)


def _fmt(v: int | None) -> str:
    return f"{v:,}" if v is not None else "?"


def _change(removed_pct: float | None) -> str:
    """'12.4% removed', or '0.6% added' where the rewrite added some (a shortcut as a 1x1 conv)."""
    if removed_pct is None:
        return "? removed"
    return f"{removed_pct:.1f}% removed" if removed_pct >= 0 else f"{-removed_pct:.1f}% added"


def _pct(before: int | None, after: int | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return round(100.0 * (before - after) / before, 3)


def _sizes(model: onnx.ModelProto, cost: ModelCost, deflated: Future[int] | None = None) -> dict[str, Any]:
    return {
        "params": cost.params,
        "macs": cost.macs,
        "bytes": weights.model_nbytes(model),
        "deflated_bytes": deflated.result() if deflated is not None else weights.deflated_size(model),
        "deflated_estimated": weights.deflate_estimated(model),
        "nodes": len(model.graph.node),
        "ops": cost.ops,
        "layers": [
            {
                "name": lay.name,
                "origin": lay.origin,
                "op": lay.op,
                "weight": lay.weight_shape,
                "params": lay.params,
                "macs": lay.macs,
            }
            for lay in cost.layers
        ],
    }


def layer_rows(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each original layer with its parameters and MACs before and after, paired by origin (see
    :func:`redonnx.measure.cost.layer_origin`; layers sharing one, in graph order); a separated layer's
    parts (``ORIGIN_sepK_...``) are summed."""
    by_origin: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in after:
        by_origin[_origin(a)].append(a)
    seen: Counter[str] = Counter()
    rows = []
    for lay in before:
        key = _origin(lay)
        same = by_origin.get(key, [])[seen[key] : seen[key] + 1]
        seen[key] += 1
        parts = same + [a for a in after if a["name"].startswith(f"{key}_sep")]
        p_after = sum(a["params"] for a in parts)
        m_after = sum(a["macs"] or 0 for a in parts) if parts else 0
        rows.append({
            "layer": lay["name"],
            "op": lay["op"],
            "params_before": lay["params"],
            "params_after": p_after,
            "macs_before": lay["macs"],
            "macs_after": m_after if lay["macs"] is not None else None,
            "removed_pct": 100.0 * (1 - p_after / lay["params"]) if lay["params"] else 0.0,
        })  # fmt: skip
    return rows


def _origin(layer: dict[str, Any]) -> str:
    return layer.get("origin") or layer["name"]  # reports written before origins were kept


CONVENTIONS_WHY = (
    "their realism at the first BatchNorm layers differs by less than it moves between draws of "
    "other natural-image spectra"
)


@dataclass
class Evidence:
    """What the synthetic inputs are, and how realistic they look to the model's BatchNorm layers."""

    inputs: InputModel
    given: bool
    realism: Realism | None = None
    calibration: bool = False
    tightened: float | None = None  # the default budget's cosine, when tightened for want of realism
    sizes: str = ""  # dynamic dimensions' sizes, when chosen for the user
    lossy: bool = False  # the passes may change outputs (a budget is at stake)
    unmeasured: str = ""  # why realism was not measured, where no decision uses it

    @property
    def corrections(self) -> list | None:
        return self.realism.corrections if self.realism is not None and not self.calibration else None

    @property
    def cautious(self) -> bool:
        """Synthetic verification whose realism is poor or cannot be measured (no BatchNorm)."""
        return not self.given and (self.realism is None or self.realism.poor)

    def why_cautious(self) -> str:
        if self.realism is None and self.unmeasured:
            return f"the realism of synthetic inputs was {self.unmeasured}"
        if self.realism is None or self.realism.overall is None:
            return "the realism of synthetic inputs cannot be measured (no BatchNorm statistics)"
        return f"synthetic inputs look unlike the data (realism {self.realism.overall:.2f} < {realism_mod.POOR:g})"

    @property
    def conventions_checked(self) -> dict[str, list[str]]:
        """Inputs verified in more than one scale convention: the chosen one first, then those the
        BatchNorm evidence could not rule out (synthetic verification only)."""
        if self.given:
            return {}
        return {s.name: [s.convention or "", *s.plausible] for s in self.inputs.specs.values() if s.plausible}

    def to_dict(self) -> dict[str, Any]:
        verified_on = "given inputs" if self.given else "synthetic inputs"
        checked = self.conventions_checked
        return {
            "inputs": {
                **self.inputs.to_dict(),
                "verified_on": verified_on,
                "sizes": self.sizes or None,
                "conventions_checked": checked or None,
                "conventions_why": CONVENTIONS_WHY if checked else None,
            },
            "realism": self.realism.to_dict() if self.realism is not None else None,
        }

    def summary_lines(self, command: str) -> list[str]:
        lines = [f"inputs: {self.inputs.source}: {self.inputs.describe()}"]
        if self.sizes:
            lines.append(self.sizes)
        for name, convs in self.conventions_checked.items():
            lines.append(f"{name}: checked in each plausible convention: {convs[0]} (chosen), "
                         f"{', '.join(convs[1:])} ({CONVENTIONS_WHY})")  # fmt: skip
        if self.realism is not None:
            fixed = (f"; channel statistics measured with the activations corrected to the running statistics of "
                     f"{len(self.realism.corrections)} BatchNorm layers") if self.corrections else ""  # fmt: skip
            lines.append(f"synthetic {self.realism.describe()}{fixed}")
        if self.tightened is not None:
            lines.append(f"budget tightened to cosine >= {self.tightened:g}: {self.why_cautious()}")
        elif self.cautious and self.lossy:  # a budget given by the user, on inputs nothing vouches for
            lines.append(f"budget checked on synthetic inputs only: {self.why_cautious()}; on real data the "
                         "outputs can move more than it shows")  # fmt: skip
        if (self.cautious and self.lossy) or (self.realism is not None and self.realism.poor):
            lines.append(f"for evidence on your data, verify on real inputs: {command} --inputs real.npz "
                         f"(arrays {self.inputs.npz_hint()})")  # fmt: skip
        return lines
