"""``edgediff build`` and the TensorRT engine, on CPU, against a strict stand-in for cuda-python and
TensorRT: "device" memory is host memory, a plan is a JSON recipe (``out_sample = sample * scale +
timestep + mean(encoder_hidden_states)``) and the stand-in checks what TensorRT requires of us:

- a context runs only with a shape set for every dynamic input, inside the active profile;
  switching profiles forgets the shapes (as TensorRT documents), so they must be set again;
- every bound address is a live allocation large enough for the current shape (a buffer that
  grew and moved must be re-bound); the result is computed from the bound addresses, so a
  stale input shows in the output;
- two threads never interleave their copy-in..sync on one engine's stream.

What this proves is our logic only: builder and engine agree on profiles, keys and build.json,
one plan per component and setup, profile selection, buffer growth, ``stats()``, ``close()``
freeing every allocation. It proves nothing about TensorRT or CUDA themselves: the marked tests in
test_tensorrt.py do, on a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff.engines import tensorrt as trt_engine
from edgediff.engines import tensorrt_build
from edgediff.engines import trt_plans as plans
from edgediff.runtime.engine import create_engine
from edgediff.runtime.errors import BuildError, EngineUnavailableError, PlanError, ResourceError

OK = 0
COPY_MS, EXECUTE_MS = 1.0, 10.0  # the stand-in stream's clock: each copy and each execution takes this long
MICRO = Path(__file__).parent / "fixtures" / "micro-sd1"  # latent 16x16, text 77x16, fp32 ONNX


class FakeCudart:
    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self.device, self.host = {}, {}  # address -> ctypes buffer
        self.mallocs = 0
        self.streams: dict[int, threading.Thread | None] = {}  # handle -> thread between its first copy and sync
        self.events = 0
        self.interleaved = 0
        self.clock: dict[int, float] = {}  # stream -> milliseconds of work enqueued on it so far

    def cudaGetDeviceCount(self):
        return (OK, 1)

    def cudaGetDeviceProperties(self, i):
        return (OK, SimpleNamespace(name=b"Fake GPU", major=8, minor=9))

    def cudaSetDevice(self, i):
        return (OK,)

    def cudaMemGetInfo(self):
        return (OK, 1 << 30, 1 << 31)

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

    def enqueue(self, stream):
        """Work from one thread on ``stream`` until its sync; another thread's work there is an interleaving."""
        owner = self.streams[stream]
        if owner is not None and owner is not threading.current_thread():
            self.interleaved += 1
        self.streams[stream] = threading.current_thread()
        time.sleep(0)  # let another thread in here, as a real driver call would

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.enqueue(stream)
        table = self.device if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else self.host
        live = table.get(dst) if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else None
        assert live is None or len(live) >= n, "copy past the end of a device buffer"
        ctypes.memmove(dst, src, n)
        self.clock[stream] += COPY_MS
        return (OK,)

    def cudaStreamCreate(self):
        handle = 1000 + len(self.streams)
        self.streams[handle] = None
        self.clock[handle] = 0.0
        return (OK, handle)

    def cudaStreamDestroy(self, s):
        del self.streams[s]
        return (OK,)

    def cudaStreamSynchronize(self, s):
        self.streams[s] = None
        return (OK,)

    def cudaEventCreate(self):
        self.events += 1
        return (OK, SimpleNamespace(at=None))

    def cudaEventRecord(self, ev, s):
        ev.at = self.clock[s]
        return (OK,)

    def cudaEventElapsedTime(self, a, b):
        assert a.at is not None and b.at is not None, "elapsed time of an event never recorded"
        return (OK, b.at - a.at)

    def cudaEventDestroy(self, ev):
        self.events -= 1
        return (OK,)


# ------------------------------------------------------------------------------ TensorRT stand-in


