"""Thin cuda-python plumbing for the TensorRT engine and builder: no torch, numpy views on pinned memory.

The shape of TensorRT's own ``samples/python/common_runtime.py``: a ``cuda_call``-style checker,
device and pinned host memory objects, async copies on one stream.

cuda-python moved its runtime module: ``cuda.bindings.runtime`` (12.x and later; the only path in
13.x) and ``cuda.cudart`` (11.x / early 12.x). Both are tried. Every call returns a tuple whose
first item is a ``cudaError_t``; ``check`` turns a failure into an ``EngineUnavailableError`` that
names the call, and returns the remaining value(s).

Owned resources (``DeviceBuffer``, ``PinnedBuffer``) have an explicit ``free()``; ``__del__`` is
only a fallback.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from edgediff.runtime.errors import EngineUnavailableError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install the GPU extra (pip install 'edgediff[tensorrt]', on Jetson use JetPack's TensorRT; see docs/GPU.md), "
    'or use the ONNX Runtime engine: engine="onnxruntime" (the default; CLI: leave out --engine)'
)


def import_cudart():
    """The cuda-python runtime module, whichever import path this cuda-python has."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.x layout

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python 11.x / early 12.x; removed in 13.x

        return cudart
    except ImportError as e:
        raise EngineUnavailableError(f"cuda-python is not installed ({e}); {INSTALL_HINT}") from e


def _error_text(cudart, err) -> str:
    try:
        res = cudart.cudaGetErrorString(err)
        text = res[1] if isinstance(res, tuple) else res
        return text.decode() if isinstance(text, bytes) else str(text)
    except (AttributeError, TypeError, ValueError, IndexError):  # a nicety; never mask the original error
        return str(err)


def check(cudart, ret, what: str = "CUDA call"):
    """Unpack a cuda-python result ``(err, *values)``; raise on error."""
    if not isinstance(ret, tuple):
        ret = (ret,)
    err, *values = ret
    if int(err) != int(cudart.cudaError_t.cudaSuccess):
        raise EngineUnavailableError(f"{what} failed: {_error_text(cudart, err)} ({err})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def probe_gpu(cudart, device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device``; a clear error when there is none."""
    ret = cudart.cudaGetDeviceCount()
    err, count = ret[0], (ret[1] if len(ret) > 1 else 0)
    if int(err) != int(cudart.cudaError_t.cudaSuccess) or count < 1:
        reason = _error_text(cudart, err) if int(err) != int(cudart.cudaError_t.cudaSuccess) else "0 devices"
        raise EngineUnavailableError(
            f"no CUDA GPU is visible ({reason}); TensorRT needs an NVIDIA GPU and its driver. "
            'Use the ONNX Runtime engine instead: engine="onnxruntime" (the default)'
        )
    if not 0 <= device < count:
        raise EngineUnavailableError(f"CUDA device {device} does not exist; this machine has {count} (0..{count - 1})")
    props = check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return str(name).strip(), f"{props.major}.{props.minor}"


def mem_get_info(cudart) -> tuple[int, int]:
    """(free, total) device memory in bytes."""
    free, total = check(cudart, cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc); ``ptr`` is an int address."""

    def __init__(self, cudart, nbytes: int):
        self._cudart = cudart
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart, cudart.cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes} bytes)"))

    def free(self) -> None:
        if self.ptr:
            check(self._cudart, self._cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0

    def __del__(self):  # fallback only; owners call free()
        if getattr(self, "ptr", 0):
            try:
                self.free()
            except (EngineUnavailableError, AttributeError, TypeError) as e:  # shutdown: the driver may be gone
                logger.debug("cudaFree at exit: %s", e)


class PinnedBuffer:
    """``nbytes`` of page-locked host memory; ``view(shape, dtype)`` is a numpy array over its start."""

    def __init__(self, cudart, nbytes: int):
        self._cudart = cudart
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart, cudart.cudaMallocHost(max(self.nbytes, 1)), "cudaMallocHost"))
        self._raw: ctypes.Array[ctypes.c_byte] | None = (ctypes.c_byte * max(self.nbytes, 1)).from_address(self.ptr)

    def view(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if count > self.nbytes:
            raise ValueError(f"{list(shape)} {dtype} needs {count} bytes, the buffer has {self.nbytes}")
        if self._raw is None:
            raise ValueError("view() of a freed PinnedBuffer")
        return np.frombuffer(memoryview(self._raw), dtype=np.uint8, count=count).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self._raw = None
            check(self._cudart, self._cudart.cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0

    def __del__(self):
        if getattr(self, "ptr", 0):
            try:
                self.free()
            except (EngineUnavailableError, AttributeError, TypeError) as e:
                logger.debug("cudaFreeHost at exit: %s", e)


def stream_handle(stream) -> int:
    """The address behind a cuda-python ``cudaStream_t`` (what TensorRT's ``execute_async_v3`` takes).

    ``int(stream)`` is the handle itself; ``stream.getPtr()`` would be the address of the Python
    object's storage for it, never a stream, so it is not a fallback."""
    return stream if isinstance(stream, int) else int(stream)


def memcpy_htod(cudart, dst: int, host: np.ndarray, stream) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(cudart, cudart.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, stream), "cudaMemcpyAsync H2D")


def memcpy_dtoh(cudart, host: np.ndarray, src: int, stream) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, stream), "cudaMemcpyAsync D2H")
