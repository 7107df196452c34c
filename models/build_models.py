"""Train small digit classifiers and export them to ONNX as test fixtures.

Rebuild with::

    pip install torch==2.13.0 scikit-learn onnx onnxruntime
    python models/build_models.py

Trains three tiny models on scikit-learn's bundled ``load_digits`` data set
(CPU only, fixed seeds), exports them with the TorchScript ONNX exporter,
checks the ONNX top-1 accuracy with onnxruntime against torch, and writes
``digits_test.npz`` plus ``README.md`` next to this script.
"""

from __future__ import annotations

import inspect
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

OUT_DIR = Path(__file__).resolve().parent
SEED = 0
N_TEST = 360
MAX_BYTES = 300 * 1024
MAX_ACC_DIFF = 0.5  # percentage points between torch and onnxruntime


@dataclass(frozen=True)
class Spec:
    """How to build, train and export one model."""

    name: str
    factory: Callable[[], nn.Module]
    flat: bool
    opset: int
    epochs: int
    min_acc: float


@dataclass(frozen=True)
class Result:
    """Outcome of building one model."""

    name: str
    opset: int
    params: int
    torch_acc: float
    onnx_acc: float
    size: int
    ops: Counter[str]


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Return a bias-free Conv2d with 'same'-style padding followed by BatchNorm2d."""
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet basic block: Conv-BN-ReLU-Conv-BN plus shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3))
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.relu(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: expand, depthwise, project, Add."""

    def __init__(self, ch: int, expand: int) -> None:
        super().__init__()
        hidden = ch * expand
        self.body = nn.Sequential(
            *conv_bn(ch, hidden, 1),
            nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, groups=hidden),
            nn.ReLU6(),
            *conv_bn(hidden, ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return x + self.body(x)


class ConcatBranches(nn.Module):
    """Two parallel conv branches (1x1 and 3x3) joined by channel Concat."""

    def __init__(self, cin: int, cbranch: int) -> None:
        super().__init__()
        self.a = nn.Sequential(*conv_bn(cin, cbranch, 1), nn.ReLU6())
        self.b = nn.Sequential(*conv_bn(cin, cbranch, 3), nn.ReLU6())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply both branches and concatenate along channels."""
        return torch.cat([self.a(x), self.b(x)], dim=1)


def make_resnet() -> nn.Module:
    """Build the small residual CNN (input [N,1,8,8])."""
    return nn.Sequential(
        *conv_bn(1, 16, 3),
        nn.ReLU(),
        BasicBlock(16, 16),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def make_mlp() -> nn.Module:
    """Build the MLP with BatchNorm1d (input [N,64])."""
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def make_mobile() -> nn.Module:
    """Build the MobileNetV2-style CNN with a Concat block (input [N,1,8,8])."""
    return nn.Sequential(
        *conv_bn(1, 16, 3),
        nn.ReLU6(),
        InvertedResidual(16, 2),
        ConcatBranches(16, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


SPECS = [
    Spec("digits_resnet", make_resnet, flat=False, opset=17, epochs=30, min_acc=95.0),
    Spec("digits_mlp", make_mlp, flat=True, opset=13, epochs=40, min_acc=95.0),
    Spec("digits_mobile", make_mobile, flat=False, opset=13, epochs=40, min_acc=93.0),
]


def seed_everything(seed: int) -> None:
    """Seed all RNGs and pin torch to deterministic CPU execution."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return raw uint8 (x_train, y_train, x_test, y_test); test = last N_TEST."""
    digits = load_digits()
    x = digits.images.astype(np.uint8)[:, None, :, :]  # [N,1,8,8], values 0..16
    y = digits.target.astype(np.uint8)
    return x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]


def prepare(x: np.ndarray, flat: bool) -> np.ndarray:
    """Normalise raw digits to float32 x/16, flattened to [N,64] if requested."""
    out = x.astype(np.float32) / 16.0
    return out.reshape(len(out), 64) if flat else out


def init_bn(model: nn.Module) -> None:
    """Give BatchNorm biases small random values.

    Two BN layers feeding the same Add get identical bias gradients, so with
    zero init their biases stay equal and the exporter deduplicates them
    into an Identity node. Random init keeps every initializer distinct.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.normal_(module.bias, std=0.05)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    """Train with AdamW, cosine LR schedule and label-smoothed cross-entropy."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx], label_smoothing=0.2)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(axis=1) == y).mean() * 100.0)


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Run the model in eval mode without gradients."""
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def export(model: nn.Module, sample: np.ndarray, path: Path, opset: int) -> None:
    """Export with the TorchScript exporter, keeping BatchNormalization nodes."""
    kwargs: dict[str, object] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    torch.onnx.export(
        model.eval(),
        (torch.from_numpy(sample),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        do_constant_folding=False,  # constant folding would fuse BN into Conv
        training=torch.onnx.TrainingMode.EVAL,
        **kwargs,
    )


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Run an ONNX model with onnxruntime on CPU."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def op_histogram(path: Path) -> Counter[str]:
    """Check the ONNX model and count its node op types."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return Counter(node.op_type for node in model.graph.node)