class FakeContext:
    def __init__(self, engine):
        self.engine, self.cudart = engine, engine.cudart
        self.scratch = self.cudart.cudaMalloc(engine.device_memory_size_v2)[1]  # STATIC: its own scratch
        self.profile = 0
        self.shapes, self.addresses = {}, {}
        self.executions = 0
        self.switches = 0

    def __del__(self):
        self.cudart.device.pop(self.scratch, None)

    def set_optimization_profile_async(self, index, stream):
        assert isinstance(stream, int)
        if not 0 <= index < len(self.engine.profiles):
            return False
        self.profile, self.shapes = index, {}  # switching invalidates the input shapes
        self.switches += 1
        return True

    def set_input_shape(self, name, shape):
        lo, hi = self.engine.profiles[self.profile][name]
        if not (len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def _symbols(self):
        values = {}
        for name, _, dims in self.engine.inputs:
            for d, v in zip(dims, self.shapes.get(name, dims)):
                if isinstance(d, str):
                    values[d] = v
        return values

    def get_tensor_shape(self, name):
        dims = next(d for n, _, d in (*self.engine.inputs, *self.engine.outputs) if n == name)
        values = self._symbols()
        return tuple(values.get(d, -1) if isinstance(d, str) else d for d in dims)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def _array(self, name):
        shape = self.get_tensor_shape(name)
        n = int(np.prod(shape))
        ptr = self.addresses[name]
        assert ptr in self.cudart.device, f"{name}: bound to freed or foreign memory"
        assert len(self.cudart.device[ptr]) >= 4 * n, f"{name}: bound buffer is smaller than {list(shape)}"
        return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape)

    def execute_async_v3(self, stream):
        self.cudart.enqueue(stream)
        assert self.scratch in self.cudart.device
        for name, _, dims in self.engine.inputs:
            if any(isinstance(d, str) for d in dims):
                assert name in self.shapes, f"{name}: no shape set for profile {self.profile}"
        x, t, e = self._array("sample"), self._array("timestep"), self._array("encoder_hidden_states")
        self._array("out_sample")[...] = x * self.engine.scale + t + e.mean(axis=(1, 2))[:, None, None, None]
        self.executions += 1
        self.cudart.clock[stream] += EXECUTE_MS
        return True


class FakeEngine:
    def __init__(self, cudart, recipe):
        self.cudart, self.scale = cudart, recipe["scale"]
        self.device_memory_size_v2 = recipe["scratch"]
        self.inputs = [(t["name"], True, tuple(t["shape"])) for t in recipe["inputs"]]
        self.outputs = [(t["name"], False, tuple(t["shape"])) for t in recipe["outputs"]]
        self.profiles = recipe["profiles"]  # [{name: (min, max)}]
        self.no_context = recipe.get("no_context", False)

    num_io_tensors = property(lambda self: len(self.inputs) + len(self.outputs))

    def get_tensor_name(self, i):
        return [*self.inputs, *self.outputs][i][0]

    def _find(self, name):
        return next(t for t in (*self.inputs, *self.outputs) if t[0] == name)

    def get_tensor_mode(self, name):
        return "in" if self._find(name)[1] else "out"

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_shape(self, name):
        return tuple(-1 if isinstance(d, str) else d for d in self._find(name)[2])

    def create_execution_context(self):
        return None if self.no_context else FakeContext(self)


class FakeNetwork:
    """The ONNX graph as TensorRT's parser would present it: the manifest's I/O, symbols as -1."""

    num_layers = 0

    def __init__(self, flags):
        self.flags, self.io = flags, None

    num_inputs = property(lambda self: len(self.io["inputs"]))

    def get_input(self, i):
        t = self.io["inputs"][i]
        return SimpleNamespace(name=t["name"], dtype=np.float32,
                               shape=tuple(-1 if isinstance(d, str) else d for d in t["shape"]))  # fmt: skip


class FakeConfig:
    def __init__(self):
        self.flags, self.profiles, self.pool = set(), [], None
        self.builder_optimization_level = None
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool, size):
        self.pool = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        return SimpleNamespace(serialize=lambda: b"timings")

    def set_timing_cache(self, cache, ignore_mismatch):
        return True

    def get_timing_cache(self):
        return SimpleNamespace(serialize=lambda: b"timings")


