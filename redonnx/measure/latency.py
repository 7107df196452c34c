"""Latency, measured: paired interleaved timings with their spread, and a per-layer cost model.

Everything is timed as a deployment would run it on this machine: onnxruntime CPU, graph
optimizations on, batch 1, one intra-op thread (one thread keeps layer costs additive and the
noise low on shared machines).

- :func:`compare` times models in turn, round after round (each round starting with the next
  model: a model run right after an identical one runs faster, so a fixed order biases ratios by
  a few per cent), so that they share the machine's noise, and summarizes each against another
  by the median of the per-round ratios, its p10-p90 spread and a bootstrap 90 % interval of
  that median. It runs until the interval is tight or its time is up.
- :class:`CostModel` times single layers (a Conv, Gemm or MatMul and the activation after it) at
  the channel counts a planner considers, and measures once per machine how onnxruntime blocks
  channels (8 with AVX2, 16 with AVX-512): counts that are not a multiple of the block can run
  slower than the next multiple up (a depthwise conv of 62 channels 2.3x slower than 64 here).
  Measurements are cached on disk per CPU and onnxruntime version (``REDONNX_CACHE``, default
  ``~/.cache/redonnx``; ``off`` disables), so a decision taken once is taken again the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from redonnx.measure.runtime import session

CACHE_VERSION = 1


# ------------------------------------------------------------------ timing whole models


@dataclass
class Timing:
    """One model's latency against the first model of a comparison."""

    median_ms: float
    ratio: float  # median over runs of (this model's time / the first model's time in the same round)
    ratio_p10: float
    ratio_p90: float
    ratio_low: float  # bootstrap 90 % interval of the median ratio
    ratio_high: float

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio if self.ratio > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        d = {k: round(v, 5) for k, v in asdict(self).items()}
        d["speedup"] = round(self.speedup, 4)
        return d

    def describe(self) -> str:
        return (f"{self.speedup:.2f}x (latency ratio {self.ratio:.3f}, 90 % interval {self.ratio_low:.3f}-"
                f"{self.ratio_high:.3f}, runs p10-p90 {self.ratio_p10:.3f}-{self.ratio_p90:.3f})")  # fmt: skip


@dataclass
class Comparison:
    """Interleaved run times (seconds) of several models, round by round."""

    times: list[list[float]]
    seconds: float
    config: str = "onnxruntime CPU, 1 thread, batch 1, graph optimizations on"

    @property
    def rounds(self) -> int:
        return len(self.times[0])

    def against(self, i: int, base: int) -> Timing:
        """Model ``i`` against model ``base``: ratios of their times within each round."""
        ts, r = np.array(self.times[i]), np.array(self.times[i]) / np.array(self.times[base])
        low, high = _median_ci(r, np.random.default_rng(0))
        return Timing(float(np.median(ts)) * 1e3, float(np.median(r)), float(np.quantile(r, 0.1)),
                      float(np.quantile(r, 0.9)), low, high)  # fmt: skip


def timing_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return session(model, optimize=True, threads=1, spin=True)


def _median_ci(ratios: np.ndarray, rng: np.random.Generator, draws: int = 400) -> tuple[float, float]:
    idx = rng.integers(0, len(ratios), size=(draws, len(ratios)))
    meds = np.median(ratios[idx], axis=1)
    return float(np.quantile(meds, 0.05)), float(np.quantile(meds, 0.95))


def compare(
    models: list[onnx.ModelProto],
    feeds: dict[str, np.ndarray],
    precision: float = 0.01,
    min_rounds: int = 30,
    max_rounds: int = 1000,
    max_seconds: float = 10.0,
    warmup: int = 5,
    decide: Sequence[tuple[int, int, float]] = (),
) -> Comparison:
    """Interleaved timings of ``models`` on ``feeds``. Rounds continue (in growing chunks) until
    every model's ratio to the first has a 90 % interval within ``precision`` of its median, or
    ``max_rounds`` / ``max_seconds`` are reached; with ``decide`` ((model, base, threshold): the
    decision the timings are for accepts when every such ratio is under its threshold), also as
    soon as that is settled: every interval under its threshold, or one above it. More rounds would
    narrow an interval that already decides (a probe at 1.065x against a 0.97 threshold needs no
    1 % precision). The looks come after 30, 60, 120... rounds; a decision on models whose round
    takes over :data:`FIRST_LOOK_SECONDS` / 30 is first looked at sooner (:func:`_first_look`)."""
    sessions = [timing_session(m) for m in models]
    t0 = time.perf_counter()
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    per_round = (time.perf_counter() - t0) / max(warmup, 1)
    times: list[list[float]] = [[] for _ in sessions]
    t0 = time.perf_counter()
    chunk = _first_look(min_rounds, per_round) if decide else min_rounds
    while True:
        _rounds([(s, feeds) for s in sessions], times, chunk)
        result = Comparison(times, time.perf_counter() - t0)
        spans = [result.against(i, 0) for i in range(1, len(models))]
        tight = all(t.ratio_high - t.ratio_low <= 2 * precision * t.ratio for t in spans)
        sides = [(t.ratio_high < x, t.ratio_low > x) for t, x in ((result.against(i, j), x) for i, j, x in decide)]
        decided = bool(sides) and (all(under for under, _ in sides) or any(over for _, over in sides))
        if tight or decided or result.rounds >= max_rounds or result.seconds > max_seconds:
            return result
        chunk = min(result.rounds, max_rounds - result.rounds)


