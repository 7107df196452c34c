"""The BERT-style fixtures in tests/fixtures: onnxruntime reproduces torch's outputs, the planted
redundancy is in the graph, and (where torch is installed) the builder reproduces them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

FIXTURES = Path(__file__).resolve().parent / "fixtures"
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
ATOL = 1e-5


def inputs(folder: Path = FIXTURES) -> dict[str, np.ndarray]:
    with np.load(folder / "bert_tiny_inputs.npz") as data:
        return {k: data[k] for k in data.files}


def embed(path: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["embedding"], {n: data[n] for n in INPUT_NAMES})[0]


@pytest.mark.parametrize(
    ("name", "ref"), [("bert_tiny", "embedding_ref"), ("bert_tiny_planted", "embedding_ref_planted")]
)
def test_onnxruntime_matches_torch_reference(name: str, ref: str) -> None:
    data = inputs()
    got = embed(FIXTURES / f"{name}.onnx", data)
    assert got.shape == (16, 32)
    np.testing.assert_allclose(got, data[ref], rtol=0, atol=ATOL)


def test_planted_redundancy_is_in_the_graph() -> None:
    data = inputs()
    m = onnx.load(FIXTURES / "bert_tiny_planted.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    by_name = {n.name: n for n in m.graph.node}
    layer, src, dst = data["planted_duplicate_head"].tolist()
    for proj in ("query", "key", "value"):
        w = inits[by_name[f"/layers.{layer}/attention/{proj}/MatMul"].input[1]]  # [in, out]
        b = inits[f"layers.{layer}.attention.{proj}.bias"]
        np.testing.assert_array_equal(w[:, dst * 8 : dst * 8 + 8], w[:, src * 8 : src * 8 + 8])
        np.testing.assert_array_equal(b[dst * 8 : dst * 8 + 8], b[src * 8 : src * 8 + 8])
    dead = data["planted_dead_neurons"]
    w = inits[by_name["/layers.1/mlp/fc1/MatMul"].input[1]]
    b = inits["layers.1.mlp.fc1.bias"]
    assert not w[:, dead].any() and not b[dead].any()
    live = np.setdiff1d(np.arange(64), dead)
    assert np.abs(w[:, live]).sum(0).min() > 0 and b[live].all()
    # The base model has none of it, and the planted edits change the output.
    base = onnx.load(FIXTURES / "bert_tiny.onnx")
    base_b = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}["layers.1.mlp.fc1.bias"]
    assert base_b.all()
    assert np.abs(data["embedding_ref"] - data["embedding_ref_planted"]).max() > 1e-3


def test_builder_reproduces_the_fixtures(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("build_fixtures", FIXTURES / "build_fixtures.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    paths = builder.build(tmp_path)
    committed, fresh = inputs(), inputs(tmp_path)
    for k in INPUT_NAMES:
        np.testing.assert_array_equal(fresh[k], committed[k])
    for name, ref in (("base", "embedding_ref"), ("planted", "embedding_ref_planted")):
        np.testing.assert_allclose(fresh[ref], committed[ref], rtol=0, atol=ATOL)
        np.testing.assert_allclose(embed(paths[name], committed), committed[ref], rtol=0, atol=ATOL)
