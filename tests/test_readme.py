"""The README's quick start is what CI runs."""

from __future__ import annotations

import re

from conftest import ROOT


def test_ci_runs_the_readme_quick_start_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.+?)\n```", quick, flags=re.S)
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for cmd in commands:
        assert cmd.strip() in ci


def _python_blocks() -> list[str]:
    layout = (ROOT / "README.md").read_text().split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.+?)\n```", layout, flags=re.S)


def test_readme_python_api_example_runs() -> None:
    """The layout section's prune example runs as written and verifies."""
    import os

    here = os.getcwd()
    os.chdir(ROOT)  # the example names the bundled model by a relative path
    try:
        ns: dict = {}
        exec(compile(_python_blocks()[0], "README.md", "exec"), ns)
    finally:
        os.chdir(here)
    result = ns["result"]
    assert result.verification, result.verification.summary()
    assert result.after.params < result.before.params


def test_readme_example_pass_is_one_module_and_one_registry_line() -> None:
    """The README's example pass, registered with one line, runs by name and removes a zero Pad exactly."""
    import numpy as np
    import onnx
    from builders import Builder
    from conftest import assert_equivalent

    from redonnx import passes
    from redonnx.pipeline import run_passes

    ns: dict = {}
    exec(compile(_python_blocks()[1], "README.md", "exec"), ns)
    cls = ns["DropZeroPads"]
    b = Builder()
    x = b.op("Relu", ["x"])
    padded = b.op("Pad", [x, b.const(np.zeros(8, np.int64))])
    model = b.model([("x", [1, 2, 4, 4])], [b.op("Relu", [padded])])
    passes.PASSES[cls.name] = cls
    try:
        out, (res,) = run_passes(model, ["drop-zero-pads"], exact=True)
    finally:
        del passes.PASSES[cls.name]
    assert res.counts == {"zero pads removed": 1}
    assert "Pad" not in [n.op_type for n in out.graph.node]
    assert_equivalent(model, out)
    assert isinstance(out, onnx.ModelProto)
