"""Property-based: random conv / residual / concat / depthwise graphs with planted redundancies.

Every exact pipeline keeps the outputs (within 1e-4 of max |ref|) and removes what was planted;
every lossy pass stays within the budget it was given."""

from __future__ import annotations

import numpy as np
from builders import Builder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redonnx.measure.cost import model_cost
from redonnx.pipeline import prune

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def planted_graphs(draw):
    """A small CNN; some conv rows are copies (consumer columns split) or dead (zero, bias < 0)."""
    seed = draw(st.integers(0, 10_000))
    rng = np.random.default_rng(seed)
    b = Builder(seed)
    c = draw(st.sampled_from([4, 6, 8]))
    x = b.op("Relu", [b.conv("x", 3, c)])
    planted = 0
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["plain", "residual", "concat", "depthwise"]))
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3
        bias = rng.standard_normal(c).astype(np.float32) * 0.1
        copies = draw(st.integers(0, 2))
        dead = draw(st.booleans())
        rows_w, rows_b = [w], [bias]
        for _ in range(copies):
            src = int(rng.integers(0, c))
            rows_w.append(w[src : src + 1])
            rows_b.append(bias[src : src + 1])
        if dead:
            rows_w.append(np.zeros((1, c, 3, 3), np.float32))
            rows_b.append(np.array([-1.0], np.float32))
        wide_w, wide_b = np.concatenate(rows_w), np.concatenate(rows_b)
        n = len(wide_w)
        planted += n - c
        h = b.op("Relu", [b.op("Conv", [x, b.const(wide_w), b.const(wide_b)], pads=[1] * 4, kernel_shape=[3, 3])])
        if kind == "depthwise":
            dw = rng.standard_normal((n, 1, 3, 3)).astype(np.float32)
            for k in range(c, c + copies):  # a copied channel keeps its twin's depthwise kernel
                twin = int(np.flatnonzero((wide_w[:c] == wide_w[k]).all(axis=(1, 2, 3)))[0])
                dw[k] = dw[twin]
            h = b.op("Relu", [b.op("Conv", [h, b.const(dw)], group=n, pads=[1] * 4, kernel_shape=[3, 3])])
        cols = rng.standard_normal((c, n, 1, 1)).astype(np.float32) * 0.3
        y = b.op("Conv", [h, b.const(cols)], kernel_shape=[1, 1])
        if kind == "residual":
            y = b.op("Add", [y, x])
        elif kind == "concat":
            y = b.op("Concat", [y, x], axis=1)
            y = b.op("Conv", [y, b.rand(c, 2 * c, 1, 1)], kernel_shape=[1, 1])
        x = b.op("Relu", [y])
    return b.model([("x", ["n", 3, 6, 6])], [b.op("GlobalAveragePool", [x])]), planted


@SETTINGS
@given(planted_graphs())
def test_exact_pipeline_keeps_outputs_and_removes_plantings(case) -> None:
    m, planted = case
    res = prune(m, exact=True, samples=4, target="macs")
    assert res.verification, res.verification.summary()
    merge = next(p for p in res.passes if p.name == "merge-channels")
    assert sum(merge.counts.values()) >= planted
    assert res.after.params <= res.before.params


@SETTINGS
@given(planted_graphs(), st.sampled_from([0.9, 0.99]))
def test_lossy_default_stays_within_its_budget(case, cosine) -> None:
    m, _ = case
    res = prune(m, samples=4, min_cosine=cosine, target="macs")
    assert res.verification and res.verification.worst_cosine >= cosine
    assert model_cost(res.model).params <= model_cost(m).params