def make_fake_trt(cudart, version="10.8.0.43", scale=2.0, scratch=1000):
    built = []  # (flags, config) of every build, for the tests to inspect

    class Logger:
        WARNING, INFO = 2, 3

        def __init__(self, severity):
            self.min_severity = severity

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return FakeEngine(cudart, json.loads(data))
            except ValueError:
                return None  # TensorRT answers None (and logs) for a plan it cannot read

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (list(lo), list(hi))

    class Parser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            manifest = json.loads((Path(path).parent.parent / "edgediff.json").read_text())
            self.network.io = manifest["components"][Path(path).parent.name]
            return True

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(FakeNetwork)
        create_builder_config = staticmethod(FakeConfig)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            built.append((network.flags, config))
            io = network.io
            static = {t["name"]: ([], []) for t in io["inputs"]}
            recipe = {"scale": scale, "scratch": scratch, "inputs": io["inputs"], "outputs": io["outputs"],
                      "profiles": config.profiles or [static]}  # fmt: skip
            return json.dumps(recipe).encode()

    return SimpleNamespace(
        __version__=version, Logger=Logger, Runtime=Runtime, Builder=Builder, OnnxParser=Parser, nptype=np.dtype,
        TensorIOMode=SimpleNamespace(INPUT="in"), NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=5),
        BuilderFlag=SimpleNamespace(FP16="fp16"), MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
        DataType=SimpleNamespace(HALF="half"), built=built,
    )  # fmt: skip


@pytest.fixture
def fake(tmp_path, monkeypatch):
    cudart = FakeCudart()
    trt = make_fake_trt(cudart)
    for module in (trt_engine, tensorrt_build):
        monkeypatch.setattr(module, "import_cudart", lambda: cudart)
        monkeypatch.setattr(module, "import_tensorrt", lambda: trt)
    model = tmp_path / "model"
    shutil.copytree(MICRO, model)
    yield SimpleNamespace(cudart=cudart, trt=trt, model=model, onnx=model / "unet" / "model.onnx")
    assert not cudart.device and not cudart.host, "an engine was left open"


def build(fake, **options):
    [result] = tensorrt_build.build_model(fake.model, ["unet"], plans.ProfileOptions(**options), opt_level=2)
    return result


def feeds(batch=2, h=16, w=16, t=10.0, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 4, h, w)).astype(np.float32),
        "timestep": np.float32(t),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 16)).astype(np.float32),
    }


def expected(f, scale=2.0):
    return f["sample"] * scale + f["timestep"] + f["encoder_hidden_states"].mean(axis=(1, 2))[:, None, None, None]


def plan_dirs(model):
    return sorted(p.name for p in (model / "engines").iterdir() if p.is_dir())


# ------------------------------------------------------------------------------ build


def test_build_writes_one_keyed_plan_with_the_static_profile(fake):
    result = build(fake)
    assert result.status == "built" and plan_dirs(fake.model) == [result.key]
    record = plans.read_build_json(result.path)
    assert record.profiles == [{"sample": ((2, 4, 16, 16),) * 3, "timestep": ((), (), ()),
                                "encoder_hidden_states": ((2, 77, 16),) * 3}]  # fmt: skip
    assert record.device_memory_bytes == 1000 and record.build["fp16_flag"] and not record.build["strongly_typed"]
    flags, config = fake.trt.built[-1]
    assert flags == 0 and config.flags == {"fp16"}  # TensorRT 10.8 + fp32 ONNX: the FP16 builder flag
    assert config.profiles == [{"sample": ([2, 4, 16, 16], [2, 4, 16, 16]),
                                "encoder_hidden_states": ([2, 77, 16], [2, 77, 16])}]  # fmt: skip
    assert (fake.model / "engines" / "timing-trt10.8.0.43-sm89.cache").read_bytes() == b"timings"
    assert build(fake).status == "up to date" and len(fake.trt.built) == 1


def test_dynamic_build_adds_a_range_profile_after_the_static_one(fake):
    record = plans.read_build_json(build(fake, dynamic=True, max_size=64, max_batch=2).path)
    static, dynamic = record.profiles
    assert static["sample"] == ((2, 4, 16, 16),) * 3
    assert dynamic["sample"] == ((1, 4, 16, 16), (2, 4, 16, 16), (4, 4, 32, 32))  # 32..64 px, 1..2 x2
    assert len(fake.trt.built[-1][1].profiles) == 2


