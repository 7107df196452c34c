"""Measurement: onnxruntime sessions, MACs, latency and its cost model, piecewise runs, verification."""
