"""Loading hostile and legacy files, saving atomically with the model's identity kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import Builder
from conftest import MODELS, SHARED, assert_equivalent, shared_model
from onnx import helper, numpy_helper

from redonnx.cli import main
from redonnx.errors import RedonnxError
from redonnx.io import files as rio
from redonnx.io.files import load_model, save_model
from redonnx.pipeline import prune

GOOD = MODELS / "digits_mlp.onnx"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "redonnx.cli", *args], capture_output=True, text=True, timeout=300)


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("redonnx: error:"), proc.stderr
    assert "Traceback" not in proc.stderr


def tiny_model() -> onnx.ModelProto:
    b = Builder()
    return b.model([("x", [1, 4])], [b.op("Relu", [b.op("MatMul", ["x", b.rand(4, 3)])])])


def hostile_files(tmp: Path) -> dict[str, Path]:
    files = {}
    good = GOOD.read_bytes()
    for name, data in {
        "empty": b"",
        "random": np.random.default_rng(1).bytes(4096),
        "text": b"this is not an onnx model\n" * 20,
        "truncated": good[: len(good) // 2],
    }.items():
        files[name] = tmp / f"{name}.onnx"
        files[name].write_bytes(data)
    files["directory"] = tmp / "dir.onnx"
    files["directory"].mkdir()
    files["missing"] = tmp / "nope.onnx"

    m = tiny_model()
    m.graph.node[1].input[0] = "nowhere"
    files["dangling"] = tmp / "dangling.onnx"
    onnx.save(m, files["dangling"])

    b = Builder()
    a = b.op("Add", ["x", "loop_back"])
    b.nodes.append(helper.make_node("Relu", [a], ["loop_back"], name="cyc"))
    files["cycle"] = tmp / "cycle.onnx"
    onnx.save(b.model([("x", [1, 4])], ["loop_back"]), files["cycle"])

    ext = tmp / "ext"
    ext.mkdir()
    onnx.save(
        load_model(GOOD).model, ext / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    os.remove(ext / "m.onnx.data")
    files["missing_external"] = ext / "m.onnx"
    return files


@pytest.mark.parametrize(
    "case", ["empty", "random", "text", "truncated", "directory", "missing", "dangling", "cycle", "missing_external"]
)
def test_hostile_input_exit_2_one_line_nothing_written(tmp_path: Path, case: str) -> None:
    f = hostile_files(tmp_path)[case]
    out = tmp_path / "out.onnx"
    proc = cli("prune", str(f), "-o", str(out))
    assert_clean_failure(proc)
    assert not out.exists()
    assert not list(tmp_path.glob(".redonnx-*"))
    assert_clean_failure(cli("inspect", str(f)))


def test_error_messages_name_the_problem(tmp_path: Path) -> None:
    files = hostile_files(tmp_path)
    expect = {
        "empty": "empty file",
        "directory": "directory",
        "missing": "no such file",
        "dangling": "'nowhere'",
        "cycle": "cycle",
        "missing_external": "missing external data",
    }
    for case, words in expect.items():
        with pytest.raises(RedonnxError, match=words):
            load_model(files[case])


def test_output_equal_to_input_refused_unless_force(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    p.write_bytes(GOOD.read_bytes())
    before = p.read_bytes()
    assert_clean_failure(cli("prune", str(p), "-o", str(p)))
    assert p.read_bytes() == before
    proc = cli("prune", str(p), "-o", str(p), "--force")
    assert proc.returncode == 0, proc.stderr
    assert p.read_bytes() != before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder(tmp_path: Path) -> None:  # pragma: no cover - CI runs as root
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert_clean_failure(cli("prune", str(GOOD), "-o", str(ro / "x.onnx")))


def test_missing_output_folder_and_bad_usage(tmp_path: Path) -> None:
    assert_clean_failure(cli("prune", str(GOOD), "-o", str(tmp_path / "no" / "x.onnx")))
    assert_clean_failure(cli("prune", str(GOOD)))  # -o missing
    assert_clean_failure(cli("prune", str(GOOD), "-o", str(tmp_path / "x.onnx"), "--passes", "nope"))
    assert_clean_failure(cli("inspect", str(GOOD), "--shape", "input=a,b"))
    assert_clean_failure(cli("frobnicate"))


def test_save_keeps_identity_and_tags_producer(tmp_path: Path) -> None:
    src = load_model(GOOD)
    src.model.doc_string = "doc"
    onnx.helper.set_model_props(src.model, {"author": "me"})
    out = tmp_path / "o.onnx"
    main(["prune", str(GOOD), "-o", str(out)])
    m = onnx.load(out)
    assert m.ir_version == src.model.ir_version
    assert [(o.domain, o.version) for o in m.opset_import] == [(o.domain, o.version) for o in src.model.opset_import]
    assert m.producer_name == src.model.producer_name
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    props = {p.key: p.value for p in m.metadata_props}
    assert props["redonnx"].startswith("redonnx ")


def test_metadata_props_survive(tmp_path: Path) -> None:
    m = tiny_model()
    onnx.helper.set_model_props(m, {"author": "me", "license": "MIT"})
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    main(["prune", str(src), "-o", str(tmp_path / "out.onnx")])
    props = {p.key: p.value for p in onnx.load(tmp_path / "out.onnx").metadata_props}
    assert props["author"] == "me" and props["license"] == "MIT" and "redonnx" in props


def test_external_data_kept_when_source_used_it(tmp_path: Path) -> None:
    src = shared_model("cifar10/resnet20_dynamo/model.onnx")
    out = tmp_path / "r.onnx"
    assert main(["prune", str(src), "-o", str(out), "--exact"]) == 0
    assert (tmp_path / "r.onnx.data").stat().st_size > 1_000_000
    assert out.stat().st_size < 100_000
    assert_equivalent(load_model(src).model, load_model(out).model)


def test_external_data_above_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rio, "EXTERNAL_DATA_THRESHOLD", 10_000)
    loaded = load_model(GOOD)
    out = save_model(loaded.model, tmp_path / "big.onnx", source=loaded)
    assert (tmp_path / "big.onnx.data").exists()
    again = load_model(out)
    assert again.external_data
    assert_equivalent(loaded.model, again.model)


def test_sessions_of_models_over_the_in_memory_limit_run_from_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model onnxruntime cannot take from memory (over the limit, or one protobuf refuses to
    serialize) gets a session through external data files: the same outputs."""
    from google.protobuf.message import EncodeError

    from redonnx.measure import runtime

    model = load_model(GOOD).model
    feeds = runtime.random_inputs(model, batch=2)
    want = runtime.session(model).run(None, feeds)
    monkeypatch.setattr(runtime, "ORT_SIZE_LIMIT", 1000)
    assert runtime._serialized(model) is None
    got = runtime.session(model).run(None, feeds)
    monkeypatch.setattr(runtime, "ORT_SIZE_LIMIT", 2**31)
    assert runtime._serialized(model) is not None

    class Refused:
        def SerializeToString(self) -> bytes:
            raise EncodeError("Failed to serialize proto")

    assert runtime._serialized(Refused()) is None
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ir3_initializers_stay_listed_as_inputs(tmp_path: Path) -> None:
    src = shared_model("cntk/mnist_8.onnx")
    out = tmp_path / "m.onnx"
    assert main(["prune", str(src), "-o", str(out), "--exact"]) == 0
    m = onnx.load(out)
    assert m.ir_version == 3 and m.opset_import[0].version == 8
    inits = {t.name for t in m.graph.initializer}
    assert inits and inits <= {i.name for i in m.graph.input}
    onnx.checker.check_model(m)


