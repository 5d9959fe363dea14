"""Running the model: the ONNX Runtime session (``session``: providers, CUDA tuning, IO binding) and inference
overlapped with decoding and writing (``inference``)."""
