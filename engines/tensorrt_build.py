"""``edgediff build``: TensorRT plans from a model folder, with the ``tensorrt`` Python API (no trtexec).

Each component is built on its own (a UNet that runs out of memory does not redo the text
encoder) into one plan with one optimisation profile per shape set (``trt_plans.build_profiles``),
into ``MODEL/engines/.<key>.partial-<pid>/`` first and renamed to ``MODEL/engines/<key>/`` when
complete, with a ``build.json`` holding the key and the I/O read back from the built plan.
The decisions (profile, key, fp16 mode, what is stale) live in ``trt_plans.py`` as pure
functions; this module only calls TensorRT and CUDA.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.runtime.errors import BuildError, EngineUnavailableError, PlanError
from edgediff.runtime.files import replace_dir, write_atomic
from edgediff.runtime.model_folder import ModelFolder
from edgediff.runtime.specs import TensorSpec

from . import trt_plans as plans
from .cuda_util import INSTALL_HINT, check, import_cudart, probe_gpu

logger = logging.getLogger(__name__)


def import_tensorrt():
    """The ``tensorrt`` module, or an ``EngineUnavailableError`` that says what to do instead."""
    try:
        import tensorrt as trt
    except (ImportError, OSError, RuntimeError) as e:  # the pip wheel raises OSError when its libs are absent
        raise EngineUnavailableError(f"TensorRT is not usable here ({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    version = str(getattr(trt, "__version__", "0"))
    if plans.parse_version(version) < (10,):  # name-based I/O and execute_async_v3 are all this code speaks
        raise EngineUnavailableError(
            f"TensorRT {version} is too old: edgediff needs TensorRT >= 10 (desktop: pip install "
            "'edgediff[tensorrt]'; Jetson: JetPack 6 ships 10.3), or use the ONNX Runtime engine: "
            'engine="onnxruntime"'
        )
    return trt


_TRT_LOGGER: dict = {}  # the process's one trt.Logger, made on first use


def trt_logger(trt, verbose: bool = False):
    """The process's one ``trt.Logger`` (TensorRT warns when runtimes and builders get different ones)."""
    log = _TRT_LOGGER.get("logger")
    if log is None:
        log = _TRT_LOGGER["logger"] = trt.Logger(trt.Logger.WARNING)
    log.min_severity = trt.Logger.INFO if verbose else trt.Logger.WARNING
    return log


def current_environment(trt, cudart, device: int = 0) -> plans.Environment:
    name, cc = probe_gpu(cudart, device)
    return plans.Environment(str(trt.__version__), name, cc)


def guided_by_default(mf: ModelFolder) -> bool:
    """Whether calls on this model double the batch for guidance by default: not for an LCM UNet (guidance is an
    embedding) nor a guidance-distilled model (Turbo: guidance 0)."""
    return "timestep_cond" not in mf.features and mf.call_defaults("txt2img")["guidance_scale"] > 1


def model_facts(mf: ModelFolder) -> plans.ModelFacts:
    """Profile inputs from the manifest and configs (``ModelFolder``'s, which fall back to the family's defaults)."""
    return plans.ModelFacts(mf.native_size, mf.vae_downscale, mf.latent_channels, mf.text_length,
                            mf.text_embedding_dim, mf.model_symbols())  # fmt: skip


def _folder_is_fp16(mf: ModelFolder) -> bool:
    return any(c.get("precision") == "fp16" for c in mf.manifest["components"].values())


def _network_has_fp16(trt, network) -> bool:
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                return True
    return False


def _progress_monitor(trt, label: str):
    """A tqdm bar per build phase through ``trt.IProgressMonitor`` (TensorRT's own sample's shape)."""
    from tqdm import tqdm

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            desc = f"{label}: {phase_name}"
            self.bars[phase_name] = tqdm(total=num_steps, desc=desc, position=len(self.bars), leave=False)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(max(0, step + 1 - bar.n))
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