def test_subgraphs_preserved(tmp_path: Path) -> None:
    b = Builder()
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["t_in"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(np.ones(3, np.float32), "t_in")],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, None)],
    )
    total = b.op("ReduceSum", ["x"], keepdims=0)
    cond = b.op("Greater", [total, b.const(np.array(0.0, np.float32))])
    y = b.op("If", [cond], then_branch=then_g, else_branch=else_g)
    m = b.model([("x", [3])], [y])
    out, _ = __import__("redonnx.pipeline", fromlist=["run_passes"]).run_passes(m, None, exact=True)
    if_nodes = [n for n in out.graph.node if n.op_type == "If"]
    assert len(if_nodes) == 1
    branches = {a.name: a.g for a in if_nodes[0].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Identity"]
    assert_equivalent(m, out)


@pytest.mark.parametrize("opset", [8, 9, 11, 13, 15, 17, 19, 21, 23])
def test_opsets_8_to_23(opset: int) -> None:
    b = Builder()
    y = b.op("Relu", [b.bn(b.conv("x", 3, 4), 4)])
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    m = b.model([("x", ["n", 3, 6, 6])], [y], opset=opset, ir_version=11 if opset >= 21 else 7 if opset < 13 else 8)
    from redonnx.pipeline import prune

    res = prune(m, exact=True)
    assert res.verification and res.model.opset_import[0].version == opset
    assert "BatchNormalization" not in [n.op_type for n in res.model.graph.node]


def test_prune_leaves_the_callers_model_as_it_was() -> None:
    """gs keeps tensor-valued attributes as the model's own protos and its exporter writes names
    into them: a ConstantOfShape's value gained an empty name (two bytes) at every export."""
    b = Builder()
    x = b.op("Relu", ["x"])
    filled = b.op("ConstantOfShape", [b.const(np.array([1, 4], np.int64))],
                  value=numpy_helper.from_array(np.array([0.5], np.float32)))  # fmt: skip
    model = b.model([("x", [1, 4])], [b.op("Add", [x, filled])])
    before = model.SerializeToString()
    result = prune(model, exact=True)
    assert result.verification
    assert model.SerializeToString() == before


def test_tensor_map_is_gs_tensor_map() -> None:
    """io.graph.tensor_map stands in for gs's graph.tensors() (which checks every tensor): the same
    names, in the same order, mapped to the same objects."""
    from redonnx.io.graph import tensor_map, to_graph

    shared = SHARED / "cifar10" / "resnet20_bn.onnx"  # when it is there
    for path in [MODELS / "digits_resnet.onnx", *([shared] if shared.exists() else [])]:
        g = to_graph(onnx.load(str(path)))
        ours, theirs = tensor_map(g), g.tensors()
        assert list(ours) == list(theirs)
        assert all(ours[k] is theirs[k] for k in ours)
