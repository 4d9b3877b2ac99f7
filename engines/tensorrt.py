"""TensorRT engine: the plan ``edgediff build`` made for this GPU, run with cuda-python and numpy (no torch).

    eng = TrtEngine("MODEL/unet/model.onnx", component="unet")      # or create_engine("tensorrt", ...)
    out = eng.run({"sample": x, "timestep": t, "encoder_hidden_states": emb})["out_sample"]

At load, the component's one plan for this TensorRT version, GPU and model file is taken from
``MODEL/engines/`` (``trt_plans.usable_plan``); plans built for another setup are refused with the
rebuild command, never loaded. The plan is deserialised once, with one execution context that
allocates its own scratch memory (TensorRT's default: the plan's device memory size, the largest
over its profiles, also recorded in build.json).

Per call, under the engine's lock (so one engine serves several threads): the feed is checked
against the plan's I/O (``check_feed``: names, ranks, fixed dims; dtypes cast); the first profile
that contains its shapes is selected (``trt_plans.pick_profile``; shape precedence: the feed's
shapes decide, the profile must contain them); every dynamic input's shape and every tensor's
address is set; inputs are copied in, ``execute_async_v3`` runs and outputs are copied out on the
engine's own stream, with CUDA events between the three (``stats()``: ``compute_ms``, ``copy_ms``).
Shapes and addresses are set on every call rather than cached: a few host calls against a UNet
step of milliseconds, and no stale binding to get wrong. I/O buffers (device + pinned host) grow
to the largest shape seen; outputs are returned as copies.

LoRAs (``weights=``: the LoRA-merged initializers of ``edgediff.runtime.lora_apply``): the plan must have been
built refittable (``edgediff build MODEL --refit``; a plan built without it is refused with that command). After
deserialising, TensorRT's ``Refitter`` takes each merged weight under its ONNX initializer name (the names the
ONNX parser gave the weights), cast to the dtype of the plan's prototype; the weights TensorRT combined with them
and asks for (``get_missing_weights``) get their base values from ``model.onnx_data`` through the weights map.
Every engine starts from a freshly deserialised plan, whose weights are the base ones, so a refit never stacks on
an earlier LoRA.

Left out until a GPU run shows they help: CUDA graphs, one scratch shared by several engines,
and buffer sets cached per shape (docs/GPU.md).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.runtime.engine import check_feed
from edgediff.runtime.errors import (
    EngineRunError,
    EngineUnavailableError,
    InvalidArgumentError,
    PlanError,
    ResourceError,
)
from edgediff.runtime.specs import TensorSpec

from . import trt_plans as plans
from .cuda_util import (
    DeviceBuffer,
    PinnedBuffer,
    check,
    import_cudart,
    mem_get_info,
    memcpy_dtoh,
    memcpy_htod,
    stream_handle,
)
from .tensorrt_build import current_environment, import_tensorrt, trt_logger

logger = logging.getLogger(__name__)


class _IOBuffer:
    """Device and pinned host memory of one I/O tensor, grown when a call needs more."""

    def __init__(self, cudart, dtype: np.dtype):
        self.cudart, self.dtype = cudart, np.dtype(dtype)
        self.device: DeviceBuffer | None = None
        self.host: PinnedBuffer | None = None

    @property
    def ptr(self) -> int:
        """The device address; the buffer is allocated by fit()."""
        assert self.device is not None, "fit() allocates the buffer first"
        return self.device.ptr

    @property
    def nbytes(self) -> int:
        return self.device.nbytes if self.device is not None else 0

    def fit(self, shape: tuple[int, ...]) -> np.ndarray:
        """A host array of ``shape`` over the pinned memory; ``device.ptr`` is its device twin."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        if nbytes > self.nbytes:
            self.free()
            device = DeviceBuffer(self.cudart, nbytes)
            try:
                self.host = PinnedBuffer(self.cudart, nbytes)
            except BaseException:
                device.free()
                raise
            self.device = device
        assert self.host is not None  # allocated just above when missing
        return self.host.view(shape, self.dtype)

    def free(self) -> None:
        for b in (self.device, self.host):
            if b is not None:
                b.free()
        self.device = self.host = None