def _read_io(trt, engine, component: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        shape = tuple(engine.get_tensor_shape(name))
        spec = plans.symbolize(component, name, dtype, shape, "inputs" if is_input else "outputs")
        (inputs if is_input else outputs).append(spec)
    return inputs, outputs


def device_memory_size(engine) -> int:
    """Scratch memory one context of ``engine`` allocates (max over its profiles). The V2 name came
    in a later 10.x and is the only one left in TensorRT 11 (tensorrt.md §5.1)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


@dataclass
class BuildResult:
    component: str
    key: str
    path: Path
    status: str  # "built" or "up to date"
    model_sha256: str
    seconds: float = 0.0


def build_component(
    trt,
    mf: ModelFolder,
    component: str,
    env: plans.Environment,
    options: plans.ProfileOptions,
    opt_level: int = 3,
    workspace_mib: int | None = None,
    timing_cache: bool = True,
    force: bool = False,
    progress: bool = False,
    verbose: bool = False,
    announce: Callable[[str], None] | None = None,
    refit: bool = False,
) -> BuildResult:
    onnx = mf.component_path(component)
    if not onnx.is_file():
        raise BuildError(f"{component}: {onnx} is missing; re-export the model")
    info = mf.manifest["components"].get(component, {})
    precision = info.get("precision", "unknown")
    keep_fp32 = precision == "fp32" and _folder_is_fp16(mf)  # the exporter kept it fp32 on purpose
    major = plans.parse_version(env.trt_version)[0]
    assumed = precision if precision in ("fp16", "fp32") else ("fp16" if major >= 11 else "fp32")
    mode = plans.choose_build_mode(env.trt_version, assumed, keep_fp32)
    model_sha, files = plans.model_fingerprint(mf.path, onnx.parent, known=[mf.manifest.get("files", {})])

    t0 = time.perf_counter()
    log = trt_logger(trt, verbose)
    builder = trt.Builder(log)
    flags = 0
    strong_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # always on in 11.x
    if mode.strongly_typed and strong_flag is not None:
        flags |= 1 << int(strong_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx)):  # the path form finds external data beside the .onnx
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{component}: TensorRT's ONNX parser rejected {onnx}: {errors or 'no detail'}")
    if precision == "unknown" and major >= 11 and not _network_has_fp16(trt, network):
        plans.choose_build_mode(env.trt_version, "fp32")  # raises: TensorRT 11 needs an fp16 ONNX
    net_inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        net_inputs.append(TensorSpec(t.name, np.dtype(trt.nptype(t.dtype)), tuple(t.shape)))
    profiles = plans.build_profiles(component, net_inputs, model_facts(mf), options)
    key = plans.plan_key(model_sha, component, mode.precision, env, profiles, refittable=refit)
    shown = " + ".join(plans.describe_profile(p) for p in profiles)
    engines_dir = mf.path / plans.ENGINES_DIR
    final = engines_dir / key
    if final.is_dir() and not force:
        try:
            plans.read_build_json(final)
            if (final / f"{component}.plan").is_file():
                logger.info("%s: plan %s is up to date", component, key)
                return BuildResult(component, key, final, "up to date", model_sha)
        except PlanError as e:  # damaged: rebuild it
            logger.warning("%s: rebuilding %s (%s)", component, key, e)

    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.builder_optimization_level = int(opt_level)
    if mode.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if refit:  # every weight refittable (LoRAs at load time); REFIT_IDENTICAL would promise the build's weights
        config.set_flag(trt.BuilderFlag.REFIT)
    # profiles only constrain dynamic inputs; a network without any gets TensorRT's implicit one
    dynamic_inputs = [t for t in net_inputs if any(map(plans.is_dynamic, t.shape))]
    for profile in profiles if dynamic_inputs else ():
        trt_profile = builder.create_optimization_profile()
        for t in dynamic_inputs:
            trt_profile.set_shape(t.name, *profile[t.name])
        if config.add_optimization_profile(trt_profile) < 0:  # -1 for an invalid profile
            raise BuildError(
                f"{component}: TensorRT rejected the optimisation profile {plans.describe_profile(profile)}"
            )
    cache_file = plans.timing_cache_path(mf.path, env)
    if timing_cache:
        blob = cache_file.read_bytes() if cache_file.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            logger.warning(
                "%s: timing cache %s does not fit this TensorRT/GPU; starting a new one", component, cache_file
            )
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    if progress:
        config.progress_monitor = _progress_monitor(trt, component)
    logger.info("%s: building %s (%s, profiles %s)", component, key, mode.precision, shown)
    if announce is not None:
        announce(f"building {component} ({mode.precision}, {shown}) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            f"{component}: TensorRT could not build the plan (see its log above); on a small GPU or Jetson try "
            "--workspace MiB, a lower --opt-level, or a smaller range (--max-size, --max-batch)"
        )
    data = bytes(memoryview(serialized))
    if timing_cache:
        write_atomic(cache_file, bytes(memoryview(config.get_timing_cache().serialize())))

    # read the I/O and scratch size back from the plan itself, never from assumptions
    runtime = trt.Runtime(log)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise BuildError(f"{component}: the plan TensorRT just built cannot be deserialised; rebuild")
    inputs, outputs = _read_io(trt, engine, component)
    scratch = device_memory_size(engine)
    del engine, runtime  # the engine first: a runtime must outlive its engines
    seconds = time.perf_counter() - t0
    record = plans.BuildRecord(
        key=key, component=component, precision=mode.precision, model_sha256=model_sha,
        trt_version=env.trt_version, gpu_name=env.gpu_name, compute_capability=env.compute_capability,
        profiles=profiles, inputs=inputs, outputs=outputs, plan_file=f"{component}.plan", plan_bytes=len(data),
        model_files=files, device_memory_bytes=scratch,
        build={"strongly_typed": mode.strongly_typed, "fp16_flag": mode.fp16_flag, "opt_level": int(opt_level),
               "workspace_mib": workspace_mib, "dynamic": options.dynamic, "refittable": bool(refit),
               "seconds": round(seconds, 1),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )  # fmt: skip
    _install(engines_dir, key, component, data, record)
    return BuildResult(component, key, final, "built", model_sha, seconds)


def _install(engines_dir: Path, key: str, component: str, data: bytes, record: plans.BuildRecord) -> None:
    """Write the plan and build.json into a temporary folder, then rename it into place."""
    engines_dir.mkdir(parents=True, exist_ok=True)
    tmp = engines_dir / f".{key}.partial-{os.getpid()}"
    final = engines_dir / key
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / f"{component}.plan").write_bytes(data)
        plans.write_build_json(tmp, record)  # last: a folder without build.json is never loaded
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_model(
    model: str | os.PathLike,
    components: list[str] | None = None,
    options: plans.ProfileOptions | None = None,
    opt_level: int = 3,
    workspace_mib: int | None = None,
    timing_cache: bool = True,
    force: bool = False,
    prune: bool = False,
    device: int = 0,
    progress: bool = False,
    verbose: bool = False,
    announce: Callable[[str], None] | None = None,
    refit: bool = False,
) -> list[BuildResult]:
    """Build a plan per component (default: those the pipeline runs) for this GPU and TensorRT. It
    replaces the component's previous plan for this setup; ``prune`` also deletes those of other
    setups (TensorRT versions, GPUs).

    ``progress``: tqdm bars per TensorRT build phase. ``announce``: called with one line as each
    component starts building (the CLI prints it). ``refit``: build refittable plans (TensorRT's REFIT flag), the
    kind LoRAs are applied to at load time (``TrtEngine(weights=...)``); a refittable plan can run slower, so it is
    built only on request."""
    mf = ModelFolder.open(model)
    components = list(components or mf.required_components)
    unknown = [c for c in components if c not in mf.manifest["components"]]
    if unknown:
        raise BuildError(f"components {unknown} are not in {mf.path}; it has {list(mf.manifest['components'])}")
    if not 0 <= opt_level <= 5:
        raise BuildError(f"--opt-level must be 0..5, got {opt_level}")
    trt = import_tensorrt()
    cudart = import_cudart()
    env = current_environment(trt, cudart, device)
    check(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
    options = options or plans.ProfileOptions()
    if options.guidance is None:
        options = dataclasses.replace(options, guidance=guided_by_default(mf))
    results = []
    for name in components:
        result = build_component(
            trt,
            mf,
            name,
            env,
            options,
            opt_level,
            workspace_mib,
            timing_cache,
            force,
            progress,
            verbose,
            announce,
            refit=refit,
        )
        results.append(result)
        records, _ = plans.discover_plans(mf.path, name)
        for r in plans.superseded(records, result.key, env, prune):
            assert r.path is not None  # discover_plans records the folder it read
            shutil.rmtree(r.path, ignore_errors=True)
            logger.warning("%s: deleted plan %s (%s)", name, r.key, "replaced" if r.environment == env else "pruned")
    return results