def build(spec: Spec, data: tuple[np.ndarray, ...]) -> Result:
    """Train, export and verify one model."""
    x_tr, y_tr, x_te, y_te = data
    seed_everything(SEED)
    model = spec.factory()
    init_bn(model)
    train(model, prepare(x_tr, spec.flat), y_tr, spec.epochs)
    x_test = prepare(x_te, spec.flat)
    torch_acc = accuracy(torch_logits(model, x_test), y_te)
    path = OUT_DIR / f"{spec.name}.onnx"
    export(model, x_test[:2], path, spec.opset)
    onnx_acc = accuracy(onnx_logits(path, x_test), y_te)
    ops = op_histogram(path)
    size = path.stat().st_size
    assert abs(onnx_acc - torch_acc) <= MAX_ACC_DIFF, (spec.name, torch_acc, onnx_acc)
    assert onnx_acc >= spec.min_acc, (spec.name, onnx_acc)
    assert ops["BatchNormalization"] > 0, (spec.name, ops)
    assert ops["Identity"] == 0, (spec.name, ops)
    assert size < MAX_BYTES, (spec.name, size)
    params = sum(p.numel() for p in model.parameters())
    return Result(spec.name, spec.opset, params, torch_acc, onnx_acc, size, ops)


def format_ops(ops: Counter[str]) -> str:
    """Render an op histogram as 'Op xN, ...' sorted by count."""
    return ", ".join(f"{op} x{n}" for op, n in sorted(ops.items(), key=lambda t: (-t[1], t[0])))


def write_readme(results: list[Result]) -> None:
    """Write models/README.md describing the generated files."""
    rows = "\n".join(
        f"| `{r.name}.onnx` | {r.opset} | {r.params:,} | {r.size / 1024:.1f} KB "
        f"| {r.torch_acc:.2f}% | {r.onnx_acc:.2f}% |"
        for r in results
    )
    ops = "\n".join(f"- `{r.name}.onnx`: {format_ops(r.ops)}" for r in results)
    text = f"""# Test models

Small models trained on scikit-learn's bundled `load_digits` data set
(8x8 grayscale digits, 1797 samples). Generated by `build_models.py`;
do not edit by hand.

## Rebuild

```sh
pip install torch==2.13.0 scikit-learn onnx onnxruntime
python models/build_models.py
```

CPU only, fixed seeds. Exported with the TorchScript exporter
(`dynamo=False`, `do_constant_folding=False`,
`training=TrainingMode.EVAL`) so BatchNormalization nodes stay in the graph.
Input `input` (float32, `x / 16.0`; `[batch,1,8,8]` for CNNs, `[batch,64]`
for the MLP), output `logits` `[batch,10]`; the batch axis is dynamic
(`batch`).

## Models

Accuracy is top-1 on the held-out test set (last {N_TEST} samples);
the ONNX column is measured with onnxruntime on the exported file.

| File | Opset | Params | Size | Torch acc | ONNX acc |
|---|---|---|---|---|---|
{rows}

Op histograms:

{ops}

## Test data

`digits_test.npz`: `x` uint8 `[{N_TEST},1,8,8]` raw digit values 0..16,
`y` uint8 `[{N_TEST}]` labels. Divide `x` by 16 (and reshape to
`[N,64]` for the MLP) before feeding the models.
"""
    (OUT_DIR / "README.md").write_text(text)


def main() -> None:
    """Build all models, the test set and the README."""
    torch.set_num_threads(2)
    start = time.perf_counter()
    data = load_split()
    np.savez_compressed(OUT_DIR / "digits_test.npz", x=data[2], y=data[3])
    results = []
    for spec in SPECS:
        r = build(spec, data)
        results.append(r)
        print(
            f"{r.name}: params={r.params} size={r.size}B torch_acc={r.torch_acc:.2f}% "
            f"onnx_acc={r.onnx_acc:.2f}%\n  ops: {format_ops(r.ops)}"
        )
    write_readme(results)
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
