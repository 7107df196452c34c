"""What a run's decisions use is computed once, and only where a decision uses it: the realism of
synthetic inputs and their BatchNorm corrections, the source model's cost and folded shapes."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from conftest import MODELS

from redonnx.inputs import realism
from redonnx.measure import cost
from redonnx.passes import MergeChannels
from redonnx.pipeline import prune

RESNET = MODELS / "digits_resnet.onnx"
BERT = Path(__file__).parent / "fixtures" / "bert_tiny.onnx"


@pytest.fixture
def assessed(monkeypatch: pytest.MonkeyPatch) -> list[onnx.ModelProto]:
    seen: list[onnx.ModelProto] = []
    real = realism.assess

    def spy(model, feeds, points=None, correct=True, prefix=False):
        if correct:  # the run's realism (the input model's convention probes do not correct)
            seen.append(model)
        return real(model, feeds, points, correct, prefix)

    monkeypatch.setattr(realism, "assess", spy)
    return seen


def test_hashing_alone_measures_no_realism(assessed: list) -> None:
    """A pipeline that takes no channel statistics neither measures realism nor fits corrections,
    and says so; one that searches merging measures them once."""
    res = prune(RESNET, passes=["fold-batchnorm", "hash-weights"])
    assert not assessed and res.evidence.realism is None and res.evidence.corrections is None
    assert "realism of synthetic inputs was not measured" in res.summary()
    assert res.verification is not None  # verified as before (this tiny model hashes poorly)
    res = prune(RESNET, target="macs")
    assert len(assessed) == 1 and res.evidence.realism is not None and res.evidence.corrections


def test_source_cost_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The source model's constants are folded and its shapes inferred once: for its cost and for
    the cost model's layer shapes at the chosen sizes (symbolic in the graph: [batch, seq, 32])."""
    calls: list[int] = []
    real = cost.to_graph

    def spy(model):  # every cost count starts here, whoever calls it
        calls.append(id(model))
        return real(model)

    monkeypatch.setattr(cost, "to_graph", spy)
    source = onnx.load(BERT)
    res = prune(source, passes=["fold-constants", MergeChannels(error_budget=0.05)], target="ort-cpu")
    assert res.verification is not None
    assert calls.count(id(source)) == 1 and len(calls) == 2  # before and after


def test_lossless_result_continues_from_the_searchs_exact_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed gate's lossless result starts with the passes the search ran before merging (fold
    constants and BatchNorm, heads, branches): they run once on the source, and the result is the
    bytes the whole lossless pipeline makes."""
    from redonnx import passes as P
    from redonnx.passes.fold_batchnorm import FoldBatchNorm
    from redonnx.planner import Planner

    folds: list[int] = []
    real = FoldBatchNorm.run
    monkeypatch.setattr(FoldBatchNorm, "run", lambda self, g, ctx: folds.append(1) or real(self, g, ctx))
    gated: list[onnx.ModelProto] = []
    lossless = Planner._lossless
    monkeypatch.setattr(Planner, "_lossless", lambda self, src: (r := lossless(self, src), gated.append(r[0]))[0])
    res = prune(RESNET)
    assert res.speed is not None and gated
    runs = len(folds)
    whole, _ = P.apply(onnx.load(RESNET), P.resolve(None, exact=True, target="ort-cpu"))
    assert runs == 1 and len(folds) == 2  # the search's; then the whole pipeline's here
    assert gated[0].SerializeToString() == whole.SerializeToString()


def test_default_prune_of_a_cnn_imports_no_scipy(tmp_path: Path) -> None:
    """Importing scipy's BLAS cost 0.25 s of every default run, for precision downdates a narrow
    layer does as fast in numpy: a CNN's default prune does not import scipy."""
    import subprocess
    import sys

    code = ("import sys; from redonnx.pipeline import prune; from redonnx.redundancy import statistics as R\n"
            "calls = []; real = R.remove_from_precision\n"
            "R.remove_from_precision = lambda p, r: calls.append(r) or real(p, r)\n"
            f"res = prune({str(RESNET)!r}, target='macs'); assert res.verification\n"
            "print(len(calls), 'scipy' in sys.modules)")  # fmt: skip
    env = {**os.environ, "REDONNX_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    downdates, imported = out.stdout.strip().splitlines()[-1].split()
    assert int(downdates) > 0 and imported == "False"  # the greedy ran its downdates without scipy