#: a decision on slow models is first looked at once about this many seconds of rounds have run
#: (at least :data:`FIRST_LOOK_ROUNDS`) rather than after ``min_rounds``: 30 rounds of three
#: 57 ms models (the super-resolution net at 224 x 224) took 5 s a comparison, 7 comparisons a
#: first run, where the first dozen already settled a 0.73x against its 0.97 threshold
FIRST_LOOK_SECONDS = 2.0
FIRST_LOOK_ROUNDS = 10


def _first_look(min_rounds: int, per_round: float) -> int:
    """Rounds before a decision is first looked at: ``min_rounds``, fewer where a round is slow."""
    fit = int(FIRST_LOOK_SECONDS / per_round) if per_round > 0 else min_rounds
    return max(FIRST_LOOK_ROUNDS, min(min_rounds, fit))


def _rounds(runs: list[tuple[ort.InferenceSession, dict[str, np.ndarray]]], times: list[list[float]],
            count: int) -> None:  # fmt: skip
    """``count`` more interleaved rounds, one run of each model, its seconds appended to ``times``;
    each round starts with another model: no model always runs after the same one."""
    n = len(runs)
    for _ in range(count):
        start = len(times[0]) % n
        for i in [(start + k) % n for k in range(n)]:
            sess, feeds = runs[i]
            a = time.perf_counter()
            sess.run(None, feeds)
            times[i].append(time.perf_counter() - a)


# ------------------------------------------------------------------ the disk cache


def machine_key() -> str:
    """CPU model and flags that decide kernel choice, and the onnxruntime version."""
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile", "fma") if f in have)
                break
    except OSError:
        pass
    return f"{cpu}|{flags}|ort {ort.__version__}"


class Cache:
    """Measurements kept on disk per machine key; ``REDONNX_CACHE=off`` keeps them in memory only."""

    def __init__(self, folder: str | Path | None = None) -> None:
        where = folder if folder is not None else os.environ.get("REDONNX_CACHE", "")
        self.path: Path | None = None
        if where != "off":
            base = Path(where) if where else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "redonnx"
            digest = hashlib.sha1(machine_key().encode()).hexdigest()[:12]
            self.path = base / f"latency-v{CACHE_VERSION}-{digest}.json"
        self.data: dict[str, Any] = {}
        self._texts: dict[str, str] = {}
        self._dirty = False
        if self.path is not None and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.data = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def get_text(self, key: str) -> str | None:
        """A text kept under ``key`` (a hex digest) in a file of its own beside the measurements:
        larger values (calibration ranges) that most runs do not read."""
        if self.path is None:
            return self._texts.get(key)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return (self._texts_folder() / f"{key}.json").read_text()
        return None

    def put_text(self, key: str, text: str) -> None:
        """Keep ``text`` under ``key``, written atomically (in memory where files cannot be written)."""
        if self.path is None:
            self._texts[key] = text
            return
        try:
            folder = self._texts_folder()
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".text-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, folder / f"{key}.json")
        except OSError:
            self._texts[key] = text

    def _texts_folder(self) -> Path:
        assert self.path is not None
        return self.path.with_suffix("")

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = dict(self.data)
            if self.path.exists():  # another process may have added entries meanwhile
                with contextlib.suppress(OSError, ValueError):
                    merged = {**json.loads(self.path.read_text()), **self.data}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:  # a read-only home: measurements stay in memory
            self.path = None


# ------------------------------------------------------------------ single layers


@dataclass(frozen=True)
class LayerShape:
    """Everything that decides one layer's latency: op, channels, kernel, input positions."""

    op: str  # Conv | ConvTranspose | Gemm | MatMul
    cin: int
    cout: int
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    spatial: tuple[int, ...] = ()  # conv input spatial dims; Gemm/MatMul: leading dims of the input
    activation: str = ""

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def depthwise(self) -> bool:
        return self.group > 1 and self.group == self.cin == self.cout

    def with_channels(self, cin: int | None = None, cout: int | None = None) -> LayerShape:
        """The same layer with other channel counts (a depthwise conv keeps in = out = groups)."""
        cin = self.cin if cin is None else cin
        cout = self.cout if cout is None else cout
        if self.depthwise:
            c = cin if cin != self.cin else cout
            return replace(self, cin=c, cout=c, group=c)
        return replace(self, cin=cin, cout=cout)


