"""TensorRT engine: plans built by ``edgediff build``, run with cuda-python and numpy (no torch).

    eng = TrtEngine("MODEL/unet/model.onnx", component="unet")      # or create_engine("tensorrt", ...)
    out = eng.run({"sample": x, "timestep": t, "encoder_hidden_states": emb})["out_sample"]

Per call, the plan under ``MODEL/engines/`` whose optimisation profile fits the feed shapes is
chosen (``trt_plans.select_plan``) and deserialised on first use. Plans built for another
TensorRT version, GPU or model file are refused with the rebuild command, never loaded.

Memory: the engines of one process and device share one CUDA stream and one scratch
(activation) allocation, grown to the largest ``device_memory_size`` any loaded plan asks for;
contexts are created without their own device memory and pointed at it. Stages never overlap:
one lock per device serialises every run (so one Pipeline still serves several threads). I/O
buffers (device + pinned host) are allocated once per (plan, input shapes) and bound with
``set_tensor_address``; outputs are copied out of the pinned buffers, so a result stays valid
after the next call.

Shape precedence: the feed's shapes decide (after ``check_feed`` validated names, ranks and
fixed dims and cast the dtypes the plan declares); the plan's profile must contain them.

``cuda_graph=True``: for plans with a static profile, the first call with a shape runs plainly
(TensorRT's warm-up) and then captures ``execute_async_v3`` into a CUDA graph; later calls replay
it (copies stay outside the graph).
A failed capture logs a warning and that shape runs plainly from then on.

``stats()`` reports the GPU time of recent runs (CUDA events around copies + execution) and
the device memory this engine holds, for ``edgediff bench``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
from edgediff.runtime.engine import check_feed
from edgediff.runtime.errors import EngineUnavailableError, InvalidArgumentError, PlanError
from edgediff.runtime.specs import TensorSpec

from . import trt_plans as plans
from .cuda_util import (
    DeviceBuffer,
    PinnedBuffer,
    check,
    import_cudart,
    instantiate_graph,
    mem_get_info,
    memcpy_dtoh,
    memcpy_htod,
    stream_handle,
)
from .tensorrt_build import current_environment, device_memory_size, import_tensorrt, trt_logger

logger = logging.getLogger(__name__)

MAX_SHAPES_PER_PLAN = 4  # buffer sets kept per plan (LRU); dynamic plans fed many shapes evict the oldest


class _Device:
    """Per-device state shared by every TrtEngine of the process: stream, scratch, lock."""

    _registry: ClassVar[dict[int, _Device]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, cudart, index: int):
        self.cudart = cudart
        self.index = index
        self.lock = threading.RLock()
        self.users = 0
        check(cudart, cudart.cudaSetDevice(index), "cudaSetDevice")
        self.stream = check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = stream_handle(self.stream)  # TensorRT takes the raw cudaStream_t as an int
        self.scratch: DeviceBuffer | None = None
        self.generation = 0  # bumped whenever the scratch moves: contexts and graphs re-bind

    @classmethod
    def acquire(cls, cudart, index: int) -> _Device:
        with cls._registry_lock:
            dev = cls._registry.get(index)
            if dev is None:
                dev = cls._registry[index] = cls(cudart, index)
            dev.users += 1
            return dev

    def release(self) -> None:
        with self._registry_lock:
            self.users -= 1
            if self.users > 0:
                return
            self._registry.pop(self.index, None)
        with self.lock:
            check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            if self.scratch is not None:
                self.scratch.free()
                self.scratch = None
            check(self.cudart, self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")

    @property
    def scratch_bytes(self) -> int:
        return self.scratch.nbytes if self.scratch is not None else 0

    def ensure_scratch(self, nbytes: int) -> None:
        """Grow the shared scratch to ``nbytes`` (callers hold ``lock``)."""
        if self.scratch is not None and nbytes <= self.scratch.nbytes:
            return
        check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        if self.scratch is not None:
            self.scratch.free()
        self.scratch = DeviceBuffer(self.cudart, max(nbytes, 256))
        self.generation += 1


class _Shapes:
    """Device and pinned host buffers of one plan for one set of input shapes (+ its CUDA graph)."""

    def __init__(self, cudart, shapes: dict[str, tuple], out_shapes: dict[str, tuple], dtypes: dict[str, np.dtype]):
        self.cudart = cudart
        self.shapes = shapes
        self.device: dict[str, DeviceBuffer] = {}
        self.host: dict[str, PinnedBuffer] = {}
        for name, shape in {**shapes, **out_shapes}.items():
            self.host[name] = PinnedBuffer(cudart, shape, dtypes[name])
            self.device[name] = DeviceBuffer(cudart, self.host[name].nbytes)
        self.outputs = list(out_shapes)
        self.runs = 0
        self.graph = None  # executable graph
        self.graph_generation = -1
        self.graph_failed = False

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.device.values())

    def drop_graph(self) -> None:
        if self.graph is not None:
            check(self.cudart, self.cudart.cudaGraphExecDestroy(self.graph), "cudaGraphExecDestroy")
            self.graph = None

    def free(self) -> None:
        self.drop_graph()
        for b in (*self.device.values(), *self.host.values()):
            b.free()
        self.device.clear()
        self.host.clear()


class _LoadedPlan:
    """A deserialised plan, its execution context (no own device memory) and its buffer sets."""

    def __init__(self, trt, cudart, runtime, record: plans.BuildRecord, component: str):
        self.trt, self.cudart, self.record = trt, cudart, record
        self.runtime = runtime  # a runtime must outlive the engines it deserialised
        data = record.plan_path.read_bytes()
        if len(data) != record.plan_bytes:
            raise PlanError(f"{record.plan_path} is {len(data)} bytes, build.json says {record.plan_bytes}; rebuild")
        free_before, _ = mem_get_info(cudart)
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise PlanError(
                f"{component}: TensorRT cannot deserialise {record.plan_path} (see its log); rebuild with "
                f"{plans.rebuild_hint(record.path.parent.parent if record.path else 'MODEL')} --force"
            )
        self.names, self.dtypes, self.is_input, self.dynamic = [], {}, {}, set()
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self.names.append(name)
            if any(d < 0 for d in self.engine.get_tensor_shape(name)):
                self.dynamic.add(name)
            self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self.is_input[name] = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        expected = {t.name: t.dtype for t in (*record.inputs, *record.outputs)}
        if expected != self.dtypes:
            raise PlanError(f"{record.plan_path} does not match its build.json ({self.dtypes} vs {expected}); rebuild")
        self.scratch_bytes = device_memory_size(self.engine)
        if hasattr(trt, "ExecutionContextAllocationStrategy"):
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:  # before TensorRT 10
            self.context = self.engine.create_execution_context_without_device_memory()
        if self.context is None:
            raise PlanError(f"{component}: TensorRT could not create an execution context for {record.key}")
        free_after, _ = mem_get_info(cudart)
        self.weights_bytes = max(0, free_before - free_after)  # approximate: the device is shared
        self.bound_generation = -1
        self.bound_shapes: _Shapes | None = None
        self.sets: OrderedDict[tuple, _Shapes] = OrderedDict()

    def bind_scratch(self, dev: _Device) -> None:
        if self.bound_generation == dev.generation:
            return
        if hasattr(self.context, "set_device_memory"):  # setDeviceMemoryV2 (TensorRT >= 10.1)
            self.context.set_device_memory(dev.scratch.ptr, dev.scratch.nbytes)
        else:
            self.context.device_memory = dev.scratch.ptr
        self.bound_generation = dev.generation

    def buffers_for(self, shapes: dict[str, tuple]) -> _Shapes:
        key = tuple(sorted(shapes.items()))
        bufs = self.sets.get(key)
        if bufs is not None:
            self.sets.move_to_end(key)
        else:
            for name, shape in shapes.items():
                if name in self.dynamic and not self.context.set_input_shape(name, shape):
                    raise PlanError(f"TensorRT refused shape {list(shape)} for {name!r} in plan {self.record.key}")
            out_shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.names if not self.is_input[n]}
            bufs = _Shapes(self.cudart, shapes, out_shapes, self.dtypes)
            self.sets[key] = bufs
            self.bound_shapes = None
            while len(self.sets) > MAX_SHAPES_PER_PLAN:
                _, old = self.sets.popitem(last=False)
                old.free()
        if self.bound_shapes is not bufs:
            for name, shape in shapes.items():
                if name in self.dynamic:
                    self.context.set_input_shape(name, shape)
            for name in self.names:
                self.context.set_tensor_address(name, bufs.device[name].ptr)
            self.bound_shapes = bufs
        return bufs

    @property
    def io_bytes(self) -> int:
        return sum(s.nbytes for s in self.sets.values())

    def free(self) -> None:
        for s in self.sets.values():
            s.free()
        self.sets.clear()
        self.bound_shapes = None
        self.context = None  # context before engine before runtime
        self.engine = None
        self.runtime = None


class TrtEngine:
    """Numpy in, numpy out over TensorRT plans. See the module docstring.

    ``path``: the component's ONNX file in a model folder (``MODEL/unet/model.onnx``); its plans
    are read from ``MODEL/engines``. ``device``: CUDA device index. ``cuda_graph``: replay static
    shapes as CUDA graphs. ``history``: how many runs ``stats()["gpu_ms"]`` keeps.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        component: str = "model",
        device: int = 0,
        cuda_graph: bool = False,
        history: int = 1000,
        providers=None,
    ):
        if providers:
            raise InvalidArgumentError(
                'providers= selects ONNX Runtime execution providers; use engine="onnxruntime" for them'
            )
        self.component = component
        self.cuda_graph = bool(cuda_graph)
        self._dev: _Device | None = None
        self._start = self._end = None  # CUDA events around each run
        self._loaded: dict[str, _LoadedPlan] = {}
        path = Path(path)
        self.model_dir = path.parent.parent  # MODEL/<component>/model.onnx
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
        self.environment = current_environment(self._trt, self._cudart, device)

        records, problems = plans.discover_plans(self.model_dir, component)
        known = [r.model_files for r in records] + [self._manifest_files()]
        model_sha, _ = plans.model_fingerprint(self.model_dir, path.parent, known)
        self._plans = plans.usable_plans(records, component, self.environment, model_sha, self.model_dir, problems)
        self._stale = [r for r in records if r not in self._plans]
        for p in problems:
            logger.warning("%s: %s", component, p)
        self.inputs: dict[str, TensorSpec] = plans.merge_specs([r.inputs for r in self._plans])
        self.outputs: dict[str, TensorSpec] = plans.merge_specs([r.outputs for r in self._plans])

        self._runtime = self._trt.Runtime(trt_logger(self._trt))
        self._gpu_ms: deque[float] = deque(maxlen=history)
        self._dev = _Device.acquire(self._cudart, device)
        try:
            # events belong to the calling thread's current device; the _Device may have been made by another thread
            check(self._cudart, self._cudart.cudaSetDevice(device), "cudaSetDevice")
            self._start = check(self._cudart, self._cudart.cudaEventCreate(), "cudaEventCreate")
            self._end = check(self._cudart, self._cudart.cudaEventCreate(), "cudaEventCreate")
        except BaseException:
            self.close()
            raise

    def _manifest_files(self) -> dict:
        try:
            return json.loads((self.model_dir / "edgediff.json").read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------------------------------
    def _plan_for(self, shapes: dict[str, tuple]) -> _LoadedPlan:
        record = plans.select_plan(self._plans, shapes, self.component, self.model_dir, self._stale)
        loaded = self._loaded.get(record.key)
        if loaded is None:
            loaded = self._loaded[record.key] = _LoadedPlan(
                self._trt, self._cudart, self._runtime, record, self.component
            )
            logger.info("%s: loaded plan %s (%s)", self.component, record.key, plans.describe_profile(record.profile))
        return loaded

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._dev is None:
            raise EngineUnavailableError(f"{self.component}: the TensorRT engine is closed")
        checked = check_feed(self.component, self.inputs, feeds)
        shapes = {n: tuple(a.shape) for n, a in checked.items()}
        cu, dev = self._cudart, self._dev
        with dev.lock:
            if self._dev is not dev:  # closed by another thread while this one waited for the lock
                raise EngineUnavailableError(f"{self.component}: the TensorRT engine is closed")
            check(cu, cu.cudaSetDevice(dev.index), "cudaSetDevice")
            plan = self._plan_for(shapes)
            dev.ensure_scratch(plan.scratch_bytes)
            plan.bind_scratch(dev)
            bufs = plan.buffers_for(shapes)
            stream = dev.stream
            for name, value in checked.items():
                host = bufs.host[name].array
                host[...] = value  # casts to the plan's dtype
                memcpy_htod(cu, bufs.device[name].ptr, host, stream)
            check(cu, cu.cudaEventRecord(self._start, stream), "cudaEventRecord")
            self._execute(plan, bufs)
            for name in bufs.outputs:
                memcpy_dtoh(cu, bufs.host[name].array, bufs.device[name].ptr, stream)
            check(cu, cu.cudaEventRecord(self._end, stream), "cudaEventRecord")
            check(cu, cu.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            self._gpu_ms.append(
                float(check(cu, cu.cudaEventElapsedTime(self._start, self._end), "cudaEventElapsedTime"))
            )
            return {name: bufs.host[name].array.copy() for name in bufs.outputs}

    def _execute(self, plan: _LoadedPlan, bufs: _Shapes) -> None:
        cu, stream = self._cudart, self._dev.stream
        use_graph = self.cuda_graph and plans.is_static(plan.record.profile) and not bufs.graph_failed
        if use_graph and bufs.graph is not None and bufs.graph_generation != self._dev.generation:
            bufs.drop_graph()  # the scratch moved since capture
        if use_graph and bufs.graph is not None:
            check(cu, cu.cudaGraphLaunch(bufs.graph, stream), "cudaGraphLaunch")
        elif not plan.context.execute_async_v3(self._dev.stream_handle):
            raise EngineUnavailableError(f"{self.component}: TensorRT execute_async_v3 failed (see its log)")
        bufs.runs += 1
        if use_graph and bufs.graph is None:
            self._capture(plan, bufs)  # after this plain (warm-up) run, as TensorRT requires

    def _capture(self, plan: _LoadedPlan, bufs: _Shapes) -> None:
        cu, stream = self._cudart, self._dev.stream
        # thread-local (as trtexec does): Global would also fail other threads' unsafe calls (cudaMalloc in an
        # engine on another device, ONNX Runtime) for the duration of the capture
        mode = cu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cu, cu.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        check(cu, cu.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        ok = False
        try:
            ok = bool(plan.context.execute_async_v3(self._dev.stream_handle))
        finally:
            ret = cu.cudaStreamEndCapture(stream)
        try:
            graph = check(cu, ret, "cudaStreamEndCapture")
            try:
                if not ok:
                    raise EngineUnavailableError("execute_async_v3 returned False during capture")
                bufs.graph = instantiate_graph(cu, graph)
            finally:  # the captured graph is not needed once instantiated, nor when it failed
                check(cu, cu.cudaGraphDestroy(graph), "cudaGraphDestroy")
            bufs.graph_generation = self._dev.generation
        except EngineUnavailableError as e:
            bufs.graph_failed = True
            cu.cudaGetLastError()  # clear the capture error so the next plain run does not report it
            logger.warning("%s: CUDA graph capture failed (%s); running without a graph", self.component, e)

    # ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """``gpu_ms``: GPU time of the last runs (copies + execution, CUDA events), oldest first.
        ``device_memory_bytes``: weights (measured at load, approximate) + I/O buffers + the shared
        scratch. The scratch is shared by every engine on the device: to total several engines,
        add their ``weights_bytes`` and ``io_bytes`` and one ``scratch_bytes``."""
        dev = self._dev
        with dev.lock if dev is not None else contextlib.nullcontext():  # a run in another thread mutates these
            weights = sum(p.weights_bytes for p in self._loaded.values())
            io = sum(p.io_bytes for p in self._loaded.values())
            scratch = dev.scratch_bytes if dev is not None else 0
            return {
                "gpu_ms": list(self._gpu_ms),
                "device_memory_bytes": weights + io + scratch,
                "weights_bytes": weights,
                "io_bytes": io,
                "scratch_bytes": scratch,
                "plans": sorted(self._loaded),
                "cuda_graphs": sum(b.graph is not None for p in self._loaded.values() for b in p.sets.values()),
            }

    def close(self) -> None:
        """Free buffers, graphs, contexts and plans; the shared stream and scratch go with the last engine."""
        dev = self._dev
        if dev is None:
            return
        with dev.lock:  # a run in progress (it holds the lock) finishes before anything is freed
            if self._dev is not dev:  # closed meanwhile by another thread
                return
            self._dev = None
            check(self._cudart, self._cudart.cudaSetDevice(dev.index), "cudaSetDevice")
            check(self._cudart, self._cudart.cudaStreamSynchronize(dev.stream), "cudaStreamSynchronize")
            for p in self._loaded.values():
                p.free()
            self._loaded.clear()
            for ev in (self._start, self._end):
                if ev is not None:
                    check(self._cudart, self._cudart.cudaEventDestroy(ev), "cudaEventDestroy")
            self._start = self._end = None
        dev.release()
        self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_dev", None) is not None:
            try:
                self.close()
            except (EngineUnavailableError, AttributeError, TypeError) as e:  # interpreter shutdown
                logger.debug("TrtEngine.close at exit: %s", e)
