"""The default pipeline: relaxed merging sized by a fidelity budget or a MAC target."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS, cifar_batch, shared_model
from onnx import numpy_helper

from redonnx.io.files import load_model
from redonnx.measure.latency import CostModel
from redonnx.measure.runtime import run, session
from redonnx.passes import MergeChannels
from redonnx.pipeline import prune, run_passes
from redonnx.planner.search import ERROR_LADDER, largest_passing, smallest_passing

RESNET = MODELS / "digits_resnet.onnx"


def test_default_budget_is_met_and_searched() -> None:
    res = prune(RESNET, target="macs")
    assert res.verification and res.verification.min_cosine == 0.998
    s = res.search
    assert s is not None and s.goal == "fidelity budget" and s.met and s.knob == "error_budget"
    passing = [t.value for t in s.trials if t.passed]
    assert s.value == max(passing)
    assert all(not t.passed for t in s.trials if t.value > s.value) or s.value == max(t.value for t in s.trials)
    assert res.after.params < res.before.params


def test_search_stops_when_decided() -> None:
    """The fidelity search (a gallop up from the least lossy step) and the MAC target's bisection
    find the same index as a scan for every monotone threshold, with and without runs of ladder
    values that make the same model; nothing passing is decided in one trial, and the first step
    alone passing in two."""
    top = len(ERROR_LADDER) - 1
    for block in (1, 4):
        span = (lambda i, b=block: min((i // b + 1) * b - 1, top)) if block > 1 else (lambda i: i)
        for edge in [-1, 0, *(e for e in range(1, top + 1) if span(e) == e)]:
            tried: list[int] = []

            def ok(i: int, edge=edge, tried=tried) -> bool:
                tried.append(i)
                return i <= edge

            assert largest_passing(ok, top, 1, span) == max(edge, 0)
            assert len(tried) == len(set(tried)) <= 2 * (1 + top.bit_length())
            if edge < 1:  # not even the least lossy step: decided in one, nothing lossier built
                assert tried == [1]
            if block == 1 and edge == 1:
                assert tried == [1, 2]
    for edge in range(-1, top + 2):
        tried = []

        def at_least(i: int, edge=edge, tried=tried) -> bool:
            tried.append(i)
            return i >= edge

        passing = [i for i in range(top + 1) if i >= edge]
        # a MAC target is reached by merging something: 0 (exact merges only) is not tried
        assert smallest_passing(at_least, top) == min((i for i in passing if i), default=top)
        assert len(tried) == len(set(tried)) <= 2 + top.bit_length()
    res = prune(RESNET, target="macs", rtol=1e9, min_cosine=-1.0)  # every amount passes
    assert res.search.met and all(t.passed for t in res.search.trials)
    assert res.search.value == max(t.value for t in res.search.trials)
    assert largest_passing(lambda i: True, top, 1) == top


def test_a_budget_range_makes_the_same_choices() -> None:
    """The greedy says which budgets make its choices: every budget in [low, high) writes the same
    model (the search reuses the trial there), and ``high`` itself chooses more."""
    src = run_passes(load_model(RESNET).model, ["fold-batchnorm"], False)[0]

    def merged(budget: float):
        out, results = run_passes(src, [MergeChannels(error_budget=budget), "cleanup"], False)
        return out.SerializeToString(), results[0]

    checked = 0
    for budget in (1e-3, 1e-2, 0.05, 0.2):
        made, res = merged(budget)
        low, high = res.same_for
        assert low <= budget < high
        inside = [low, (low + budget) / 2, budget] + ([np.nextafter(high, 0)] if np.isfinite(high) else [])
        for b in inside:
            if b > 0:
                assert merged(b)[0] == made, (budget, b, res.same_for)
        if np.isfinite(high):
            assert merged(high)[0] != made, (budget, res.same_for)
            checked += 1
    assert checked >= 2


def test_largest_passing_matches_a_scan_from_any_guess() -> None:
    """The depth stage's count search: for every threshold and guess, the scan's answer, no count
    tried twice, and two trials when the guess is right (one when it is the last count)."""
    for n in range(0, 24):
        for edge in range(0, n + 1):
            for guess in [None, *range(0, n + 2)]:
                tried: list[int] = []

                def ok(k: int, edge=edge, tried=tried) -> bool:
                    tried.append(k)
                    return k <= edge

                assert largest_passing(ok, n, guess) == edge, (n, edge, guess, tried)
                assert len(tried) == len(set(tried)) and all(1 <= k <= n for k in tried)
                if guess is not None and guess == edge >= 1:
                    assert len(tried) == (1 if edge == n else 2), (n, edge, tried)


def test_stricter_budget_removes_less() -> None:
    loose = prune(RESNET, min_cosine=0.98, target="macs")
    strict = prune(RESNET, min_cosine=0.9999, target="macs")
    assert loose.search.value >= strict.search.value
    assert loose.after.params <= strict.after.params


def test_target_macs_reports_fidelity() -> None:
    res = prune(RESNET, target_macs=20, target="macs")  # any channel count: not the CPU's block (8 or 16)
    assert res.search.goal == "20 % MACs" and res.search.met
    assert res.report()["removed"]["macs_pct"] >= 20
    assert res.verification.passed  # report only: no fidelity budget was given


def test_channel_multiple_keeps_counts_aligned() -> None:
    src = run_passes(load_model(RESNET).model, None, True)[0]
    out, _ = run_passes(src, [MergeChannels(alpha=0.3, channel_multiple=8), "cleanup"], False)
    shapes = {t.name: numpy_helper.to_array(t).shape for t in out.graph.initializer}
    couts = [shapes[n.input[1]][0] for n in out.graph.node if n.op_type == "Conv"]
    assert all(c % 8 == 0 for c in couts)


def test_resnet20_default_keeps_top1() -> None:
    """Acceptance: default prune keeps top-1 within 0.5 points on the shared CIFAR-10 images, and
    its output runs faster than the input (measured by the speed gate)."""
    src = shared_model("cifar10/resnet20_bn.onnx")
    res = prune(src)
    assert res.verification
    x, y = cifar_batch()
    before = np.mean(run(session(res.source.model), {"input": x})["logits"].argmax(1) == y)
    after = np.mean(run(session(res.model), {"input": x})["logits"].argmax(1) == y)
    assert before - after <= 0.005
    assert res.speed is not None and res.speed.final_vs_input["ratio"] < 1.0
    assert "speed (onnxruntime CPU" in res.summary()


def test_resnet20_macs_target_keeps_top1() -> None:
    """--target macs: any channel count; > 3 % of MACs removed, top-1 within 0.5 points."""
    res = prune(shared_model("cifar10/resnet20_bn.onnx"), target="macs")
    x, y = cifar_batch()
    before = np.mean(run(session(res.source.model), {"input": x})["logits"].argmax(1) == y)
    after = np.mean(run(session(res.model), {"input": x})["logits"].argmax(1) == y)
    assert before - after <= 0.005
    assert res.report()["removed"]["macs_pct"] > 3.0
    assert any("not multiples of 8" in n for n in res.notes)  # 16 -> 13 channels: the user is told
    assert "note: " in res.summary()


def test_aligned_prune_has_no_alignment_note() -> None:
    res = prune(shared_model("cifar10/resnet20_bn.onnx"), target="macs", configured=[MergeChannels(channel_multiple=8)])
    assert res.verification and not res.notes


def work_ms(cm, shape) -> float:
    """A stand-in for timing a layer: its multiply-accumulates, whatever the channel count."""
    return shape.cin * shape.cout * float(np.prod(shape.kernel or (1,))) / max(shape.group, 1) * 1e-6


@pytest.mark.parametrize("target", ["macs", "ort-cpu"])
def test_alignment_note_only_where_counts_are_not_timed(target: str, monkeypatch) -> None:
    """16 -> fewer channels off the block of 8: told under macs (nothing timed them); not under
    ort-cpu, whose counts come from the cost model (here a block of 1: any count is as fast)."""
    monkeypatch.setattr(CostModel, "block", lambda cm: 1)
    monkeypatch.setattr(CostModel, "ms", work_ms)
    monkeypatch.setattr(CostModel, "saved", lambda cm, a, b: work_ms(cm, a) - work_ms(cm, b))
    res = prune(RESNET, passes=["fold-batchnorm", MergeChannels(alpha=0.3), "cleanup"], target=target)
    assert res.verification is not None
    assert any(lay.op == "Conv" and lay.weight_shape[0] % 8 for lay in res.after.layers)
    noted = any("not multiples of 8" in n for n in res.notes)
    assert noted == (target == "macs"), res.notes


@pytest.mark.parametrize("rel", ["tf/mlperf_tiny_fc_autoencoder.onnx", "pytorch/mtcnn_rnet.onnx"])
def test_default_on_other_real_models(rel: str) -> None:
    res = prune(shared_model(rel), samples=4)
    assert res.verification, res.verification.summary()