def layer_model(shape: LayerShape) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model of one layer (and its activation) with random weights, and an input for it."""
    rng = np.random.default_rng(0)
    if shape.op in ("Conv", "ConvTranspose"):
        x_shape = [1, shape.cin, *shape.spatial]
        if shape.op == "Conv":
            w_shape = [shape.cout, shape.cin // shape.group, *shape.kernel]
        else:
            w_shape = [shape.cin, shape.cout // shape.group, *shape.kernel]
        attrs: dict[str, Any] = {"group": shape.group, "kernel_shape": list(shape.kernel)}
        if shape.strides:
            attrs["strides"] = list(shape.strides)
        if shape.pads:
            attrs["pads"] = list(shape.pads)
        if shape.dilations:
            attrs["dilations"] = list(shape.dilations)
        inits = [numpy_helper.from_array(_weights(rng, w_shape), "w"),
                 numpy_helper.from_array(rng.standard_normal(shape.cout).astype(np.float32), "b")]  # fmt: skip
        nodes = [helper.make_node(shape.op, ["x", "w", "b"], ["y"], **attrs)]
    else:
        x_shape = [*(shape.spatial or (1,)), shape.cin]
        inits = [numpy_helper.from_array(_weights(rng, [shape.cin, shape.cout]), "w"),
                 numpy_helper.from_array(rng.standard_normal(shape.cout).astype(np.float32), "b")]  # fmt: skip
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    out = "y"
    if shape.activation:
        nodes.append(helper.make_node(shape.activation, ["y"], ["z"]))
        out = "z"
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, {"x": rng.standard_normal(x_shape).astype(np.float32)}


def _weights(rng: np.random.Generator, shape: list[int]) -> np.ndarray:
    """Random float32 weights made in place (an exact prune may time a layer as large as the model's)."""
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= 0.1
    return w


def time_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], budget_s: float = 0.02, min_runs: int = 15,
               max_runs: int = 300) -> float:  # fmt: skip
    """Median milliseconds of ``model`` alone (time-boxed)."""
    sess = timing_session(model)
    for _ in range(3):
        sess.run(None, feeds)
    ts: list[float] = []
    t0 = time.perf_counter()
    while len(ts) < max_runs and (len(ts) < min_runs or time.perf_counter() - t0 < budget_s):
        a = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - a)
    return statistics.median(ts) * 1e3


Built = tuple[onnx.ModelProto, dict[str, np.ndarray]]


def time_pair(a: Built, b: Built, budget_s: float = 0.04, min_rounds: int = 15,
              max_rounds: int = 300) -> tuple[float, float, float]:  # fmt: skip
    """Two small models timed in one comparison: rounds of one run of each, the order alternating.
    Medians (ms) of ``a``, of ``b`` and of the per-round difference a - b: a loaded moment slows
    both runs of its round, so the difference keeps what ``b`` saves where two timings taken apart
    (each its own median) would carry the load of their own moments (time-boxed)."""
    runs = [(timing_session(m), feeds) for m, feeds in (a, b)]
    for sess, feeds in runs * 3:
        sess.run(None, feeds)
    ts: list[list[float]] = [[], []]
    t0 = time.perf_counter()
    while len(ts[0]) < max_rounds and (len(ts[0]) < min_rounds or time.perf_counter() - t0 < budget_s):
        _rounds(runs, ts, 1)
    diff = statistics.median(x - y for x, y in zip(*ts, strict=True))
    return statistics.median(ts[0]) * 1e3, statistics.median(ts[1]) * 1e3, diff * 1e3


Timer = Callable[[LayerShape], float]
PairTimer = Callable[[Built, Built], tuple[float, float, float]]


def measure_layer(shape: LayerShape) -> float:
    model, feeds = layer_model(shape)
    return time_model(model, feeds)


