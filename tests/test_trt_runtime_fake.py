"""The TensorRT engine's own bookkeeping, on CPU, against a minimal stand-in for cuda-python and
TensorRT: "device" memory is host memory, a plan is a JSON recipe (``out_sample = sample *
scale + timestep``) and a context checks that it was given scratch and addresses before it runs.

What this proves is our logic only: I/O buffers allocated once per shape, one scratch shared by
every context and re-bound when it grows, the plan chosen per call from the feed shapes, CUDA
graph capture after a warm-up and replay reading fresh inputs, ``stats()``, and ``close()``
freeing every allocation. It proves nothing about TensorRT or CUDA themselves: the marked tests
in test_tensorrt.py do, on a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from edgediff.engines import tensorrt as trt_engine
from edgediff.engines import trt_plans as plans
from edgediff.runtime.engine import create_engine
from edgediff.runtime.errors import EngineUnavailableError, PlanError
from edgediff.runtime.specs import SUBMODELS

OK = 0


class FakeCudart:
    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self):
        self.device, self.host = {}, {}  # address -> ctypes buffer
        self.mallocs = 0
        self.streams = 0
        self.capturing: list | None = None
        self.graphs_alive = 0
        self.captured_graphs = 0  # cudaGraph_t from cudaStreamEndCapture not yet destroyed
        self.last_error_reads = 0

    # device
    def cudaGetDeviceCount(self):
        return (OK, 1)

    def cudaGetDeviceProperties(self, i):
        return (OK, SimpleNamespace(name=b"Fake GPU", major=8, minor=9))

    def cudaSetDevice(self, i):
        return (OK,)

    def cudaMemGetInfo(self):
        return (OK, 1 << 30, 1 << 31)

    # memory
    def _alloc(self, table, n):
        buf = ctypes.create_string_buffer(n)
        table[ctypes.addressof(buf)] = buf
        return (OK, ctypes.addressof(buf))

    def cudaMalloc(self, n):
        self.mallocs += 1
        return self._alloc(self.device, n)

    def cudaFree(self, ptr):
        del self.device[ptr]
        return (OK,)

    def cudaMallocHost(self, n):
        return self._alloc(self.host, n)

    def cudaFreeHost(self, ptr):
        del self.host[ptr]
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert self.capturing is None, "copies stay outside the graph"
        ctypes.memmove(dst, src, n)
        return (OK,)

    # streams, events, graphs
    def cudaStreamCreate(self):
        self.streams += 1
        return (OK, 1234)

    def cudaStreamDestroy(self, s):
        self.streams -= 1
        return (OK,)

    def cudaStreamSynchronize(self, s):
        return (OK,)

    def cudaEventCreate(self):
        return (OK, object())

    def cudaEventRecord(self, ev, s):
        return (OK,)

    def cudaEventElapsedTime(self, a, b):
        return (OK, 0.25)

    def cudaEventDestroy(self, ev):
        return (OK,)

    def cudaStreamBeginCapture(self, s, mode):
        self.capturing = []
        return (OK,)

    def cudaStreamEndCapture(self, s):
        ops, self.capturing = self.capturing, None
        self.captured_graphs += 1
        return (OK, ops)

    def cudaGetLastError(self):
        self.last_error_reads += 1
        return (OK,)

    def cudaGraphInstantiate(self, graph, flags):
        self.graphs_alive += 1
        return (OK, list(graph))

    def cudaGraphDestroy(self, graph):
        self.captured_graphs -= 1
        return (OK,)

    def cudaGraphLaunch(self, graph_exec, s):
        for op in graph_exec:
            op()
        return (OK,)

    def cudaGraphExecDestroy(self, graph_exec):
        self.graphs_alive -= 1
        return (OK,)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.cudart = engine, engine.cudart
        self.scratch = None
        self.shapes, self.addresses = {}, {}
        self.executions = 0
        self.fail_capture = False

    def set_device_memory(self, ptr, size):
        self.scratch = (ptr, size)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["sample"]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        assert isinstance(stream, int)
        ptr, size = self.scratch
        assert ptr in self.cudart.device and size >= self.engine.device_memory_size_v2, "stale or small scratch"
        addresses = dict(self.addresses)
        n = int(np.prod(self.shapes["sample"]))

        def op():
            x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(addresses["sample"]))
            t = np.ctypeslib.as_array((ctypes.c_float * 1).from_address(addresses["timestep"]))
            y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(addresses["out_sample"]))
            y[:] = x * self.engine.scale + t[0]
            self.executions += 1

        if self.cudart.capturing is not None:
            if self.fail_capture:
                return False
            self.cudart.capturing.append(op)
        else:
            op()
        return True


class FakeEngine:
    def __init__(self, cudart, recipe):
        self.cudart, self.scale = cudart, recipe["scale"]
        self.device_memory_size_v2 = recipe["scratch"]
        self.io = [
            ("sample", True, (-1, 4, -1, -1)),
            ("timestep", True, ()),
            ("encoder_hidden_states", True, (-1, 77, 8)),
        ]
        self.io.append(("out_sample", False, (-1, 4, -1, -1)))
        self.contexts = []

    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _find(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name):
        return "in" if self._find(name)[1] else "out"

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_shape(self, name):
        return self._find(name)[2]

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def make_fake_trt(cudart):
    class Logger:
        WARNING, INFO = 2, 3

        def __init__(self, severity):
            self.min_severity = severity

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine(cudart, json.loads(data))

    return SimpleNamespace(
        __version__="10.8.0.43", Logger=Logger, Runtime=Runtime, nptype=np.dtype,
        TensorIOMode=SimpleNamespace(INPUT="in"),
        ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user-managed"),
    )  # fmt: skip


ENV = plans.Environment("10.8.0.43", "Fake GPU", "8.9")
FACTS = plans.ModelFacts((32, 32), 2, 4, 77, 8)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(trt_engine, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: make_fake_trt(cudart))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.onnx").write_bytes(b"graph")
    yield SimpleNamespace(cudart=cudart, model=tmp_path, onnx=tmp_path / "unet" / "model.onnx")
    assert not trt_engine._Device._registry, "an engine was left open"


def add_plan(model, scale=2.0, scratch=1000, **options):
    sha, _ = plans.model_fingerprint(model, model / "unet")
    ranges = plans.symbol_ranges("unet", FACTS, plans.ProfileOptions(**options))
    spec = SUBMODELS["unet"]
    inputs = [*spec.inputs[:2], plans.symbolize("unet", "encoder_hidden_states", np.float32, (-1, 77, 8), "inputs")]
    profile = plans.derive_profile("unet", inputs, ranges)
    key = plans.plan_key(sha, "unet", "fp16", ENV, profile)
    data = json.dumps({"scale": scale, "scratch": scratch}).encode()
    record = plans.BuildRecord(
        key=key, component="unet", precision="fp16", model_sha256=sha, trt_version=ENV.trt_version,
        gpu_name=ENV.gpu_name, compute_capability=ENV.compute_capability, profile=profile, inputs=inputs,
        outputs=list(spec.outputs), plan_file="unet.plan", plan_bytes=len(data),
    )  # fmt: skip
    folder = model / "engines" / key
    folder.mkdir(parents=True)
    (folder / "unet.plan").write_bytes(data)
    plans.write_build_json(folder, record)
    return key


def feeds(batch=2, h=16, w=16, t=10.0, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 4, h, w)).astype(np.float32),
        "timestep": np.float32(t),
        "encoder_hidden_states": np.zeros((batch, 77, 8), np.float32),
    }


def test_run_reuses_buffers_and_returns_copies(fake):
    add_plan(fake.model)
    with create_engine("tensorrt", fake.onnx, component="unet") as eng:
        assert eng.inputs["sample"].shape == ("B", "C", "h", "w") and eng.outputs["out_sample"].dtype == np.float32
        f1, f2 = feeds(seed=1), feeds(seed=2, t=3.0)
        out1 = eng.run(f1)["out_sample"]
        mallocs = fake.cudart.mallocs
        out2 = eng.run(f2)["out_sample"]
        assert fake.cudart.mallocs == mallocs  # same shapes: no new allocation
        np.testing.assert_allclose(out1, f1["sample"] * 2 + 10, rtol=1e-6)
        np.testing.assert_allclose(out2, f2["sample"] * 2 + 3, rtol=1e-6)  # out1 was a copy, still intact
        stats = eng.stats()
        assert stats["gpu_ms"] == [0.25, 0.25] and stats["scratch_bytes"] == 1000
        assert stats["io_bytes"] == 2 * (2 * 4 * 16 * 16 * 4) + 4 + 2 * 77 * 8 * 4
    assert not fake.cudart.device and not fake.cudart.host and fake.cudart.streams == 0


def test_plan_chosen_per_call_and_misfit_named(fake):
    static = add_plan(fake.model)
    dynamic = add_plan(fake.model, scale=3.0, dynamic=True, min_size=16, max_size=64, max_batch=2)
    with create_engine("tensorrt", fake.onnx, component="unet") as eng:
        np.testing.assert_allclose(eng.run(feeds())["out_sample"], feeds()["sample"] * 2 + 10, rtol=1e-6)
        f = feeds(batch=1, h=24, w=8)
        np.testing.assert_allclose(eng.run(f)["out_sample"], f["sample"] * 3 + 10, rtol=1e-6)
        assert eng.stats()["plans"] == sorted([static, dynamic])
        with pytest.raises(PlanError, match=r"no TensorRT plan fits.*sample \[2, 4, 64, 64\]"):
            eng.run(feeds(h=64, w=64))


def test_scratch_grows_for_the_larger_plan_and_old_contexts_rebind(fake):
    add_plan(fake.model, scratch=1000)  # batch 2 (guidance)
    add_plan(fake.model, scale=3.0, scratch=5000, batch=4, guidance=False)  # batch 4
    with (
        create_engine("tensorrt", fake.onnx, component="unet") as a,
        create_engine("tensorrt", fake.onnx, component="unet") as b,
    ):
        a.run(feeds())
        assert a.stats()["scratch_bytes"] == 1000
        b.run(feeds(batch=4))  # needs 5000: the shared scratch is replaced
        assert a.stats()["scratch_bytes"] == b.stats()["scratch_bytes"] == 5000
        scratch_allocs = [n for n in (1000, 5000) if any(len(buf) == n for buf in fake.cudart.device.values())]
        assert scratch_allocs == [5000]  # one scratch, the old one freed
        np.testing.assert_allclose(a.run(feeds())["out_sample"], feeds()["sample"] * 2 + 10, rtol=1e-6)  # re-bound
    assert not fake.cudart.device


def test_cuda_graph_captured_after_warmup_and_replayed(fake):
    add_plan(fake.model)
    with create_engine("tensorrt", fake.onnx, component="unet", cuda_graph=True) as eng:
        outs = [eng.run(feeds(seed=s, t=float(s)))["out_sample"] for s in range(4)]
        for s, out in enumerate(outs):
            np.testing.assert_allclose(out, feeds(seed=s)["sample"] * 2 + s, rtol=1e-6)
        assert eng.stats()["cuda_graphs"] == 1
        ctx = next(iter(eng._loaded.values())).context
        assert ctx.executions == 4  # 1 plain warm-up (+ capture, not executed) and 3 replays
        assert fake.cudart.graphs_alive == 1 and fake.cudart.captured_graphs == 0
    assert fake.cudart.graphs_alive == 0 and not fake.cudart.device


def test_failed_capture_frees_the_graph_and_runs_plainly(fake):
    add_plan(fake.model)
    with create_engine("tensorrt", fake.onnx, component="unet", cuda_graph=True) as eng:
        eng._plan_for({"sample": (2, 4, 16, 16), "timestep": (), "encoder_hidden_states": (2, 77, 8)})
        next(iter(eng._loaded.values())).context.fail_capture = True
        for s in range(3):
            np.testing.assert_allclose(eng.run(feeds(seed=s))["out_sample"], feeds(seed=s)["sample"] * 2 + 10)
        assert eng.stats()["cuda_graphs"] == 0 and fake.cudart.graphs_alive == 0
        assert fake.cudart.captured_graphs == 0  # the captured (unusable) graph was destroyed
        assert fake.cudart.last_error_reads == 1  # the capture error was cleared, once; no capture retried


def test_stream_handle_is_the_handle_not_the_object_address():
    class Stream:  # cuda-python's cudaStream_t: int() is the handle, getPtr() the address of its storage
        def __int__(self):
            return 0xABC

        def getPtr(self):
            return 0x1234

    assert trt_engine.stream_handle(Stream()) == 0xABC and trt_engine.stream_handle(7) == 7


def test_dynamic_plans_run_without_graphs(fake):
    add_plan(fake.model, dynamic=True, min_size=16, max_size=64)
    with create_engine("tensorrt", fake.onnx, component="unet", cuda_graph=True) as eng:
        for _ in range(3):
            eng.run(feeds())
        assert eng.stats()["cuda_graphs"] == 0


def test_closed_engine_refuses_to_run(fake):
    add_plan(fake.model)
    eng = create_engine("tensorrt", fake.onnx, component="unet")
    eng.run(feeds())
    eng.close()
    eng.close()
    with pytest.raises(EngineUnavailableError, match="closed"):
        eng.run(feeds())
    assert not fake.cudart.device and not fake.cudart.host


def test_close_while_a_run_waits_for_the_lock(fake):
    add_plan(fake.model)
    eng = create_engine("tensorrt", fake.onnx, component="unet")
    errors = []

    def run():
        try:
            eng.run(feeds())
        except Exception as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    with eng._dev.lock:  # as if another run were in progress
        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.2)  # the run now waits for the lock
        eng.close()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], EngineUnavailableError) and "closed" in str(errors[0])
    assert not fake.cudart.device and not fake.cudart.host and fake.cudart.streams == 0
