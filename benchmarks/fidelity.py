"""How the default prune does on real data, next to what the budget saw on synthetic inputs.

Run: python benchmarks/fidelity.py [--models a,b] [--target macs]
Prints a Markdown table and writes benchmarks/results/fidelity.json (fidelity-macs.json).

For every shared model (and the bundled digits models) the default `prune` runs with no flags.
Its budget and verification see only synthetic inputs; we then compare the pruned model with
the original on real data: the shared CIFAR-10 images (top-1 for the CIFAR models), the same
images resized for the other image models (natural images, not their training data: a cosine
of outputs), the bundled digits for the digits models; the MLPerf autoencoder has no real data
here and is scored on inputs drawn as the tool infers them, with another seed. Also shown: the
input kind the tool inferred, the realism of its synthetic inputs (BatchNorm models), MACs
removed. A tf2onnx-style ResNet-20 (NHWC raw 0..255 pixels, Transpose before the first conv,
normalization folded into its weights) checks the raw-pixel inference through a Transpose.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
from common import ROOT, SHARED, available, table, write_json

sys.path.insert(0, str(ROOT / "tests"))
from builders import tf2onnx_style

from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.pipeline import prune

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def cifar_pixels() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(SHARED / "cifar10/cifar10_test_1017.npz")
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


def resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of NCHW images."""
    rows = (np.arange(h) * x.shape[2] // h).clip(0, x.shape[2] - 1)
    cols = (np.arange(w) * x.shape[3] // w).clip(0, x.shape[3] - 1)
    return x[:, :, rows][:, :, :, cols]


def real_data(name: str, n: int) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None, str]:
    """Real inputs for a model, its labels where they apply, and what they are."""
    px, y = cifar_pixels()
    px, y = px[:n], y[:n]
    if name in ("resnet20_bn", "resnet20_dynamo"):
        return {"input": (px / 255 - MEAN) / STD}, y, "CIFAR-10 test images"
    if name == "tf_resnet8":
        return {"input_1": np.ascontiguousarray(px.transpose(0, 2, 3, 1))}, y, "CIFAR-10 test images"
    if name == "tf2onnx_resnet20":
        return {"input": np.ascontiguousarray(px.transpose(0, 2, 3, 1))}, y, "CIFAR-10 test images"
    if name == "mobilenetv2":
        return {"input": (resize(px[:64], 224, 224) / 255 - MEAN) / STD}, None, "CIFAR-10 images resized to 224"
    if name == "mtcnn_rnet":
        return {"input": (resize(px, 24, 24) - 127.5) / 128.0}, None, "CIFAR-10 images resized to 24"
    if name == "paddle_ocr_cls":
        return {"x": (resize(px[:128], 48, 192) / 255 - 0.5) / 0.5}, None, "CIFAR-10 images resized to 48x192"
    if name == "super_resolution":
        gray = 0.299 * px[:16, :1] + 0.587 * px[:16, 1:2] + 0.114 * px[:16, 2:3]
        return {"input": resize(gray, 224, 224) / 255}, None, "CIFAR-10 luminance resized to 224"
    if name == "cntk_mnist":
        d = np.load(ROOT / "models/digits_test.npz")
        return {"Input3": resize(d["x"].astype(np.float32) * 16, 28, 28)}, None, "digits 0..255 resized to 28"
    if name.startswith("digits_"):
        d = np.load(ROOT / "models/digits_test.npz")
        x = d["x"].astype(np.float32) / 16.0
        return {"input": x.reshape(len(x), -1) if name == "digits_mlp" else x}, d["y"].astype(np.int64), "digits"
    return None, None, "drawn as inferred (seed 99)"


def as_float32(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v, dtype=np.float32) if v.dtype.kind == "f" else v for k, v in feeds.items()}


def models() -> list[tuple[str, onnx.ModelProto, dict]]:
    out = [(name, load_model(path).model, shapes) for name, path, shapes in available()]
    if (SHARED / "cifar10/resnet20_bn.onnx").exists():
        out.append(("tf2onnx_resnet20", tf2onnx_style(load_model(SHARED / "cifar10/resnet20_bn.onnx").model), {}))
    for name in ("digits_resnet", "digits_mobile", "digits_mlp"):
        out.append((name, load_model(ROOT / f"models/{name}.onnx").model, {}))
    return out


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Outputs as deployed: onnxruntime's graph optimizations on (an INT8 model runs its int8 kernels)."""
    sess = session(model, optimize=True)
    parts = []
    names = list(feeds)
    n = len(feeds[names[0]])
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    step = dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else 64
    for i in range(0, n, step):
        parts.append(next(iter(run(sess, {k: v[i : i + step] for k, v in feeds.items()}).values())))
    return np.concatenate(parts).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def written(res) -> str:
    """float, or INT8 and how many of the weighted layers."""
    q = res.precision.chosen if res.precision is not None else None
    return "float" if q is None else f"INT8 {q.int8_layers}/{len(q.layers)}"


def measure(name: str, model: onnx.ModelProto, shapes: dict, n: int, target: str = "ort-cpu") -> dict:
    t0 = time.perf_counter()
    res = prune(model, shapes=shapes or None, target=target)
    seconds = time.perf_counter() - t0
    rep = res.report()
    feeds, y, what = real_data(name, n)
    feeds = as_float32(feeds) if feeds is not None else None
    if feeds is None:
        feeds = res.evidence.inputs.draw(model, shapes or None, batch=64, seed=99)
    a, b = outputs(model, feeds), outputs(res.model, feeds)
    row = {
        "model": name,
        "inputs inferred": "; ".join(
            f"{s.kind}{', ' + s.convention if s.convention else ''}" for s in res.evidence.inputs.specs.values()
        ),
        "realism": rep["realism"]["score"] if rep.get("realism") else None,
        "MACs -%": rep["removed"]["macs_pct"],
        "synthetic cosine": res.verification.worst_cosine if res.verification else None,
        "real cosine": cosine(a, b),
        "real data": what,
        "verified": bool(res.verification),
        "written": written(res),
        "seconds": seconds,
    }
    if y is not None:
        row["top-1 before"] = 100 * float(np.mean(a.argmax(1) == y))
        row["top-1 after"] = 100 * float(np.mean(b.argmax(1) == y))
        row["agreement"] = 100 * float(np.mean(a.argmax(1) == b.argmax(1)))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="comma-separated names")
    ap.add_argument("--images", type=int, default=1017)
    ap.add_argument("--target", default="ort-cpu", help="prune's --target (macs: channels at any count)")
    args = ap.parse_args()
    wanted = set(args.models.split(",")) if args.models else None
    rows = []
    for name, model, shapes in models():
        if wanted and name not in wanted:
            continue
        rows.append(measure(name, model, shapes, args.images, args.target))
        print(f"{name}: done in {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    for r in rows:
        for k in ("synthetic cosine", "real cosine"):
            r[k] = f"{r[k]:.5f}" if isinstance(r.get(k), float) else r.get(k)
        r["realism"] = f"{r['realism']:.3f}" if r.get("realism") is not None else "unknown"
    cols = ["model", "inputs inferred", "realism", "MACs -%", "synthetic cosine", "real cosine", "top-1 before",
            "top-1 after", "agreement", "real data", "verified", "written"]  # fmt: skip
    print(f"\nwritten {write_json('fidelity' if args.target == 'ort-cpu' else f'fidelity-{args.target}', rows)}")
    print(table(rows, cols))


if __name__ == "__main__":
    main()
