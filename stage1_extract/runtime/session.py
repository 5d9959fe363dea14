"""ONNX Runtime session for a feature extractor: provider choice and tuning, threads, IO binding, fixed shapes.

One code path for every provider. Inputs and outputs are bound once to preallocated buffers (on the GPU
under CUDA); on CUDA every batch has the same shape — the last one is padded — so cuDNN's algorithm
search runs once. :class:`CudaOptions` holds the CUDA provider's tuning, each option with the measurement
behind its default; ``provider="tensorrt"`` builds TensorRT engines once and caches them next to the ONNX
file (:func:`trt_engine_dir`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import importlib.util
import logging
import os

import numpy as np

from stage1_extract.model.onnx_graph import INPUT_NAME, OUTPUT_NAME
from stage1_extract.options import PROVIDERS
from stage1_extract.errors import OptionError, Stage1Error

log = logging.getLogger(__name__)
_ORT_NAME = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


TENSORRT_HINT = "pip install 'hybrid-transfer[tensorrt]' (the tensorrt-cu13 wheels from PyPI)"


class ProviderUnavailableError(Stage1Error, RuntimeError):
    """The requested execution provider cannot run on this machine."""


@dataclasses.dataclass(frozen=True)
class CudaOptions:
    """Tuning of ONNX Runtime's CUDA provider. Defaults from ResNet-50 fp16, batch 256, IO binding on an H200
    (``shared/reference/h200-ort-options.json``): ORT's own defaults 9,353 img/s, with NHWC 11,906.

    ``prefer_nhwc``: run convolutions in NHWC, the layout of tensor-core kernels (+27%; ORT's default is
    NCHW). ``conv_algo_search``: ``EXHAUSTIVE`` (ORT's default too) times every cuDNN algorithm once per
    shape — shapes are fixed here, so once per run, a few seconds; ``HEURISTIC``/``DEFAULT`` start faster.
    ``cuda_graph``: capture the whole run as one CUDA graph and replay it (12,122 img/s, +1.8%: within the
    spread of repeated runs, so off by default; it needs every node on the GPU, fixed shapes and one fixed
    input address, which costs a device-to-device copy per batch). ``max_workspace``: let cuDNN use as much
    scratch memory as its fastest algorithms want (ORT's default since 1.14). ``bench/stage1.py
    --sweep-cuda-options`` measures each on the GPU at hand.
    """

    prefer_nhwc: bool = True
    conv_algo_search: str = "EXHAUSTIVE"
    cuda_graph: bool = False
    max_workspace: bool = True

    def __post_init__(self) -> None:
        if self.conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            raise OptionError(f"conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT, not {self.conv_algo_search!r}")

    def provider_options(self, device_id: int = 0) -> dict[str, str]:
        """The option strings ONNX Runtime's CUDAExecutionProvider takes."""
        return {"device_id": str(device_id), "cudnn_conv_use_max_workspace": str(int(self.max_workspace)),
                "cudnn_conv_algo_search": self.conv_algo_search, "prefer_nhwc": str(int(self.prefer_nhwc)),
                "enable_cuda_graph": str(int(self.cuda_graph))}


def trt_engine_dir(onnx_path: str) -> str:
    """Where TensorRT engines for ``onnx_path`` live: beside the ONNX cache, keyed by the same file name
    (``…/onnx/resnet50-fp16-<key>.onnx`` → ``…/onnx/trt/resnet50-fp16-<key>/``), so a new export gets
    new engines; ONNX Runtime adds the GPU, TensorRT version and shapes to the engine files' names."""
    folder, name = os.path.split(os.path.abspath(onnx_path))
    return os.path.join(folder, "trt", os.path.splitext(name)[0])


def tensorrt_provider_options(onnx_path: str, *, device_id: int, batch_size: int, input_size: int,
                              fp16: bool, cache_dir: str | None = None) -> dict[str, str]:
    """TensorRT provider options: engine and timing caches on disk, one profile for the fixed batch shape."""
    cache = cache_dir or trt_engine_dir(onnx_path)
    shape = f"{INPUT_NAME}:{batch_size}x{input_size}x{input_size}x3"
    return {"device_id": str(device_id), "trt_fp16_enable": str(fp16), "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache, "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
            "trt_profile_min_shapes": shape, "trt_profile_opt_shapes": shape, "trt_profile_max_shapes": shape}


def load_tensorrt_libraries() -> None:
    """Load TensorRT's libraries (from the ``tensorrt-cu13`` wheels, else the system) so ONNX Runtime's
    TensorRT provider finds them; a :class:`ProviderUnavailableError` naming the extra when they are missing.

    Checked before the session is made: without the libraries ONNX Runtime only logs an error and runs on
    CUDA, which would pass for TensorRT."""
    folders = []
    for pkg in ("tensorrt_libs", "tensorrt"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            folders += list(spec.submodule_search_locations)
    found = sorted({f for d in folders for f in glob.glob(os.path.join(d, "libnvinfer*.so*"))
                    + glob.glob(os.path.join(d, "libnvonnxparser*.so*"))})
    # nvinfer first: the plugin and parser libraries link against it
    found.sort(key=lambda f: (not os.path.basename(f).startswith("libnvinfer.so"), f))
    loaded = []
    for lib in found:
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            loaded.append(lib)
        except OSError as exc:
            log.debug("could not load %s: %s", lib, exc)
    if loaded:
        return
    import ctypes.util

    if ctypes.util.find_library("nvinfer"):
        return
    raise ProviderUnavailableError(
        f"--provider tensorrt needs the TensorRT libraries (libnvinfer), which are not installed: {TENSORRT_HINT}; "
        "or use --provider cuda"
    )


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
        cuda: CudaOptions | None = None,
        precision: str = "fp32",
    ) -> None:
        """``precision``: the ONNX model's (``ExtractorModel.precision``); TensorRT builds fp16 engines only
        for fp16 models, so an fp32 model's features keep fp32 accuracy. ``trt_cache``: TensorRT engine
        folder (default :func:`trt_engine_dir`)."""
        if provider not in PROVIDERS:
            raise OptionError(f"provider must be one of {PROVIDERS}, not {provider!r}")
        ort = _import_ort()
        self._ort = ort
        self.batch_size = batch_size
        self.input_size = input_size
        self.device_id = device_id
        self.cuda_options = cuda or CudaOptions()
        available = ort.get_available_providers()
        wanted = self._candidates(provider, available)
        if any(p != "CPUExecutionProvider" for p in wanted):
            _preload_cuda(ort)
        if "TensorrtExecutionProvider" in wanted:
            load_tensorrt_libraries()
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
                # Under TensorRT, CUDA runs only the nodes TensorRT declines: a graph capture would be refused.
                cuda_opts = self.cuda_options if provider != "tensorrt" else dataclasses.replace(
                    self.cuda_options, cuda_graph=False)
                provider_list.append((name, cuda_opts.provider_options(device_id)))
            elif name == "TensorrtExecutionProvider":
                opts_trt = tensorrt_provider_options(onnx_path, device_id=device_id, batch_size=batch_size,
                                                     input_size=input_size, fp16=precision == "fp16",
                                                     cache_dir=trt_cache)
                os.makedirs(opts_trt["trt_engine_cache_path"], exist_ok=True)
                provider_list.append((name, opts_trt))
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
        if provider == "tensorrt" and self.provider != "tensorrt":
            raise ProviderUnavailableError(
                f"--provider tensorrt was requested but ONNX Runtime could not start TensorRT (active: {active}): "
                "the TensorRT libraries found do not match this onnxruntime-gpu (1.31 needs TensorRT 10, "
                f"libnvinfer.so.10); {TENSORRT_HINT}, "
                "or use --provider cuda"
            )
        self.on_gpu = self.provider != "cpu"
        self.fixed_shape = self.on_gpu
        # a CUDA graph replays the captured addresses: only the fixed, preallocated buffers may be bound
        self.cuda_graph = self.provider == "cuda" and self.cuda_options.cuda_graph
        out_type = self.session.get_outputs()[0].type
        self.output_dtype = np.float16 if out_type == "tensor(float16)" else np.float32
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
        self._input = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.uint8, device, self.device_id)
        self._device = device
        self._output = None

    def _fixed_output(self):
        """The preallocated output: every fixed-shape run writes to the same address (a CUDA graph needs it)."""
        if self._output is None:
            self._output = self._ort.OrtValue.ortvalue_from_shape_and_type(
                (self.batch_size, self.output_dim), self.output_dtype, self._device, self.device_id)
        return self._output

    def run(self, batch: np.ndarray, n: int | None = None) -> np.ndarray:
        """Features for the first ``n`` images of ``batch`` (uint8, B×S×S×3, B ≤ batch_size)."""
        n = len(batch) if n is None else n
        if n == 0:
            return np.zeros((0, self.output_dim), np.float32)
        if not isinstance(batch, np.ndarray):  # a torch tensor from the GPU decoder
            if self.on_gpu and not self.cuda_graph and batch.is_cuda and self._bind_device_tensor(batch, n):
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
            self._io.bind_ortvalue_output(OUTPUT_NAME, self._fixed_output())
        else:
            self._io.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(batch[:n]))
            self._io.bind_output(OUTPUT_NAME, self._device, self.device_id)
        self.session.run_with_iobinding(self._io)
        out = self._io.copy_outputs_to_cpu()[0]
        return out[:n].astype(np.float32, copy=False)

    def bind_device(self, input_ptr: int, output_ptr: int):
        """An IO binding of device memory (``batch_size`` rows in, ``batch_size`` × ``output_dim`` out) for
        :meth:`run_binding`; made once per buffer, so a run costs no binding work (see ``inference.py``)."""
        if not self.on_gpu:
            raise RuntimeError("bind_device needs a GPU session")
        io = self.session.io_binding()
        size = self.input_size
        io.bind_input(INPUT_NAME, "cuda", self.device_id, np.uint8, [self.batch_size, size, size, 3], input_ptr)
        io.bind_output(OUTPUT_NAME, "cuda", self.device_id, self.output_dtype, [self.batch_size, self.output_dim],
                       output_ptr)
        return io

    def fixed_buffers(self) -> tuple[int, int]:
        """Device addresses of the preallocated input and output that :meth:`run` uses. Under a CUDA graph
        every run must use these: the graph replays the addresses it captured, whatever is bound."""
        return self._input.data_ptr(), self._fixed_output().data_ptr()

    def run_binding(self, io) -> None:
        """Run on the buffers bound by :meth:`bind_device`; returns when the outputs are written."""
        self.session.run_with_iobinding(io)

    def _bind_device_tensor(self, tensor, n: int) -> bool:
        """Bind a CUDA tensor's memory as the input, without a copy (fixed shape: the tensor must be a view
        into a buffer of ``batch_size`` rows, as the GPU decoder's is). False when that cannot be done."""
        rows = self.batch_size if self.fixed_shape else n
        shape = [rows, self.input_size, self.input_size, 3]
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() - tensor.storage_offset() < int(np.prod(shape)):
            return False
        import torch

        torch.cuda.current_stream(tensor.device).synchronize()  # ONNX Runtime reads it on a stream of its own
        self._io.bind_input(INPUT_NAME, "cuda", tensor.device.index or 0, np.uint8, shape, tensor.data_ptr())
        self._io.bind_output(OUTPUT_NAME, self._device, self.device_id)
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
