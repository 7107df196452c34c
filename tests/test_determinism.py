"""The default prune writes the same bytes for the same model, flags and seed, in any process.

What used to leak into the output: the order of a set of tensor names (Python's string hashing
differs per process unless PYTHONHASHSEED is fixed), which decided the order in which one random
generator sampled each tensor's rows for the channel statistics; and thread counts (onnxruntime's
and BLAS's), which decide how some sums are split and so their last bits. Under the speed target
the decisions also rest on measured latencies: they are cached (REDONNX_CACHE), and two runs that
share the cache take the same decisions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, assert_equivalent, shared_model

from redonnx import pipeline
from redonnx.io.graph import to_graph
from redonnx.measure.runtime import REPRODUCIBLE_THREADS, try_session

reconstruct = sys.modules["redonnx.redundancy.statistics"]

# both wrote different files under PYTHONHASHSEED=1 and =2 before the fix; ~2 s each
CASES = ["cifar10/resnet20_bn.onnx", "cifar10/resnet20_dynamo/model.onnx"]
THREAD_VARS = ("PYTHONHASHSEED", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _prune(src: Path, folder: Path, env: dict[str, str]) -> dict[str, bytes]:
    """A default prune in a fresh interpreter; the written files (model and weight data) by name."""
    folder.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    base["REDONNX_CACHE"] = str(folder.parent / "latency-cache")  # shared by both runs
    proc = subprocess.run(
        [sys.executable, "-m", "redonnx.cli", "prune", str(src), "-o", str(folder / "out.onnx")],
        env={**base, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("rel", CASES, ids=["resnet20_bn", "resnet20_dynamo"])
def test_default_prune_is_byte_identical_across_processes(tmp_path: Path, rel: str) -> None:
    src = shared_model(rel)
    a = _prune(src, tmp_path / "a", {"PYTHONHASHSEED": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    b = _prune(src, tmp_path / "b", {"PYTHONHASHSEED": "2"})
    assert list(a) == list(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs between the two runs"


def test_blas_holds_one_thread_unless_the_user_says_otherwise() -> None:
    """LAPACK's inverse and solve give different last bits for different thread counts: importing
    redonnx sets OPENBLAS_NUM_THREADS (and OMP_, MKL_) to 1 where they are not set."""
    code = "import redonnx, os; print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]


def test_statistics_and_verification_use_a_fixed_onnxruntime_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime splits some convolutions by its thread count (default: one per core)."""
    model = onnx.load(MODELS / "digits_resnet.onnx")
    assert try_session(model, "test").get_session_options().intra_op_num_threads == REPRODUCIBLE_THREADS
    threads: list[int] = []
    original = reconstruct.session

    def spy(m, *args, **kw):
        sess = original(m, *args, **kw)
        threads.append(sess.get_session_options().intra_op_num_threads)
        return sess

    monkeypatch.setattr(reconstruct, "session", spy)
    graph = to_graph(model)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    reconstruct.channel_stats(graph, {conv.outputs[0].name: 1}, batch=2)
    assert threads == [REPRODUCIBLE_THREADS]


def test_statistics_do_not_depend_on_the_order_tensors_are_asked_in() -> None:
    """One generator samples every tensor's rows in turn: the tensors are taken in name order."""
    graph = to_graph(onnx.load(MODELS / "digits_resnet.onnx"))
    names = [n.outputs[0].name for n in graph.nodes if n.op == "Conv"][:3]
    assert len(names) == 3
    # 1024 images of 8x8: more rows than are kept, so rows are sampled
    fwd = reconstruct.channel_stats(graph, {n: 1 for n in names}, batch=1024)
    rev = reconstruct.channel_stats(graph, {n: 1 for n in reversed(names)}, batch=1024)
    for n in names:
        assert np.array_equal(fwd[n].cov, rev[n].cov) and np.array_equal(fwd[n].mean, rev[n].mean)


def test_separation_names_do_not_depend_on_earlier_calls() -> None:
    """Separated convs are named from the graph, not a process-wide counter: a second prune in the
    same process writes the same bytes; two unnamed convs of one weight still get distinct names."""
    rng = np.random.default_rng(0)
    # rank-1 kernels per input channel: separation lowers the MACs
    w = (rng.standard_normal((8, 8))[:, :, None] * rng.standard_normal((8, 9))[None]).reshape(8, 8, 3, 3)
    nodes = [onnx.helper.make_node("Conv", [src, "w"], [dst], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
             for src, dst in (("x", "y0"), ("y0", "y1"))]  # fmt: skip
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 16, 16])],
        [onnx.helper.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w.astype(np.float32), "w")],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    # target macs: no latency gate (under ort-cpu a loaded machine can time the separated form slower)
    first = pipeline.prune(model, passes=["separate-depthwise"], check=False, target="macs").model
    again = pipeline.prune(model, passes=["separate-depthwise"], check=False, target="macs").model
    assert first.SerializeToString() == again.SerializeToString()
    names = [n.name for n in first.graph.node]
    assert any(n.startswith("w_sep0_") for n in names) and any(n.startswith("w_sep1_") for n in names)
    assert_equivalent(model, first)  # onnxruntime loads it: no name is written twice
