"""OpenVINO engine: the model folder's ONNX, compiled by OpenVINO for a device; numpy in and numpy out.

    eng = OvEngine("MODEL/unet/model.onnx", component="unet")                    # CPU, f32
    eng = OvEngine("MODEL/unet/model.onnx", component="unet", precision="bf16")  # opt-in: changes the image
    pipe = Pipeline.load(MODEL, engine="openvino", device="GPU", precision="f16")

It reads the exported ONNX file itself (OpenVINO's ONNX frontend), so there is no second export
format to keep in sync; only derived files (the compiled-model cache, the int8 variant) are kept
beside it, each with a key that must match.

Options (keyword arguments; also reachable from ``Pipeline.load(engine="openvino", ...)``):

- ``device``: an OpenVINO device name, ``CPU`` (default), ``GPU`` / ``GPU.1`` (Intel integrated or
  discrete graphics), ``NPU`` (Intel laptop NPUs), ``AUTO``. A name this machine's OpenVINO does not
  have is refused with the list of the ones it has. Only ``CPU`` is tested here.
- ``precision``: the inference precision, set explicitly on every compile (OpenVINO's own default on
  CPUs with AVX512_BF16 or AMX is bf16, which changes the image; edgediff never lets that happen
  unasked). ``f32`` (default; image-equal to diffusers within the usual tolerance), ``bf16``
  (opt-in; needs a CPU with AVX512_BF16 or AMX: elsewhere OpenVINO would emulate it slowly, so it
  is refused), ``f16`` (GPU and NPU devices, and CPUs that list FP16).
- ``threads``: inference threads (``INFERENCE_NUM_THREADS``; default OpenVINO's: one per core).
- ``shapes``: ``static`` (default) compiles the model for the shapes of the request (and again when
  they change: a new size or batch); ``dynamic`` compiles once for any shape. Static shapes let the
  CPU plugin pick its kernels and memory plan for the exact sizes: ``benchmarks/results`` has the
  measurement this default follows.
- ``cache``: keep OpenVINO's compiled models on disk so the next process loads a compiled blob
  instead of converting and compiling again. Default: on for GPU and NPU devices (where compiling
  takes long), off for the CPU, where it is slower than compiling: on the SD 1.5 UNet at 256 px
  compiling from the ONNX file took 2.4 s, writing the cache added 8 s to the first call and a
  cached load took 2.8 s at a higher peak memory (9.8 vs 6.7 GiB; benchmarks/results). The cache
  lives in ``MODEL/openvino-cache/<component>/`` (or, where the model folder is not writable, under
  the user's cache directory), with ``key.json``: the model file's identity (size, mtime), the
  OpenVINO version, the device, the precision, the CPU. A cache whose key does not match is
  emptied and rebuilt, never used.
- ``cpu_variant``: ``auto`` / ``off`` (the exported graph; accepted so a call written for ONNX
  Runtime keeps working) or ``int8``: the UNet that ``edgediff optimize --int8 static`` quantised
  with NNCF for OpenVINO (``MODEL/openvino-int8/unet/``); an error names the command when it is
  missing or stale.

- ``weights``: ``{initializer name: array}`` replacing the graph's own (the LoRA-merged weights of
  ``edgediff.runtime.lora_apply``). OpenVINO's ONNX frontend names each weight's Constant after its
  initializer, so each one is swapped in the read model before compiling; a name or shape the graph lacks is
  refused. With ``weights`` the compiled-model cache is off (its key does not cover them) and the int8 variant,
  whose weights are quantized, is refused.

``providers`` (an ONNX Runtime option) is refused with the OpenVINO equivalent (``device``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgediff.runtime.engine import check_feed
from edgediff.runtime.errors import (
    EngineRunError,
    EngineUnavailableError,
    InvalidArgumentError,
    ModelFolderError,
    ResourceError,
)
from edgediff.runtime.measure import best_seconds
from edgediff.runtime.specs import TensorSpec

from .variants import matching, read_key, source_identity, stale_entries

try:
    import openvino as ov
except ImportError as e:
    raise EngineUnavailableError(
        "OpenVINO is not installed: pip install 'edgediff[openvino]' (engine='openvino', --engine openvino)"
    ) from e

logger = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16", "f16")
SHAPES = ("static", "dynamic")
CACHE_DIR = "openvino-cache"
INT8_DIR = "openvino-int8"
KEY_FILE = "key.json"
# The capability each precision needs in OPTIMIZATION_CAPABILITIES (f32 needs none)
_CAPABILITY = {"bf16": "BF16", "f16": "FP16"}
_CORE: ov.Core | None = None
_CORE_LOCK = threading.Lock()


def core() -> ov.Core:
    """One OpenVINO Core per process (it holds the loaded device plugins)."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = ov.Core()
        return _CORE


