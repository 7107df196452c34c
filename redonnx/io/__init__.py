"""Files in and out: loading and saving models safely, external data, lean models, the graph IR's helpers."""