@dataclass
class CostModel:
    """Per-layer latencies (ms) measured on demand and cached; the channel block of the runtime."""

    cache: Cache = field(default_factory=Cache)
    timer: Timer = measure_layer
    model_timer: Callable[[onnx.ModelProto, dict[str, np.ndarray]], float] = time_model
    measured: int = 0  # layers timed in this process (not from the cache)
    #: activation shapes at the chosen input sizes, computed on first need (dynamic models: the
    #: graph's own shapes are symbolic, e.g. [batch, seq, 384])
    shape_source: Callable[[], dict[str, list]] | None = None
    #: two models timed in one comparison (:func:`time_pair`, what the pipeline uses); None: each
    #: timed alone by ``timer`` and ``model_timer`` (stand-in timers in tests)
    pair_timer: PairTimer | None = None
    _shapes: dict[str, list] | None = None

    def layer(self, node: gs.Node) -> LayerShape | None:
        """:func:`layer_shape` of ``node``, its input's size taken from the chosen sizes if symbolic."""
        shape = layer_shape(node)
        if shape is None and self.shape_source is not None:
            if self._shapes is None:
                self._shapes = self.shape_source()
            shape = layer_shape(node, self._shapes)
        return shape

    def ms(self, shape: LayerShape) -> float:
        key = "layer " + shape.key()
        hit = self.cache.get(key)
        if hit is None:
            hit = float(self.timer(shape))
            self.cache.put(key, hit)
            self.measured += 1
        return float(hit)

    def timed(self, key: str, build: Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray]]]) -> float:
        """Milliseconds of any small model (``build()`` makes it and its inputs), cached under ``key``."""
        hit = self.cache.get("model " + key)
        if hit is None:
            model, feeds = build()
            hit = self.model_timer(model, feeds)
            self.cache.put("model " + key, hit)
            self.measured += 1
        return float(hit)

    def pair(self, key: str, a: Callable[[], Built], b: Callable[[], Built]) -> tuple[float, float, float] | None:
        """(ms of ``a``, ms of ``b``, median per-round a - b), both timed in one comparison and cached
        under ``key``; None without a pair timer."""
        if self.pair_timer is None:
            return None
        hit = self.cache.get("pair " + key)
        if hit is None:
            hit = [float(v) for v in self.pair_timer(a(), b())]
            self.cache.put("pair " + key, hit)
            self.measured += 1
        return float(hit[0]), float(hit[1]), float(hit[2])

    def saved(self, shape: LayerShape, smaller: LayerShape) -> float:
        """Milliseconds ``smaller`` (the layer with fewer channels) runs faster than ``shape``: both
        timed in one comparison where there is a pair timer, else each alone."""
        got = self.pair(f"{shape.key()} -> {smaller.key()}", lambda: layer_model(shape), lambda: layer_model(smaller))
        return got[2] if got is not None else self.ms(shape) - self.ms(smaller)

    def block(self) -> int:
        """Channel block of onnxruntime's convolutions here: the smallest step below 64 channels
        that runs clearly faster (a 3x3 conv at 32x32), counts in between being no faster."""
        hit = self.cache.get("block")
        if hit is None:
            probe = LayerShape("Conv", 64, 64, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (32, 32), "Relu")
            full = self.ms(probe)
            hit = 16
            for step in (1, 2, 4, 8, 16):
                if self.saved(probe, probe.with_channels(cin=64 - step, cout=64 - step)) > 0.03 * full:
                    hit = step
                    break
            self.cache.put("block", hit)
        return int(hit)

    def save(self) -> None:
        self.cache.save()


FUSED = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh"}


def layer_shape(node: gs.Node, known: dict[str, list] | None = None) -> LayerShape | None:
    """The timing signature of a Conv/ConvTranspose/Gemm/MatMul with a constant weight and known
    input shape (batch 1), with the activation onnxruntime would fuse after it. ``known`` gives
    input shapes by tensor name where the graph's are symbolic."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    x = node.inputs[0] if node.inputs else None
    if not isinstance(w, gs.Constant) or x is None:
        return None
    dims = list(known[x.name]) if known and x.name in known else list(x.shape) if x.shape is not None else None
    if dims is None:
        return None
    if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return None
    readers = [n for o in node.outputs for n in o.outputs]
    act = readers[0].op if len(readers) == 1 and readers[0].op in FUSED else ""
    ws = [int(d) for d in w.shape]
    if node.op in ("Conv", "ConvTranspose") and len(dims) >= 3:
        g = int(node.attrs.get("group", 1))
        cin, cout = (ws[1] * g, ws[0]) if node.op == "Conv" else (ws[0], ws[1] * g)
        k = len(ws) - 2
        return LayerShape(node.op, cin, cout, g, tuple(ws[2:]), tuple(node.attrs.get("strides", [1] * k)),
                          tuple(node.attrs.get("pads", [0] * 2 * k)), tuple(node.attrs.get("dilations", [1] * k)),
                          tuple(int(d) for d in dims[2:]), act)  # fmt: skip
    if node.op == "Gemm" and len(ws) == 2:
        cin, cout = (ws[1], ws[0]) if node.attrs.get("transB", 0) else (ws[0], ws[1])
        return LayerShape("MatMul", cin, cout, spatial=(1,), activation=act)
    if node.op == "MatMul" and len(ws) == 2:
        return LayerShape("MatMul", ws[0], ws[1], spatial=tuple([1] + [int(d) for d in dims[1:-1]]), activation=act)
    return None
