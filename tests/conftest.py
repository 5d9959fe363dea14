"""Test-wide settings: offline, CPU-only, Keras on torch, a private ONNX cache shared by the session."""

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CI has no GPU; keep a developer's GPU out of the tests too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One ONNX export cache for the whole test session (subprocesses inherit it), so the default backbone is
# exported — and verified — once per run, in a fresh directory rather than the user's cache.
os.environ.setdefault("HYBRID_TRANSFER_CACHE", tempfile.mkdtemp(prefix="ht-test-cache-"))
