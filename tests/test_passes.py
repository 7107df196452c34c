"""Passes as configured objects: the registry, typed parameters, exactness per instance, the CLI's
construction from flags, and a planner that only sets parameters."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from conftest import MODELS

from redonnx import passes
from redonnx.cli import _configured, build_parser
from redonnx.errors import RedonnxError
from redonnx.io.files import load_model
from redonnx.io.graph import to_graph
from redonnx.passes import HashWeights, MergeChannels, PassContext, PruneHeads, SeparateDepthwise
from redonnx.pipeline import prune, run_passes
from redonnx.planner import searched


@pytest.mark.parametrize("name", sorted(passes.PASSES))
def test_each_registered_pass_is_one_module_with_one_dataclass(name: str) -> None:
    cls = passes.PASSES[name]
    assert cls.name == name and dataclasses.is_dataclass(cls)
    module = importlib.import_module(cls.__module__)
    assert module.__doc__.startswith(f"{name}:"), module.__doc__[:60]  # the docstring states the rewrite
    assert [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, passes.Pass)
            and c is not passes.Pass] == [cls]  # fmt: skip
    default = cls()
    assert default.exact == (name != "hash-weights")  # every other pass is lossless unless told otherwise
    assert default(to_graph(load_model(MODELS / "digits_mlp.onnx").model)).name == name  # runs with no context


def test_exactness_is_a_property_of_the_parameters() -> None:
    assert MergeChannels().exact and MergeChannels(alpha=0.0).exact
    assert not MergeChannels(alpha=0.1).exact and not MergeChannels(error_budget=0.01).exact
    assert MergeChannels(alpha=0.1).with_params(alpha=0.0).exact
    assert not SeparateDepthwise(max_error=0.2).exact and not PruneHeads(drop={"a": [0]}).exact
    assert MergeChannels(criterion="paper").knob == "alpha" and MergeChannels().knob == "error_budget"


@pytest.mark.parametrize(
    ("cls", "params"),
    [(MergeChannels, {"alpha": 1.5}), (MergeChannels, {"criterion": "nearest"}), (SeparateDepthwise, {"max_error": 2}),
     (SeparateDepthwise, {"form": "folded"}), (HashWeights, {"max_error": 0}), (HashWeights, {"tau_strategy": "x"})],
)  # fmt: skip
def test_bad_parameters_are_usage_errors_at_construction(cls, params) -> None:
    with pytest.raises(RedonnxError):
        cls(**params)


def test_resolve_takes_configured_instances_and_refuses_lossy_ones_under_exact() -> None:
    mine = MergeChannels(channel_multiple=4)
    chosen = passes.resolve(["fold-batchnorm", "merge-channels"], configured=[mine])
    assert chosen[1] is mine and type(chosen[0]).__name__ == "FoldBatchNorm"
    with pytest.raises(RedonnxError, match="unknown pass"):
        passes.resolve(["fold-everything"])
    with pytest.raises(RedonnxError, match="lossy"):
        passes.resolve([MergeChannels(alpha=0.2)], exact=True)
    default = passes.resolve(None, target="macs")
    assert next(p for p in default if isinstance(p, HashWeights)).max_error == passes.DEFAULT_HASH_ERROR
    assert "shortcut-conv" in [p.name for p in passes.resolve(None, exact=True, target="ort-cpu")]
    assert searched(default, exact=False) and not searched(passes.resolve([MergeChannels(alpha=0.1)]), False)


def _flags(*argv: str):
    return build_parser().parse_args(["prune", "in.onnx", "-o", "out.onnx", *argv])


def test_the_cli_builds_pass_instances_from_its_flags() -> None:
    assert _configured(_flags()) == []
    (h, m, s) = _configured(_flags("--tau", "3", "--alpha", "0.2", "--merge-criterion", "paper",
                                   "--separate-error", "0.1"))  # fmt: skip
    assert h == HashWeights(tau=3.0, max_error=passes.DEFAULT_HASH_ERROR)  # the default pipeline's bound
    assert m == MergeChannels(alpha=0.2, criterion="paper") and s == SeparateDepthwise(max_error=0.1)
    (h,) = _configured(_flags("--passes", "hash-weights", "--tau", "3"))
    assert h.max_error == HashWeights().max_error  # named on its own: the class default
    (h,) = _configured(_flags("--hash-error", "0.05", "--plot-dir", "plots"))
    assert h == HashWeights(max_error=0.05, plot_dir="plots")


def test_the_planner_only_sets_parameters() -> None:
    """The planner's choice is what the same pass instances, given the chosen value, write alone."""
    src = load_model(MODELS / "digits_mlp.onnx").model
    res = prune(src, target="macs", min_cosine=0.999)
    assert res.search is not None and res.search.value > 0 and res.after.params < res.before.params
    chosen = [p if not isinstance(p, MergeChannels) else p.with_params(**{p.knob: res.search.value})
              for p in passes.resolve(None, target="macs")]  # fmt: skip
    ev = res.evidence  # the same context: sizes, synthetic input model, BatchNorm corrections
    ctx = PassContext(shapes=res.before.input_shapes, target="macs", input_model=ev.inputs, corrections=ev.corrections)
    alone, _ = run_passes(src, chosen, ctx=ctx)
    assert alone.graph.SerializeToString() == res.model.graph.SerializeToString()
