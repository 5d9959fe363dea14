"""Inference overlapped with decoding and writing: the GPU never waits for the loop that feeds it.

Without overlap a GPU run is serial: wait for a decoded batch, copy it from pageable memory to the GPU, run,
hand the features on — and the GPU idles through the waits (on an H200, inference took 3.0 s of a 5.2 s
loop, see ``shared/reference``). Here :meth:`OverlappedInference.submit` copies a batch into a page-locked
staging slot and starts its host-to-device copy on a CUDA stream of its own, then returns; an inference
thread runs each batch from a device slot bound once with IO binding. So while batch k runs, batch k+1 is
being copied and batch k+2 decoded, and the caller writes the features of batch k-1.

Batches that are already on the GPU (the GPU decoder's) are copied device to device into the slot.
On the CPU provider the same class runs each batch synchronously in :meth:`submit`: there ONNX Runtime
already uses every core, and a second thread would only take cycles from the decode workers.

    with OverlappedInference(session) as infer:
        for batch in source:
            infer.submit(batch.pixels, n, tag)
            for tag, features in infer.ready(): ...
        for tag, features in infer.drain(): ...
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator

import numpy as np

#: batches in flight on the GPU side (one running, one copied and waiting): enough to hide a copy behind a run
DEFAULT_DEPTH = 2


class OverlappedInference:
    """Runs uint8 NHWC batches through a :class:`~stage1_extract.runtime.session.FeatureSession`, in order."""

    def __init__(self, session, *, depth: int = DEFAULT_DEPTH, threaded: bool | None = None) -> None:
        """``threaded``: run batches on the inference thread (default: on a GPU session when torch sees CUDA).
        Forced on for a CPU session, the thread runs from host slots: the same queues, order and failure
        handling without a GPU (how the tests check them)."""
        self.session = session
        self.depth = max(1, depth)
        self.infer_seconds = 0.0  # time inside ONNX Runtime (on the inference thread when overlapped)
        self.submit_seconds = 0.0  # time the caller spent in submit(): staging copy, waiting for a free slot
        self._done: queue.Queue = queue.Queue()
        self._pending = 0
        self._error: BaseException | None = None
        self._failed = False
        on_device = session.on_gpu and _torch_cuda() is not None
        self.overlapped = on_device if threaded is None else threaded
        if self.overlapped and on_device:
            self._start_gpu()
        elif self.overlapped:
            shape = (session.batch_size, session.input_size, session.input_size, 3)
            self._slots = [np.zeros(shape, np.uint8) for _ in range(self.depth + 1)]
            self._start_thread()

    # ------------------------------------------------------------------------------------------ GPU side

    def _start_gpu(self) -> None:
        torch = _torch_cuda()
        s = self.session
        self._torch = torch
        self._device = torch.device("cuda", s.device_id)
        shape = (s.batch_size, s.input_size, s.input_size, 3)
        with torch.cuda.device(self._device):
            self._copy_stream = torch.cuda.Stream(self._device)
            n = self.depth + 1  # one more slot than batches in flight: the next copy never waits for a run
            self._staging = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(n)]
            self._slots = [torch.zeros(shape, dtype=torch.uint8, device=self._device) for _ in range(n)]
            out_dtype = torch.float16 if s.output_dtype == np.float16 else torch.float32
            self._outputs = [torch.empty((s.batch_size, s.output_dim), dtype=out_dtype, device=self._device)
                             for _ in range(n)]
        if s.cuda_graph:
            # A CUDA graph replays the addresses it captured: every run uses the session's own fixed buffers
            # (the ones FeatureSession.run uses too), and each slot is copied into that input before its run.
            in_ptr, out_ptr = s.fixed_buffers()
            self._graph_input = _device_view(torch, in_ptr, shape, "|u1", self._device)
            out = _device_view(torch, out_ptr, (s.batch_size, s.output_dim),
                               "<f2" if s.output_dtype == np.float16 else "<f4", self._device)
            self._bindings = [s.bind_device(in_ptr, out_ptr)] * n
            self._outputs = [out] * n
        else:
            self._graph_input = None
            self._bindings = [s.bind_device(slot.data_ptr(), out.data_ptr())
                              for slot, out in zip(self._slots, self._outputs)]
        self._start_thread()

    def _start_thread(self) -> None:
        self._free: queue.Queue = queue.Queue()
        for i in range(len(self._slots)):
            self._free.put(i)
        self._work: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    def _stage(self, slot: int, pixels, n: int):
        """Start copying the first ``n`` images of ``pixels`` into device slot ``slot``; returns its event
        (None for host slots, whose copy is done on return)."""
        if isinstance(self._slots[slot], np.ndarray):
            self._slots[slot][:n] = pixels[:n] if isinstance(pixels, np.ndarray) else pixels[:n].cpu().numpy()
            return None
        torch = self._torch
        dst = self._slots[slot][:n]
        if isinstance(pixels, np.ndarray):
            host = self._staging[slot][:n]
            host.numpy()[...] = pixels[:n]  # pageable → page-locked (numpy releases the GIL for the copy)
            src = host
        else:
            src = pixels[:n]
            if src.is_cuda:  # the GPU decoder's batch: whatever it launched must finish before we read it
                self._copy_stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self._copy_stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        if not isinstance(pixels, np.ndarray) and src.is_cuda:  # the decoder may overwrite its buffer after the copy
            torch.cuda.current_stream(src.device).wait_event(event)
        return event

    def _loop(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            slot, n, tag, event = job
            try:
                if not self._failed:  # after a failure the rest is only drained: the caller is stopping
                    if event is not None:
                        event.synchronize()
                    t0 = time.perf_counter()
                    features = self._run_slot(slot, n)
                    self.infer_seconds += time.perf_counter() - t0
                    self._done.put((tag, features))
            except BaseException as exc:  # surfaced to the caller at its next submit()/ready()/drain()
                self._error, self._failed = exc, True
            finally:
                self._free.put(slot)
                if self._failed:
                    self._done.put(None)

    def _run_slot(self, slot: int, n: int) -> np.ndarray:
        if isinstance(self._slots[slot], np.ndarray):
            return self.session.run(self._slots[slot], n)
        if self._graph_input is not None:
            self._graph_input[:n].copy_(self._slots[slot][:n])
            self._torch.cuda.current_stream(self._device).synchronize()
        self.session.run_binding(self._bindings[slot])
        return self._outputs[slot][:n].float().cpu().numpy()

    # --------------------------------------------------------------------------------------- public API

    def submit(self, pixels, n: int, tag: Any) -> None:
        """Queue the first ``n`` images of ``pixels`` (numpy or torch, uint8 NHWC, ``n`` ≤ batch size).

        ``pixels`` may be reused by the caller as soon as this returns (its content has been staged)."""
        self._raise_if_failed()
        if n == 0:
            return
        t0 = time.perf_counter()
        if not self.overlapped:
            if not isinstance(pixels, np.ndarray):
                pixels = pixels.cpu().numpy()
            t1 = time.perf_counter()
            self._done.put((tag, self.session.run(pixels, n)))
            self.infer_seconds += time.perf_counter() - t1
        else:
            slot = self._free.get()
            self._raise_if_failed()
            event = self._stage(slot, pixels, n)
            self._work.put((slot, n, tag, event))
        self._pending += 1
        self.submit_seconds += time.perf_counter() - t0

    def ready(self) -> Iterator[tuple[Any, np.ndarray]]:
        """``(tag, features)`` of the batches finished so far, in submission order, without waiting."""
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return
            yield self._take(item)

    def drain(self) -> Iterator[tuple[Any, np.ndarray]]:
        """``(tag, features)`` of every batch still in flight, waiting for each."""
        while self._pending:
            yield self._take(self._done.get())

    def _take(self, item):
        if item is None:
            self._raise_if_failed()
        self._pending -= 1
        return item

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def close(self) -> None:
        if self.overlapped and self._thread.is_alive():
            self._work.put(None)
            self._thread.join()

    def __enter__(self) -> "OverlappedInference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _torch_cuda():
    """torch when it can drive a CUDA device here, else None (the CPU path needs no torch at all)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _device_view(torch, ptr: int, shape: tuple, typestr: str, device):
    """A torch tensor over device memory that ONNX Runtime owns (CUDA array interface, no copy)."""

    class _Memory:
        __cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                    "version": 3, "strides": None}

    return torch.as_tensor(_Memory(), device=device)