def check_device(device: str) -> None:
    """Refuse a device name this machine's OpenVINO does not have, naming the ones it has."""
    if not isinstance(device, str) or not device:
        raise InvalidArgumentError(f"device must be an OpenVINO device name such as 'CPU', got {device!r}")
    available = core().available_devices  # e.g. ['CPU', 'GPU.0', 'GPU.1', 'NPU']
    base = device.split(":")[0]  # AUTO:GPU,CPU / HETERO:GPU,CPU take a list after the colon
    if base in ("AUTO", "HETERO", "MULTI"):
        wanted = [d for d in device.partition(":")[2].split(",") if d]
    else:
        wanted = [device]
    names = set(available) | {d.split(".")[0] for d in available}  # "GPU" names the first GPU.N
    missing = [d for d in wanted if d not in names]
    if missing:
        raise EngineUnavailableError(
            f"OpenVINO has no device {', '.join(map(repr, missing))} on this machine; it has "
            f"{', '.join(available) or 'none'} (GPU needs Intel graphics and its driver, NPU an Intel NPU and "
            "its driver)"
        )


def check_precision(device: str, precision: str) -> None:
    """Refuse a precision the device cannot run natively (OpenVINO would emulate bf16 slowly, or ignore it)."""
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    need = _CAPABILITY.get(precision)
    if need is None or device.split(":")[0] in ("AUTO", "HETERO", "MULTI"):
        return
    capabilities = core().get_property(device, "OPTIMIZATION_CAPABILITIES")
    native = need in capabilities
    if native and device.startswith("CPU") and precision == "bf16":
        native = _cpu_has_bf16()
    if not native:
        what = "AVX512_BF16 or AMX" if precision == "bf16" else "FP16 arithmetic"
        raise InvalidArgumentError(
            f"precision {precision!r}: the {device} device here has no {what} (it lists "
            f"{', '.join(capabilities)}); OpenVINO would emulate it, slower than f32. Use precision='f32' "
            "(--precision f32), or int8 for speed"
        )


@functools.cache
def _cpu_has_bf16() -> bool:
    from edgediff.runtime.measure import machine_info

    flags = set(machine_info()["flags"])
    return bool(flags & {"avx512_bf16", "amx_bf16"}) or not flags  # no /proc/cpuinfo: trust OpenVINO


def _port_name(port) -> str:
    """The ONNX graph's name of a model input or output. A port can carry several tensor names (the ONNX
    frontend keeps internal ones such as "/text_model/Gather_5_output_0" beside the graph output's, and
    compiling merges more): prefer a name that is not an internal "/node/..." path."""
    names = sorted(port.get_names(), key=lambda n: (n.startswith("/"), n))
    return names[0] if names else port.get_any_name()


def _spec(port) -> TensorSpec:
    name = _port_name(port)
    try:
        dtype = np.dtype(port.get_element_type().to_dtype())
    except Exception as e:  # an element type numpy has no dtype for
        raise EngineUnavailableError(f"tensor {name!r} has unsupported type {port.get_element_type()}") from e
    shape = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
    return TensorSpec(name, dtype, shape)


