"""ONNX Runtime session for a feature extractor: provider choice, threads, IO binding, fixed batch shapes.

One code path for every provider. Inputs and outputs are bound once to preallocated buffers (on the GPU
under CUDA); on CUDA every batch has the same shape — the last one is padded — so cuDNN's algorithm
search runs once.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from stage1_extract.onnx_graph import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_ORT_NAME = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class ProviderUnavailableError(RuntimeError):
    """The requested execution provider cannot run on this machine."""


def _import_ort():
    """Import onnxruntime with CUDA libraries findable: torch's wheel ships them, so load those first."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ProviderUnavailableError(f"onnxruntime is not installed: {exc}; pip install onnxruntime-gpu") from None
    return ort


def _preload_cuda(ort) -> None:
    try:
        import torch  # noqa: F401  (its wheel puts the CUDA/cuDNN libraries where ORT finds them)
    except ImportError:
        pass
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # pragma: no cover - depends on the GPU machine
            log.debug("onnxruntime.preload_dlls failed: %s", exc)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


class FeatureSession:
    """Runs uint8 NHWC batches through an extractor ONNX model and returns float32 features."""

    def __init__(
        self,
        onnx_path: str,
        *,
        provider: str = "auto",
        batch_size: int = 32,
        input_size: int,
        threads: int | None = None,
        device_id: int = 0,
        trt_cache: str | None = None,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")
        ort = _import_ort()
        self._ort = ort
        self.batch_size = batch_size
        self.input_size = input_size
        available = ort.get_available_providers()
        wanted = self._candidates(provider, available)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or _cpu_count()
        opts.inter_op_num_threads = 1
        if wanted == ["CPUExecutionProvider"]:
            # Idle intra-op threads sleep instead of spinning: on the CPU the decode workers need those cycles.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # onnxruntime-gpu logs an error when CUDA is missing; we check ourselves
        provider_list = []
        for name in wanted:
            if name == "CUDAExecutionProvider":
                provider_list.append((name, {"device_id": device_id, "cudnn_conv_use_max_workspace": "1",
                                             "cudnn_conv_algo_search": "EXHAUSTIVE"}))
            elif name == "TensorrtExecutionProvider":
                cache = trt_cache or os.path.join(os.path.dirname(onnx_path), "trt-engines")
                provider_list.append((name, {"device_id": device_id, "trt_fp16_enable": True,
                                             "trt_engine_cache_enable": True, "trt_engine_cache_path": cache}))
            else:
                provider_list.append(name)
        gpu_wanted = any(p != "CPUExecutionProvider" for p in wanted)
        if gpu_wanted:
            _preload_cuda(ort)
            # Loading a GPU provider that cannot run logs coloured lines through ORT's global logger (the
            # session's level does not reach it); our own message below says what is wrong and what to do.
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(onnx_path, sess_options=opts, providers=provider_list)
        finally:
            if gpu_wanted:
                ort.set_default_logger_severity(2)
        active = self.session.get_providers()
        self.provider = "cuda" if active[0] == "CUDAExecutionProvider" else (
            "tensorrt" if active[0] == "TensorrtExecutionProvider" else "cpu")
        if provider in ("cuda", "tensorrt") and self.provider == "cpu":
            raise ProviderUnavailableError(
                f"--provider {provider} was requested but onnxruntime fell back to the CPU (active: {active}). "
                "Check that a GPU is visible (nvidia-smi) and that onnxruntime-gpu and the CUDA libraries "
                "(installed with torch's CUDA wheel) match; or use --provider cpu."
                + ("" if _gpu_visible() else " No NVIDIA GPU is visible here (the CUDA driver does not load).")
            )
        self.on_gpu = self.provider != "cpu"
        self.fixed_shape = self.on_gpu
        self._bind()

    @staticmethod
    def _candidates(provider: str, available: list[str]) -> list[str]:
        if provider == "cpu":
            return ["CPUExecutionProvider"]
        if provider in ("cuda", "tensorrt"):
            name = _ORT_NAME[provider]
            if name not in available:
                raise ProviderUnavailableError(
                    f"--provider {provider}: this onnxruntime offers only {available}; install onnxruntime-gpu"
                )
            chain = [name] + (["CUDAExecutionProvider"] if provider == "tensorrt" else [])
            return chain + ["CPUExecutionProvider"]
        # auto: CUDA when onnxruntime offers it and a GPU answers (checked after creation), else CPU
        if "CUDAExecutionProvider" in available and _gpu_visible():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _bind(self) -> None:
        ort = self._ort
        device = "cuda" if self.on_gpu else "cpu"
        shape = (self.batch_size, self.input_size, self.input_size, 3)
        self._io = self.session.io_binding()
        self._input = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.uint8, device, 0)
        self._device = device

    def run(self, batch: np.ndarray, n: int | None = None) -> np.ndarray:
        """Features for the first ``n`` images of ``batch`` (uint8, B×S×S×3, B ≤ batch_size)."""
        n = len(batch) if n is None else n
        if n == 0:
            return np.zeros((0, self.output_dim), np.float32)
        if not isinstance(batch, np.ndarray):  # a torch tensor from the GPU decoder
            if self.on_gpu and batch.is_cuda and self._bind_device_tensor(batch, n):
                self.session.run_with_iobinding(self._io)
                return self._io.copy_outputs_to_cpu()[0][:n]
            batch = batch.cpu().numpy()
        if self.fixed_shape:
            if len(batch) != self.batch_size:
                padded = np.zeros((self.batch_size,) + batch.shape[1:], np.uint8)
                padded[: len(batch)] = batch
                batch = padded
            self._input.update_inplace(np.ascontiguousarray(batch))
            self._io.bind_ortvalue_input(INPUT_NAME, self._input)
        else:
            self._io.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(batch[:n]))
        self._io.bind_output(OUTPUT_NAME, self._device, 0)
        self.session.run_with_iobinding(self._io)
        out = self._io.copy_outputs_to_cpu()[0]
        return out[:n]

    def _bind_device_tensor(self, tensor, n: int) -> bool:
        """Bind a CUDA tensor's memory as the input, without a copy (fixed shape: the tensor must be a view
        into a buffer of ``batch_size`` rows, as the GPU decoder's is). False when that cannot be done."""
        rows = self.batch_size if self.fixed_shape else n
        shape = [rows, self.input_size, self.input_size, 3]
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() - tensor.storage_offset() < int(np.prod(shape)):
            return False
        self._io.bind_input(INPUT_NAME, "cuda", tensor.device.index or 0, np.uint8, shape, tensor.data_ptr())
        self._io.bind_output(OUTPUT_NAME, self._device, 0)
        return True

    @property
    def output_dim(self) -> int:
        shape = self.session.get_outputs()[0].shape
        return shape[1] if isinstance(shape[1], int) else 0


def wants_gpu(provider: str) -> bool:
    """Whether ``provider`` will run on a GPU here (before any session is made)."""
    if provider in ("cuda", "tensorrt"):
        return True
    if provider != "auto":
        return False
    return "CUDAExecutionProvider" in _import_ort().get_available_providers() and _gpu_visible()


def _gpu_visible() -> bool:
    """Whether an NVIDIA GPU is usable, without importing torch when it is not installed."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    except OSError:
        return False