def test_a_build_replaces_this_setups_plan_and_prune_removes_other_setups(fake, monkeypatch):
    guided = build(fake)
    other_gpu = make_fake_trt(fake.cudart, version="10.3.0.30")
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: other_gpu)
    jetson_like = build(fake)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: fake.trt)
    unguided = build(fake, guidance=False)
    assert plan_dirs(fake.model) == sorted([jetson_like.key, unguided.key])  # the guided plan was replaced
    assert guided.key != unguided.key
    tensorrt_build.build_model(fake.model, ["unet"], plans.ProfileOptions(guidance=False), prune=True)
    assert plan_dirs(fake.model) == [unguided.key]


def test_trt11_refuses_an_fp32_export_before_building(fake, monkeypatch):
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: make_fake_trt(fake.cudart, version="11.0.0"))
    with pytest.raises(BuildError, match=r"edgediff export SOURCE OUT --fp16"):
        build(fake)
    assert not (fake.model / "engines").exists()


def test_strongly_typed_from_10_12_with_an_fp16_export(fake, monkeypatch):
    manifest = json.loads((fake.model / "edgediff.json").read_text())
    for c in manifest["components"].values():
        c["precision"] = "fp16"  # the stand-in parser reads only the manifest; the ONNX stays as it is
    (fake.model / "edgediff.json").write_text(json.dumps(manifest))
    trt = make_fake_trt(fake.cudart, version="10.12.0.36")
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
    record = plans.read_build_json(build(fake).path)
    flags, config = trt.built[-1]
    assert flags == 1 << 5 and config.flags == set() and record.build["strongly_typed"]


def test_cli_build_with_the_stand_in(fake):
    from edgediff.runtime.cli import main

    result = CliRunner().invoke(main, ["build", str(fake.model), "--component", "unet", "--dynamic",
                                       "--max-size", "64"])  # fmt: skip
    assert result.exit_code == 0, result.output
    [key] = plan_dirs(fake.model)
    assert f"unet: built in 0 s -> {fake.model / 'engines' / key}" in result.output
    assert "building unet (fp16, sample [2, 4, 16, 16]" in result.output  # the announce line


# ------------------------------------------------------------------------------ run


def test_run_reuses_buffers_and_returns_copies(fake):
    build(fake)
    with create_engine("tensorrt", fake.onnx, component="unet") as eng:
        # the plan's dynamic dims carry the contract's symbols (this older fixture's ONNX says "C")
        assert eng.inputs["sample"].shape == ("B", "C_in", "h", "w") and eng.outputs["out_sample"].dtype == np.float32
        f1, f2 = feeds(seed=1), feeds(seed=2, t=3.0)
        out1 = eng.run(f1)["out_sample"]
        mallocs = fake.cudart.mallocs
        out2 = eng.run(f2)["out_sample"]
        assert fake.cudart.mallocs == mallocs  # same shapes: no new allocation
        np.testing.assert_allclose(out1, expected(f1), rtol=1e-6)  # out1 was a copy, still intact
        np.testing.assert_allclose(out2, expected(f2), rtol=1e-6)
        stats = eng.stats()
        # the events split each call into its execution and its copies: 3 inputs in, 1 output out
        assert stats["compute_ms"] == [EXECUTE_MS] * 2 and stats["copy_ms"] == [4 * COPY_MS] * 2
        assert stats["scratch_bytes"] == 1000 and stats["profile"] == 0
        assert stats["io_bytes"] == 2 * (2 * 4 * 16 * 16 * 4) + 4 + 2 * 77 * 16 * 4
    assert fake.cudart.streams == {} and fake.cudart.events == 0


def test_dynamic_plan_switches_profiles_and_shapes_a_b_a(fake):
    build(fake, dynamic=True, max_size=64, max_batch=2)
    a, b, c = feeds(seed=1), feeds(batch=1, h=24, w=20, seed=2, t=7.0), feeds(batch=4, h=32, w=32, seed=3)
    with create_engine("tensorrt", fake.onnx, component="unet") as eng:
        ctx = eng._context
        for f, profile in ((a, 0), (b, 1), (a, 0), (c, 1), (a, 0), (b, 1)):  # B and C move the buffers
            np.testing.assert_allclose(eng.run(f)["out_sample"], expected(f), rtol=1e-6)
            assert ctx.profile == profile and eng.stats()["profile"] == profile  # exact shapes: the static one
        assert ctx.switches == 5 and ctx.executions == 6


