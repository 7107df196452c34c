"""Large models: weights stay in their files (lean models), one working copy at a time.

The thresholds that make a model "large" are lowered here so a few-megabyte MLP takes the same
path as a model over 2 GB: loaded without its weight bytes, exported lean, verified by
onnxruntime from the files, saved by streaming."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from builders import Builder
from conftest import assert_equivalent

from redonnx.cli import main
from redonnx.io import files as rio
from redonnx.io import weights
from redonnx.io.files import load_model, save_model
from redonnx.io.graph import to_graph
from redonnx.pipeline import prune, run_passes


def mlp(width: int = 128, layers: int = 6, seed: int = 0) -> onnx.ModelProto:
    """MatMul/Relu chain without biases; layer 0 has a copied output column (an exact merge)."""
    b = Builder(seed)
    x = "x"
    for i in range(layers):
        w = (b.rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        if i == 0:
            w[:, 1] = w[:, 0]
        x = b.op("MatMul", [x, b.const(w, "w")])
        if i < layers - 1:
            x = b.op("Relu", [x])
    return b.model([("x", ["N", width])], [x])


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    return path


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def inline_bytes(model: onnx.ModelProto, at_least: int = weights.EXTERNAL_MIN_BYTES) -> int:
    """Weight bytes held in the proto itself (tensors of ``at_least`` bytes or more)."""
    return sum(len(t.raw_data) for t in weights.iter_tensors(model) if len(t.raw_data) >= at_least)


def test_load_keeps_weights_on_disk(tmp_path: Path) -> None:
    src = save_external(mlp(), tmp_path / "m.onnx")
    loaded = load_model(src)
    assert loaded.external_data and weights.external_base(loaded.model) == tmp_path.resolve()
    assert inline_bytes(loaded.model) == 0
    graph = to_graph(loaded.model)
    consts = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    assert consts and all(isinstance(c._values, weights.ExternalValues) for c in consts)  # 64 KiB each, unread
    first = consts[0]
    expected = onnx.numpy_helper.to_array(next(t for t in mlp().graph.initializer if t.name == first.name))
    np.testing.assert_array_equal(first.values, expected)


def test_exact_prune_of_a_lean_model_end_to_end(tmp_path: Path) -> None:
    src = save_external(mlp(), tmp_path / "m.onnx")
    before = sha1(tmp_path / "m.onnx.data")
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    assert main(["prune", str(src), "-o", str(out), "--exact", "--target", "macs"]) == 0  # merge one copy
    assert (out.parent / "p.onnx.data").stat().st_size > 300_000
    assert out.stat().st_size < 10_000
    assert not list(out.parent.glob(".redonnx-*")), "scratch files left behind"
    assert sha1(tmp_path / "m.onnx.data") == before
    onnx.checker.check_model(str(out))
    cand = load_model(out).model
    assert sum(int(np.prod(t.dims)) for t in cand.graph.initializer) < 6 * 128 * 128  # the copy is merged
    assert_equivalent(mlp(), cand)


def test_lean_and_in_memory_pipelines_agree(tmp_path: Path) -> None:
    src = save_external(mlp(), tmp_path / "m.onnx")
    lean = prune(load_model(src), target="macs")  # the speed gate times lean and plain apart: not compared here
    plain = prune(mlp(), target="macs")
    assert weights.external_base(lean.model) is not None and inline_bytes(lean.model) == 0
    assert weights.external_base(plain.model) is None
    assert lean.verification and plain.verification
    assert lean.after.params == plain.after.params < plain.before.params
    assert lean.report()["budget"] == plain.report()["budget"]
    assert_equivalent(weights.inline_copy(lean.model), plain.model, rtol=1e-5)


def test_large_in_memory_graph_is_exported_lean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "LEAN_BYTES", 100_000)
    monkeypatch.setattr(rio, "EXTERNAL_DATA_THRESHOLD", 100_000)
    model, _ = run_passes(mlp(), None, exact=True)
    assert weights.external_base(model) is not None and inline_bytes(model) == 0
    assert_equivalent(mlp(), model)  # onnxruntime reads the scratch files
    out = save_model(model, tmp_path / "o.onnx")
    assert (tmp_path / "o.onnx.data").exists()
    assert_equivalent(mlp(), load_model(out).model)


def test_saving_with_external_data_leaves_the_model_alone(tmp_path: Path) -> None:
    model = mlp()
    before = model.SerializeToString()
    save_model(model, tmp_path / "o.onnx", external_data=True)
    assert model.SerializeToString() == before
    again = load_model(tmp_path / "o.onnx")
    assert again.external_data
    assert_equivalent(model, again.model, rtol=0)


def test_lean_model_saved_inline_when_asked(tmp_path: Path) -> None:
    src = save_external(mlp(), tmp_path / "m.onnx")
    out = save_model(load_model(src).model, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    m = onnx.load(out)
    assert not any(p.key.startswith("redonnx:") for p in m.metadata_props)
    assert_equivalent(mlp(), m, rtol=0)


def test_deflate_estimate_is_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp(width=256, layers=8)
    exact = weights.deflated_size(model)
    monkeypatch.setattr(weights, "DEFLATE_EXACT_BYTES", 100_000)
    monkeypatch.setattr(weights, "_BLOCK", 16_384)
    assert weights.deflate_estimated(model)
    assert abs(weights.deflated_size(model) / exact - 1) < 0.05


def test_exact_prune_holds_one_copy_of_the_weights(tmp_path: Path) -> None:
    """numpy and Python allocations (tracemalloc) peak near one copy of the weights: no float64
    copies of every row, no exported candidate holding the bytes, no copy made to save."""
    model = mlp(width=1024, layers=6)  # 24 MiB: per-channel bookkeeping is small beside the weights
    size = inline_bytes(model, 0)
    src = save_external(model, tmp_path / "m.onnx")
    del model
    loaded = load_model(src)
    tracemalloc.start()
    try:
        result = prune(loaded, exact=True, check=False)
        save_model(result.model, tmp_path / "o.onnx", source=loaded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * size, f"peak {peak / 2**20:.1f} MiB for {size / 2**20:.1f} MiB of weights"
    assert_equivalent(load_model(src).model, load_model(tmp_path / "o.onnx").model)


def test_output_on_another_disk_copies_instead_of_linking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hard links fail across file systems: untouched weights are then copied into the scratch file."""

    def no_link(*_a, **_k):
        raise OSError("cross-device link")

    monkeypatch.setattr(weights.os, "link", no_link)
    src = save_external(mlp(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    assert main(["prune", str(src), "-o", str(out), "--passes", "cleanup"]) == 0
    assert_equivalent(mlp(), load_model(out).model, rtol=0)


def test_content_digest_follows_the_weights_not_where_they_lie(tmp_path: Path) -> None:
    """Caches keyed by a model (the speed gate's timings, INT8 verdicts) must hit again in the next
    process: a lean model's scratch files are named afresh, so its digest reads the weights instead."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_model(save_external(mlp(), tmp_path / "a" / "m.onnx")).model
    b = load_model(save_external(mlp(), tmp_path / "b" / "other.onnx")).model
    assert a.SerializeToString() != b.SerializeToString()  # the locations differ
    assert weights.content_digest(a) == weights.content_digest(b)
    (tmp_path / "c").mkdir()
    c = load_model(save_external(mlp(seed=1), tmp_path / "c" / "m.onnx")).model
    assert weights.content_digest(c) != weights.content_digest(a)