class TrtEngine:
    """Numpy in, numpy out over one TensorRT plan. See the module docstring.

    ``path``: the component's ONNX file in a model folder (``MODEL/unet/model.onnx``); its plan is
    read from ``MODEL/engines``. ``device``: CUDA device index. ``history``: how many runs
    ``stats()["compute_ms"]`` and ``stats()["copy_ms"]`` keep.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        component: str = "model",
        device: int = 0,
        history: int = 1000,
        weights: Mapping[str, np.ndarray] | None = None,
        providers=None,
    ):
        if providers:
            raise InvalidArgumentError(
                'providers= selects ONNX Runtime execution providers; use engine="onnxruntime" for them'
            )
        self.component, self.device = component, device
        self._closed = True  # until everything below exists
        self._lock = threading.Lock()
        self._buffers: dict[str, _IOBuffer] = {}
        # TensorRT and CUDA objects (no type information: the libraries ship none)
        self._stream: Any = None
        self._events: tuple = ()  # copy-in start, execute start, execute end, copy-out end
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self._profile = 0
        self._stream_handle = 0
        self._loaded_bytes = 0
        path = Path(path)
        self.model_dir = path.parent.parent  # MODEL/<component>/model.onnx
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
        self.environment = current_environment(self._trt, self._cudart, device)

        records, problems = plans.discover_plans(self.model_dir, component)
        known = [r.model_files for r in records] + [self._manifest_files()]
        model_sha, _ = plans.model_fingerprint(self.model_dir, path.parent, known)
        self.record = plans.usable_plan(records, component, self.environment, model_sha, self.model_dir, problems)
        for p in problems:
            logger.warning("%s: %s", component, p)
        self.inputs: dict[str, TensorSpec] = {t.name: t for t in self.record.inputs}
        self.outputs: dict[str, TensorSpec] = {t.name: t for t in self.record.outputs}
        self._compute_ms: deque[float] = deque(maxlen=history)
        self._copy_ms: deque[float] = deque(maxlen=history)
        if weights and not self.record.build.get("refittable"):
            raise PlanError(
                f"{component}: the TensorRT plan {self.record.key} was built without --refit, so LoRAs cannot be "
                f"applied to it; rebuild it refittable: {plans.rebuild_hint(self.model_dir)} --refit --force"
            )
        try:
            self._load()
            if weights:
                self._refit(weights, path)
        except BaseException:
            self._release()
            raise
        self._closed = False

    def _refit(self, weights: Mapping[str, np.ndarray], path: Path) -> None:
        """Refit the freshly deserialised plan (base weights) with ``weights``, plus the base values of any weight
        TensorRT combined with them."""
        from edgediff.runtime.lora_apply import WeightsMap

        trt = self._trt
        refitter = trt.Refitter(self._engine, trt_logger(trt))
        refittable = set(refitter.get_all_weights())
        unknown = sorted(set(weights) - refittable)
        rebuild = f"{plans.rebuild_hint(self.model_dir)} --refit --force"
        if unknown:
            raise PlanError(f"{self.component}: the plan {self.record.key} has no refittable weight named "
                            f"{unknown[:3]} ({len(unknown)} of the LoRA's); rebuild it: {rebuild}")  # fmt: skip
        held = []  # the host arrays must outlive refit_cuda_engine

        def supply(name: str, value: np.ndarray) -> None:
            prototype = refitter.get_weights_prototype(name)
            array = np.ascontiguousarray(value, dtype=np.dtype(trt.nptype(prototype.dtype)))
            if array.size != prototype.size:
                raise PlanError(f"{self.component}: weight {name!r} has {array.size} values, the plan "
                                f"{prototype.size}; rebuild it: {rebuild}")  # fmt: skip
            held.append(array)
            refitter.set_named_weights(name, trt.Weights(array))

        for name, value in weights.items():
            supply(name, value)
        missing = [m for m in refitter.get_missing_weights() if m not in weights]
        if missing:  # their base values, read from model.onnx_data
            wmap = WeightsMap.load(self.component, path, self.model_dir)
            for name in missing:
                if name not in wmap.initializers:
                    raise PlanError(f"{self.component}: TensorRT asks for weight {name!r} with the LoRA's, which "
                                    f"is not in {path}'s weights map; rebuild the plan: {rebuild}")  # fmt: skip
                supply(name, wmap.base(name))
        if not refitter.refit_cuda_engine():
            raise PlanError(f"{self.component}: TensorRT could not refit the plan {self.record.key} (see its log); "
                            f"rebuild it: {rebuild}")  # fmt: skip
        held.clear()
        logger.info("%s: refitted %d LoRA-merged weights (%d more TensorRT asked for)", self.component,
                    len(weights), len(missing))  # fmt: skip

    def _manifest_files(self) -> dict:
        try:
            return json.loads((self.model_dir / "edgediff.json").read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError):
            return {}

    def _load(self) -> None:
        trt, cu, rec = self._trt, self._cudart, self.record
        rebuild = f"rebuild with {plans.rebuild_hint(self.model_dir)} --force"
        data = rec.plan_path.read_bytes()
        if len(data) != rec.plan_bytes:
            raise PlanError(f"{rec.plan_path} is {len(data)} bytes, build.json says {rec.plan_bytes}; {rebuild}")
        check(cu, cu.cudaSetDevice(self.device), "cudaSetDevice")
        free_before, _ = mem_get_info(cu)
        self._runtime = trt.Runtime(trt_logger(trt))  # a runtime must outlive the engines it deserialised
        self._engine = engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise PlanError(f"{self.component}: TensorRT cannot deserialise {rec.plan_path} (see its log); {rebuild}")
        dtypes, self._dynamic = {}, []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtypes[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and any(d < 0 for d in engine.get_tensor_shape(name)):
                self._dynamic.append(name)
        expected = {t.name: t.dtype for t in (*rec.inputs, *rec.outputs)}
        if dtypes != expected:
            raise PlanError(f"{rec.plan_path} does not match its build.json ({dtypes} vs {expected}); {rebuild}")
        self._context = engine.create_execution_context()  # with its own scratch, sized for the largest profile
        if self._context is None:
            raise ResourceError(
                f"{self.component}: TensorRT could not create an execution context for plan {rec.key} (it needs "
                f"{rec.device_memory_bytes} bytes of scratch); free GPU memory (close other programs) or load the "
                "pipeline with low_memory=True"
            )
        self._profile = 0  # a new context starts on profile 0
        self._loaded_bytes = max(0, free_before - mem_get_info(cu)[0])  # approximate: the device is shared
        self._stream = check(cu, cu.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = stream_handle(self._stream)  # TensorRT takes the raw cudaStream_t as an int
        for _ in range(4):  # one at a time: a failure releases those already made
            self._events += (check(cu, cu.cudaEventCreate(), "cudaEventCreate"),)
        self._buffers = {name: _IOBuffer(cu, dtype) for name, dtype in dtypes.items()}
        logger.info("%s: loaded plan %s (%s)", self.component, rec.key,
                    " + ".join(plans.describe_profile(p) for p in rec.profiles))  # fmt: skip

    # ------------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise EngineUnavailableError(f"{self.component}: the TensorRT engine is closed")
        checked = check_feed(self.component, self.inputs, feeds)
        shapes = {n: tuple(a.shape) for n, a in checked.items()}
        index = plans.pick_profile(self.record, shapes, self.model_dir)
        cu, key = self._cudart, self.record.key
        with self._lock:
            if self._closed:  # closed by another thread while this one waited for the lock
                raise EngineUnavailableError(f"{self.component}: the TensorRT engine is closed")
            ctx, stream = self._context, self._stream
            check(cu, cu.cudaSetDevice(self.device), "cudaSetDevice")
            if index != self._profile:  # switching invalidates the input shapes: they are set just below
                if not ctx.set_optimization_profile_async(index, self._stream_handle):
                    raise PlanError(f"{self.component}: TensorRT refused profile {index} of plan {key}; rebuild")
                self._profile = index
            for name in self._dynamic:
                if not ctx.set_input_shape(name, shapes[name]):
                    raise PlanError(f"{self.component}: TensorRT refused shape {list(shapes[name])} for {name!r} "
                                    f"in profile {index} of plan {key}")  # fmt: skip
            # Buffers are sized (a growth allocates) and the pinned inputs filled before the first event: between
            # the events the stream only waits for the host to issue the copies, so they time copies and execution.
            inputs = {}
            for name, value in checked.items():
                buf = self._buffers[name]
                inputs[name] = host = buf.fit(value.shape)
                host[...] = value  # into pinned memory: the async copy below reads it
                ctx.set_tensor_address(name, buf.ptr)
            out = {}
            for name in self.outputs:
                buf = self._buffers[name]
                out[name] = buf.fit(tuple(ctx.get_tensor_shape(name)))
                ctx.set_tensor_address(name, buf.ptr)
            copy_in, run_start, run_end, copy_out = self._events
            check(cu, cu.cudaEventRecord(copy_in, stream), "cudaEventRecord")
            for name, host in inputs.items():
                memcpy_htod(cu, self._buffers[name].ptr, host, stream)
            check(cu, cu.cudaEventRecord(run_start, stream), "cudaEventRecord")
            if not ctx.execute_async_v3(self._stream_handle):
                raise EngineRunError(
                    f"{self.component}: TensorRT execute_async_v3 failed for plan {key} (see its log)"
                )
            check(cu, cu.cudaEventRecord(run_end, stream), "cudaEventRecord")
            for name, host in out.items():
                memcpy_dtoh(cu, host, self._buffers[name].ptr, stream)
            check(cu, cu.cudaEventRecord(copy_out, stream), "cudaEventRecord")
            check(cu, cu.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            self._compute_ms.append(self._elapsed_ms(run_start, run_end))
            self._copy_ms.append(self._elapsed_ms(copy_in, run_start) + self._elapsed_ms(run_end, copy_out))
            return {name: host.copy() for name, host in out.items()}  # the pinned buffers are reused next call

    def _elapsed_ms(self, start, end) -> float:
        cu = self._cudart
        return float(check(cu, cu.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def stats(self) -> dict:
        """``compute_ms``: GPU time of ``execute_async_v3`` alone in the last runs, oldest first;
        ``copy_ms``: their host-to-device input and device-to-host output copies (CUDA events on the
        engine's stream; the host's own work, such as checking the feed, is in neither).
        ``device_memory_bytes``: what loading the plan took (weights + its scratch, measured with
        cudaMemGetInfo: approximate when other work shares the GPU) + the I/O buffers.
        ``scratch_bytes``: the scratch part, as the plan reported it at build time."""
        with self._lock:  # a run in another thread grows the buffers
            io = sum(b.nbytes for b in self._buffers.values())
            loaded = 0 if self._closed else self._loaded_bytes
            return {
                "compute_ms": list(self._compute_ms),
                "copy_ms": list(self._copy_ms),
                "device_memory_bytes": loaded + io,
                "loaded_bytes": loaded,
                "scratch_bytes": self.record.device_memory_bytes,
                "io_bytes": io,
                "plan": self.record.key,
                "profile": self._profile,
            }

    def close(self) -> None:
        """Free buffers, context, plan, stream and events; idempotent. A run in progress finishes first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def _release(self) -> None:
        cu = self._cudart
        if self._stream is not None:
            check(cu, cu.cudaSetDevice(self.device), "cudaSetDevice")
            check(cu, cu.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        for b in self._buffers.values():
            b.free()
        self._buffers.clear()
        for ev in self._events:
            check(cu, cu.cudaEventDestroy(ev), "cudaEventDestroy")
        self._events = ()
        if self._stream is not None:
            check(cu, cu.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
        self._stream = None
        self._context = None  # context before engine before runtime
        self._engine = None
        self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except (EngineUnavailableError, AttributeError, TypeError) as e:  # interpreter shutdown
                logger.debug("TrtEngine.close at exit: %s", e)
