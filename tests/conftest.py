"""Test-wide settings: offline, CPU-only, Keras on torch, a private ONNX cache shared by the session."""

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CI has no GPU; keep a developer's GPU out of the tests too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Torch's OpenMP workers spin while waiting; on a 2-core machine shared with decode workers that makes
# Keras training steps 5-50x slower. stage2_classify sets this too, but only if it is imported before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One ONNX export cache for the whole test session (subprocesses inherit it), so the default backbone is
# exported — and verified — once per run, in a fresh directory rather than the user's cache.
os.environ.setdefault("HYBRID_TRANSFER_CACHE", tempfile.mkdtemp(prefix="ht-test-cache-"))