def test_a_shape_no_profile_takes_names_them_and_the_build_command(fake):
    build(fake)
    with create_engine("tensorrt", fake.onnx, component="unet") as eng:
        with pytest.raises(PlanError, match=r"profile 0 \(sample \[2, 4, 16, 16\].*'sample' is \[1, 4, 16, 16\]"
                                            r".*edgediff build .*--no-guidance.*--dynamic"):  # fmt: skip
            eng.run(feeds(batch=1))
        np.testing.assert_allclose(eng.run(feeds())["out_sample"], expected(feeds()), rtol=1e-6)  # still usable


def test_threads_share_one_engine(fake):
    build(fake, dynamic=True, max_size=64, max_batch=2)
    errors = []
    with create_engine("tensorrt", fake.onnx, component="unet") as eng:

        def work(seed, h):
            try:
                for i in range(30):
                    f = feeds(h=h, seed=seed + i)
                    np.testing.assert_allclose(eng.run(f)["out_sample"], expected(f), rtol=1e-6)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(100 * k, 16 + 4 * k)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors[0]
    assert fake.cudart.interleaved == 0


def test_closed_engine_refuses_to_run(fake):
    build(fake)
    eng = create_engine("tensorrt", fake.onnx, component="unet")
    eng.run(feeds())
    buffers = list(eng._buffers.values())  # held here, so only an explicit free() releases them
    eng.close()
    eng.close()
    assert all(b.device is None and b.host is None for b in buffers)
    with pytest.raises(EngineUnavailableError, match="closed"):
        eng.run(feeds())
    assert not fake.cudart.device and not fake.cudart.host and fake.cudart.streams == {}


def test_close_while_a_run_waits_for_the_lock(fake):
    build(fake)
    eng = create_engine("tensorrt", fake.onnx, component="unet")
    eng._lock = threading.RLock()  # so this thread can close while it holds the lock, as a run in progress would
    errors = []

    def run():
        try:
            eng.run(feeds())
        except Exception as e:
            errors.append(e)

    with eng._lock:
        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.2)  # the run now waits for the lock (if not, it finds the engine closed all the same)
        eng.close()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], EngineUnavailableError) and "closed" in str(errors[0])
    assert not fake.cudart.device and not fake.cudart.host and fake.cudart.streams == {}


def test_unreadable_plan_is_refused_with_the_rebuild_command(fake):
    result = build(fake)
    plan = result.path / "unet.plan"
    plan.write_bytes(b"x" * plan.stat().st_size)  # same size, not a plan
    with pytest.raises(PlanError, match=rf"cannot deserialise .*edgediff build {fake.model}` --force"):
        create_engine("tensorrt", fake.onnx, component="unet")


def test_failed_context_frees_what_the_load_took(fake):
    result = build(fake)
    plan = result.path / "unet.plan"
    recipe = json.loads(plan.read_text())
    plan.write_text(json.dumps({**recipe, "no_context": True}))
    record = plans.read_build_json(result.path)
    record.plan_bytes = plan.stat().st_size
    plans.write_build_json(result.path, record)
    with pytest.raises(ResourceError, match=r"execution context .* 1000 bytes of scratch.*low_memory=True"):
        create_engine("tensorrt", fake.onnx, component="unet")
    assert fake.cudart.streams == {} and fake.cudart.events == 0


def test_tensorrt_before_10_is_refused(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(EngineUnavailableError, match=r"TensorRT 8\.6\.1 is too old.*>= 10.*onnxruntime"):
        tensorrt_build.import_tensorrt()


def test_stream_handle_is_the_handle_not_the_object_address():
    class Stream:  # cuda-python's cudaStream_t: int() is the handle, getPtr() the address of its storage
        def __int__(self):
            return 0xABC

        def getPtr(self):
            return 0x1234

    assert trt_engine.stream_handle(Stream()) == 0xABC and trt_engine.stream_handle(7) == 7