def cache_key(path: Path, device: str, precision: str) -> dict:
    from edgediff.runtime.measure import machine_info

    m = machine_info()
    return {"source": source_identity(path), "openvino": ov.get_version(), "device": device,
            "precision": precision, "cpu": m["cpu"], "flags": m["flags"]}  # fmt: skip


def cache_folder(path: Path, component: str) -> Path:
    """``MODEL/openvino-cache/<component>`` when the model folder is writable, else a folder under the user's
    cache directory named after the model file's absolute path."""
    model_dir = path.parent.parent
    if os.access(model_dir, os.W_OK):
        return model_dir / CACHE_DIR / component
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgediff" / "openvino"
    return base / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16] / component


def _prepare_cache(folder: Path, key: dict) -> Path | None:
    """The cache folder, emptied first when its key does not match; None when it cannot be written."""
    key_path = folder / KEY_FILE
    recorded = read_key(key_path)
    try:
        if recorded != key:
            if recorded is not None:
                stale = stale_entries(recorded, key)
                logger.info("%s: compiled-model cache made for another %s; rebuilding it", folder, ", ".join(stale))
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = key_path.with_name(f".{KEY_FILE}.{os.getpid()}")
            tmp.write_text(json.dumps(key, indent=1) + "\n")
            os.replace(tmp, key_path)
        return folder
    except OSError as e:
        logger.warning("%s: cannot write the OpenVINO cache (%s); compiling without it", folder, e)
        return None


def int8_key(source: Path) -> dict:
    """What an NNCF int8 variant of ``source`` must have been made from to be used."""
    return {"source": source_identity(source), "openvino": ov.get_version().split("-")[0]}


def int8_variant(path: Path, component: str) -> Path | None:
    """The NNCF int8 IR ``edgediff optimize --int8 static`` made from ``path``, None if missing or stale."""
    folder = path.parent.parent / INT8_DIR / component
    current = int8_key(path)
    if not matching(folder / KEY_FILE, current, component, "int8 variant", "edgediff optimize --int8 static"):
        return None
    return folder / "model.xml"


_ALLOCATION_FAILURES = ("bad_alloc", "out of memory", "cannot allocate", "failed to allocate")


