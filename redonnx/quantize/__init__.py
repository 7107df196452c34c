"""INT8 quantization as a planned, verified, speed-gated stage after pruning.

- :mod:`redonnx.quantize.cpu`: which int8 kernels this CPU runs (AVX2, AVX-512 VNNI, AMX) and the
  weight range that follows;
- :mod:`redonnx.quantize.calibration`: activation ranges without data (the input model's draws,
  BatchNorm-corrected) or from ``--calibration``, computed by onnxruntime's calibrators;
- :mod:`redonnx.quantize.quantizer`: onnxruntime's own quantizers (static QDQ, dynamic), driven
  with layers kept in float;
- :mod:`redonnx.quantize.memo`: their per-channel weight quantization memoized across the trials;
- :mod:`redonnx.quantize.cut`: layers' INT8 form cut from one build into the float model (the trials);
- :mod:`redonnx.quantize.resumed`: each layer scored alone by resuming the float model's run;
- :mod:`redonnx.quantize.timing`: the cost model's int8 column (layers timed alone in INT8);
- :mod:`redonnx.quantize.stage`: the search (calibration method, sensitive layers kept float);
- :mod:`redonnx.planner.precision` composes it with pruning and gates it on measured speed.
"""

from redonnx.quantize.quantizer import Scheme
from redonnx.quantize.stage import LayerChoice, QuantResult, StageInputs, run_stage

__all__ = ["LayerChoice", "QuantResult", "Scheme", "StageInputs", "run_stage"]
