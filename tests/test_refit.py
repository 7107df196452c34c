"""Least-squares refit of pruned layers to calibration inputs, layer after layer."""

from __future__ import annotations

import numpy as np
from conftest import MODELS

from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.passes import MergeChannels
from redonnx.pipeline import prune, run_passes
from redonnx.redundancy.refit import refit


def digits() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits_test.npz")
    return (data["x"].astype(np.float32) / 16.0), data["y"].astype(np.int64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_refit_moves_a_pruned_model_back_towards_the_original() -> None:
    src = load_model(MODELS / "digits_resnet.onnx").model
    x, _ = digits()
    calib, held = {"input": x[:160]}, {"input": x[160:]}
    base, _ = run_passes(src, ["fold-constants", "fold-batchnorm"], True)
    pruned, results = run_passes(base, [MergeChannels(alpha=0.4)], False)
    kept = {k: v for r in results for k, v in r.kept.items()}
    fitted = refit(pruned, src, calib, kept)
    assert fitted.layers and all(lay["error_after"] < lay["error_before"] for lay in fitted.layers)
    ref = run(session(src), held)["logits"]
    before = cosine(ref, run(session(pruned), held)["logits"])
    after = cosine(ref, run(session(fitted.model), held)["logits"])
    assert after > before, (before, after)  # on images the fit never saw


def test_calibration_refits_inside_the_budget_search() -> None:
    src = load_model(MODELS / "digits_resnet.onnx").model
    x, y = digits()
    calib = {"input": x[:160]}
    plain = prune(src, target_macs=40, target="macs", calibration=calib, refit=False)
    fitted = prune(src, target_macs=40, target="macs", calibration=calib)
    assert any(p.name == "refit" and p.modified for p in fitted.passes)
    top1 = lambda m: float(np.mean(run(session(m), {"input": x[160:]})["logits"].argmax(1) == y[160:]))  # noqa: E731
    assert top1(fitted.model) >= top1(plain.model)


def test_a_wide_layer_with_few_rows_is_not_refitted() -> None:
    """Least squares on fewer rows than inputs fits them exactly and worsens every other input: the
    held-out check declines it; with many rows the same layer is refitted."""
    import onnx_graphsurgeon as gs

    from redonnx.redundancy.refit import _generalizes

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 8))
    node = gs.Node("MatMul", inputs=[gs.Variable("x"), gs.Constant("w", w)], outputs=[gs.Variable("y")])
    truth = w + 0.05 * rng.standard_normal(w.shape)  # what the original computed: a better fit exists

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        a = rng.standard_normal((n, 256))
        return a, a @ truth + 0.5 * rng.standard_normal((n, 8))

    assert not _generalizes(node, *rows(200))
    assert _generalizes(node, *rows(8192))