def _first_line(e: BaseException, limit: int = 300) -> str:
    """OpenVINO's message without its "Exception from src/...cpp:N:" location lines."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Exception from ")]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


class OvEngine:
    # what an image's record keeps when the caller left them to the defaults (same record, same pixels)
    RECORDED_DEFAULTS = {"device": "CPU", "precision": "f32"}

    def __init__(
        self,
        path: str | os.PathLike,
        component: str = "model",
        device: str = "CPU",
        precision: str = "f32",
        threads: int | None = None,
        shapes: str = "static",
        cache: bool | None = None,
        cpu_variant: str = "auto",
        weights: Mapping[str, np.ndarray] | None = None,
        providers=None,
    ):
        self.component = component
        path = Path(path)
        if providers is not None:
            raise InvalidArgumentError(
                f"providers={list(providers)!r} is an ONNX Runtime option; OpenVINO picks a device instead: "
                "device='CPU' | 'GPU' | 'NPU' (CLI: --device)"
            )
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidArgumentError(f"threads must be a positive integer, got {threads!r}")
        if shapes not in SHAPES:
            raise InvalidArgumentError(f"shapes must be 'static' or 'dynamic', got {shapes!r}")
        if cpu_variant not in ("auto", "off", "int8"):
            raise InvalidArgumentError(f"cpu_variant must be 'auto', 'off' or 'int8', got {cpu_variant!r}")
        check_device(device)
        check_precision(device, precision)
        self.device, self.precision, self.shapes = device, precision, shapes
        if weights and cpu_variant == "int8":
            from edgediff.runtime.lora_apply import int8_refusal

            raise int8_refusal(component)
        if cpu_variant == "int8" and component in INT8_COMPONENTS:
            variant = int8_variant(path, component)
            if variant is None:
                raise ModelFolderError(
                    f"no int8 variant of {path} for this OpenVINO version: run `edgediff optimize "
                    f"{path.parent.parent} --int8 static` first, or leave int8 off"
                )
            path = variant
        self.model_file = path
        self.config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if device.startswith("CPU"):
            self.config["NUM_STREAMS"] = 1
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.cache_dir = None
        if cache is None:
            cache = not device.startswith("CPU")
        if weights:
            cache = False  # the cache's key does not cover replaced weights
        if cache:
            self.cache_dir = _prepare_cache(cache_folder(path, component), cache_key(path, device, precision))
            if self.cache_dir is not None:
                self.config["CACHE_DIR"] = str(self.cache_dir)
        self._model = self._read(path)
        self._weights = dict(weights or {})  # kept: the replacing Constants share their memory
        if self._weights:
            self._replace_weights(self._model, self._weights)
        self.inputs = {s.name: s for s in map(_spec, self._model.inputs)}
        self.outputs = {s.name: s for s in map(_spec, self._model.outputs)}
        self._output_names = list(self.outputs)  # by index: the compiled model's ports carry merged names
        self._lock = threading.Lock()
        self._closed = False
        self._compiled: tuple[tuple, ov.CompiledModel, ov.InferRequest] | None = None
        if shapes == "dynamic":
            self._compiled = ((), *self._compile(self._model))
            self._model = None  # the compiled model holds what it needs; drop the converted copy

    def _read(self, path: Path) -> ov.Model:
        try:
            return core().read_model(str(path))
        except Exception as e:
            reason = f"{type(e).__name__}: {_first_line(e)}"
            if any(m in str(e).lower() for m in _ALLOCATION_FAILURES):
                raise ResourceError(f"{self.component}: not enough memory to load {path} ({reason})") from e
            raise ModelFolderError(
                f"{self.component}: OpenVINO cannot read {path} ({reason}); the file is damaged or incomplete: "
                "re-export the model"
            ) from e

    def _replace_weights(self, model: ov.Model, weights: Mapping[str, np.ndarray]) -> None:
        constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
        for name, value in weights.items():
            old = constants.get(name)
            if old is None or tuple(old.get_output_shape(0)) != value.shape or (
                    old.get_element_type().to_dtype() != value.dtype):  # fmt: skip
                found = "absent" if old is None else f"{list(old.get_output_shape(0))} {old.get_element_type()}"
                raise ModelFolderError(
                    f"{self.component}: the LoRA-merged weight {name!r} ({list(value.shape)} {value.dtype}) does not "
                    f"fit {self.model_file} (there: {found}); remake its weights map with `edgediff weights-map "
                    f"{self.model_file.parent.parent} SOURCE`"
                )
            new = ov.op.Constant(np.ascontiguousarray(value), shared_memory=True)
            new.set_friendly_name(name)
            old.output(0).replace(new.output(0))

    def _compile(self, model: ov.Model) -> tuple[ov.CompiledModel, ov.InferRequest]:
        try:
            compiled = core().compile_model(model, self.device, self.config)
        except Exception as e:
            reason = f"{type(e).__name__}: {_first_line(e)}"
            if any(m in str(e).lower() for m in _ALLOCATION_FAILURES):
                raise ResourceError(f"{self.component}: not enough memory to compile {self.model_file} for "
                                    f"{self.device} ({reason})") from e  # fmt: skip
            raise EngineRunError(f"{self.component}: OpenVINO cannot compile {self.model_file} for {self.device} "
                                 f"({reason})") from e  # fmt: skip
        return compiled, compiled.create_infer_request()

    def _request(self, checked: Mapping[str, np.ndarray]) -> ov.InferRequest:
        """The infer request for these shapes: static shapes recompile when the shapes change."""
        signature = tuple((k, v.shape) for k, v in checked.items()) if self.shapes == "static" else ()
        if self._compiled is not None and self._compiled[0] == signature:
            return self._compiled[2]
        self._compiled = None  # release the old compiled model before compiling the next
        model = self._model
        if model is None:  # read again (the converted copy went with the last compile), the LoRA weights too
            model = self._read(self.model_file)
            if self._weights:
                self._replace_weights(model, self._weights)
        self._model = None
        try:
            model.reshape({k: ov.PartialShape(list(v.shape)) for k, v in checked.items()})
        except Exception as e:
            raise EngineRunError(f"{self.component}: OpenVINO cannot reshape the model to "
                                 f"{dict(signature)} ({_first_line(e)})") from e  # fmt: skip
        compiled, request = self._compile(model)
        del model
        self._compiled = (signature, compiled, request)
        return request

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feed(self.component, self.inputs, feeds)
        with self._lock:
            if self._closed:
                raise EngineRunError(f"{self.component}: the engine is closed")
            try:
                request = self._request(checked)
                result = request.infer(dict(checked), share_inputs=True, share_outputs=False)
            except (EngineRunError, ResourceError):
                raise
            except Exception as e:
                shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in checked.items())
                if any(m in str(e).lower() for m in _ALLOCATION_FAILURES):
                    raise ResourceError(f"{self.component} ran out of memory on inputs {shapes} ({_first_line(e)}); "
                                        "reduce the width/height or the number of images") from e  # fmt: skip
                raise EngineRunError(
                    f"{self.component} failed in OpenVINO on inputs {shapes}: {_first_line(e)}"
                ) from e
            return {name: np.asarray(result[i]) for i, name in enumerate(self._output_names)}

    def close(self) -> None:
        with self._lock:
            self._compiled = None
            self._model = None
            self._weights = {}
            self._closed = True

    @property
    def compiled_model(self) -> ov.CompiledModel | None:
        """The compiled model of the last call's shapes (at load for ``shapes="dynamic"``), None before."""
        return self._compiled[1] if self._compiled is not None else None

    @property
    def request(self) -> ov.InferRequest | None:
        """Its infer request (profiling info, with ``PERF_COUNT``), None before the first compile."""
        return self._compiled[2] if self._compiled is not None else None

    @staticmethod
    def gemm_gflops(precision: str = "f32", threads: int | None = None) -> float:
        return gemm_gflops(precision, threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


INT8_COMPONENTS = ("unet",)


def gemm_gflops(precision: str = "f32", threads: int | None = None, n: int = 2048, repeats: int = 5) -> float:
    """Achieved GFLOP/s of OpenVINO's CPU matrix product at ``precision`` (``f32``, ``bf16``, or ``int8``:
    FakeQuantize on both operands, which OpenVINO runs as an int8 GEMM): the ceiling ``edgediff bench``
    sets a UNet's rate against when it ran at that precision. Best of ``repeats`` n x n products."""
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], np.float32, name="a")
    b = ops.constant(rng.standard_normal((n, n)).astype(np.float32))
    if precision == "int8":

        def fake_quantize(x, lo: float, hi: float, levels: int):
            lo_c, hi_c = ops.constant(np.float32(lo)), ops.constant(np.float32(hi))
            return ops.fake_quantize(x, lo_c, hi_c, lo_c, hi_c, levels)

        y = ops.matmul(fake_quantize(a, 0.0, 4.0, 256), fake_quantize(b, -4.0, 4.0, 255), False, False)
    else:
        y = ops.matmul(a, b, False, False)
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision,
                                 "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = core().compile_model(ov.Model([y], [a]), "CPU", config).create_infer_request()
    x = np.abs(rng.standard_normal((n, n))).astype(np.float32)
    request.infer({"a": x})
    return 2 * n**3 / best_seconds(lambda: request.infer({"a": x}), repeats) / 1e9
