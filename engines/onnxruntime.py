"""ONNX Runtime engine: one InferenceSession, numpy in and numpy out.

Any execution provider by name (``providers=["CUDAExecutionProvider", "CPUExecutionProvider"]``);
the default is the CPU provider. Tensor dtypes and ranks are read from the session, never assumed.

Session settings (keyword options, also reachable from ``Pipeline.load`` and ``edgediff bench``):

- ``threads``: intra-op threads (default: ONNX Runtime's own, one per physical core); the
  inter-op pool is not used (sequential execution, as for every SD graph).
- ``optimization``: graph optimisation level, ``disable`` | ``basic`` | ``extended`` | ``all``
  (default ``all``: constant folding, fusions and the CPU provider's blocked NCHWc layout).
- ``prepack``: let ONNX Runtime pre-pack weights into its GEMM layout (default True, faster).
  Pre-packing keeps a second copy of every packed weight; ``prepack=False`` trades speed for
  memory.
- ``mem_arena`` / ``mem_pattern``: the CPU memory arena and the memory-pattern planner
  (default on, ONNX Runtime's defaults).
- ``cpu_variant``: which saved model file the CPU provider loads. ``auto`` (default): the CPU
  variant that ``edgediff optimize`` made for this machine and ONNX Runtime version (fused
  attention, saved at level ``all``, so ``optimization`` does not apply to it) when one exists and
  matches, else the exported graph; ``off``: always the exported graph; ``int8`` (opt-in, changes
  the image): the int8 variant of ``edgediff optimize --int8`` where one was made (the UNet: an
  error names the command if it is missing) and the ``auto`` choice for the other components.
  (Formerly ``optimized``, a name too close to ``optimization``; the old name is refused with a
  message that gives the new one.)
- ``weights``: the LoRA-merged initializers that replace the graph's own (``edgediff.runtime.lora_apply``'s
  ``MergedWeights``, which say where each lies in ``model.onnx_data``), given to ONNX Runtime at session
  creation: they are written into a copy-on-write map of ``model.onnx_data`` that ONNX Runtime reads in place of
  the file (``add_external_initializers_from_files_in_memory``) and that goes once the session exists. Unlike
  ``add_initializer``, it also replaces convolution weights at level ``all``. The saved CPU
  variants hold re-laid-out copies of the weights, so with ``weights`` the exported graph is loaded (and optimised
  at session creation) instead; the int8 variants, whose weights are quantized, are refused.
- ``io_binding``: bind inputs and outputs through an IOBinding (default: on for GPU providers,
  where it keeps inputs that are passed again unchanged on the device; off on the CPU, where
  ``run`` already writes into fresh numpy arrays without a copy).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
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
from edgediff.runtime.specs import TensorSpec

try:
    import onnxruntime as ort
except ImportError as e:
    raise EngineUnavailableError(
        "ONNX Runtime is not installed: pip install 'edgediff[cpu]' (CPU), or 'edgediff[gpu]' for NVIDIA GPUs "
        "(onnxruntime-gpu; never both)"
    ) from e


def _both_builds_installed() -> list[str]:
    """The ONNX Runtime distributions installed side by side (they overwrite one another's files)."""
    from importlib import metadata

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return found if len(found) > 1 else []


if _both_builds_installed():
    logging.getLogger(__name__).warning(
        "onnxruntime and onnxruntime-gpu are both installed; they share one module and the last one installed "
        "wins. Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'edgediff[gpu]' (or '[cpu]')"
    )

logger = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _spec(arg) -> TensorSpec:
    if arg.type not in _ORT_DTYPES:
        raise EngineUnavailableError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorSpec(arg.name, np.dtype(_ORT_DTYPES[arg.type]), shape)


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session_options(
    threads: int | None = None,
    optimization: str = "all",
    prepack: bool = True,
    mem_arena: bool = True,
    mem_pattern: bool = True,
) -> ort.SessionOptions:
    """The SessionOptions for the settings above; unknown values raise InvalidArgumentError."""
    if optimization not in _LEVELS:
        raise InvalidArgumentError(f"optimization must be one of {', '.join(_LEVELS)}, got {optimization!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError(f"threads must be a positive integer, got {threads!r}")
    so = ort.SessionOptions()
    # ONNX Runtime logs every failed node to stderr itself; the engine raises it as one EdgediffError
    # line instead, so its own log shows only with debug logging (edgediff -v)
    so.log_severity_level = 2 if logging.getLogger("edgediff").isEnabledFor(logging.DEBUG) else 4
    so.graph_optimization_level = _LEVELS[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = bool(mem_arena)
    so.enable_mem_pattern = bool(mem_pattern)
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def saved_cpu_variant(path: Path, component: str, precision: str = "fp32") -> Path | None:
    """The ``edgediff optimize`` variant of ``path`` that ``cpu_variant="auto"`` (fp32) or ``"int8"`` loads here,
    None when there is none or it was made for another CPU or ONNX Runtime version."""
    from .ort_optimize import KEY_FILE, VARIANT_DIRS, find_variant

    if not (path.parent.parent / VARIANT_DIRS[precision] / component / KEY_FILE).is_file():
        return None  # the common case costs one stat
    return find_variant(path, component, precision)


_ALLOCATION_FAILURES = ("bad_alloc", "failed to allocate", "out of memory", "bfcarena", "cannot allocate")


def _merged_weights_file(weights) -> np.ndarray:
    """The component's ``model.onnx_data`` as ONNX Runtime will read it, with the LoRA-merged initializers
    (``lora_apply.MergedWeights``) written over the base ones: a copy-on-write map of the file, so only the pages of
    the changed weights take memory, each merged initializer is made and written one at a time, and the whole goes
    when the session exists (``add_external_initializers_from_files_in_memory`` copies during creation). Like
    ``add_external_initializers``, it replaces convolution weights at every optimisation level."""
    data = np.memmap(weights.data_file, dtype=np.uint8, mode="c")
    for name in weights:
        offset, length = weights.location(name)
        value = np.ascontiguousarray(weights[name])
        if value.nbytes != length:
            raise ModelFolderError(f"{name}: the merged weight has {value.nbytes} bytes, its place in "
                                   f"{weights.data_file} {length}; remake the weights map (edgediff "
                                   "weights-map)")  # fmt: skip
        data[offset : offset + length] = value.reshape(-1).view(np.uint8)
        del value
    return data


def _is_allocation_failure(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(m in str(e).lower() for m in _ALLOCATION_FAILURES)


def _first_line(e: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's message in one short line: the node and the status without the C++ source
    location and signature ("… running Softmax node. Name:'x' Status Message: /src/bfc_arena.cc:360
    void* …(size_t, …) Failed to allocate memory …" -> "Softmax node 'x': Failed to allocate memory …")."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    m = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)$", line)
    if m:
        status = m.group(3)
        if re.match(r"\S+\.(cc|h|cpp):\d+ ", status):  # "file.cc:360 <C++ signature or function> message"
            status = status[status.rindex(") ") + 2 :] if ") " in status else status.split(" ", 2)[-1]
        line = f"{m.group(1)} node {m.group(2)!r}: {status}"
    return line if len(line) <= limit else line[:limit] + "..."


def _device_of(provider: str) -> str:
    """The OrtValue device name for an execution provider's memory."""
    return {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}.get(
        provider, "cpu"
    )


class OrtEngine:
    def __init__(
        self,
        path: str | os.PathLike,
        component: str = "model",
        providers: Sequence[str] | None = None,
        session_options: ort.SessionOptions | None = None,
        threads: int | None = None,
        optimization: str = "all",
        prepack: bool = True,
        mem_arena: bool = True,
        mem_pattern: bool = True,
        io_binding: bool | None = None,
        cpu_variant: str = "auto",
        weights: Mapping[str, np.ndarray] | None = None,
        optimized: str | None = None,  # the old name of cpu_variant, refused with the new one
    ):
        self.component = component
        path = Path(path)
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        if optimized is not None:
            raise InvalidArgumentError(
                f"optimized= is now called cpu_variant= (same values 'auto', 'off', 'int8'; the old name read like "
                f"optimization=, the graph level): pass cpu_variant={optimized!r}"
            )
        if cpu_variant not in ("auto", "off", "int8"):
            raise InvalidArgumentError(f"cpu_variant must be 'auto', 'off' or 'int8', got {cpu_variant!r}")
        cpu_only = providers == ["CPUExecutionProvider"] and session_options is None
        variant = None
        if weights and cpu_variant == "int8":
            from edgediff.runtime.lora_apply import int8_refusal

            raise int8_refusal(component)
        if weights and cpu_variant == "auto" and cpu_only and saved_cpu_variant(path, component) is not None:
            logger.info("%s: LoRA weights: loading the exported graph, not the saved CPU variant (its weights are "
                        "re-laid-out copies); ONNX Runtime optimises it at session creation", component)  # fmt: skip
        if weights:
            cpu_variant = "off"
        if cpu_variant == "int8":
            from .ort_optimize import INT8_COMPONENTS

            variant = saved_cpu_variant(path, component, "int8") if cpu_only else None
            if variant is None and component in INT8_COMPONENTS:  # the ones `optimize --int8` makes
                raise ModelFolderError(
                    f"no int8 variant of {path} for this CPU and ONNX Runtime version"
                    + ("" if cpu_only else " (int8 variants run on the CPU provider only)")
                    + f": run `edgediff optimize {path.parent.parent} --int8` first, or leave int8 off"
                )
        if variant is None and cpu_variant != "off" and cpu_only:
            variant = saved_cpu_variant(path, component)
        if variant is not None:  # made by `edgediff optimize`: already at level "all", fused
            path, optimization = variant, "disable"
        self.model_file = path
        available = ort.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise EngineUnavailableError(
                f"execution provider(s) {unknown} are not available in this onnxruntime build "
                f"(available: {available}); install the matching onnxruntime package or choose another provider"
            )
        if session_options is None:
            session_options = make_session_options(threads, optimization, prepack, mem_arena, mem_pattern)
        weights_file = None
        if weights:
            weights_file = _merged_weights_file(weights)
            name = Path(weights.data_file).name  # type: ignore[attr-defined]
            session_options.add_external_initializers_from_files_in_memory([name], [weights_file], [weights_file.size])
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            reason = f"{type(e).__name__}: {_first_line(e)}"
            if _is_allocation_failure(e):
                raise ResourceError(f"{component}: not enough memory to load {path} ({reason}); close other "
                                    "programs, or use low_memory=True (--low-memory)") from e  # fmt: skip
            if weights and ("initializer" in str(e).lower() or "dimensions do not match" in str(e)):
                raise ModelFolderError(
                    f"{component}: ONNX Runtime refused the LoRA-merged weights for {path} ({reason}); its "
                    f"weights map does not fit the graph: remake it with `edgediff weights-map "
                    f"{path.parent.parent} SOURCE`"
                ) from e
            if variant is not None:  # the derived file is damaged, not the export
                raise ModelFolderError(
                    f"{component}: ONNX Runtime cannot load the CPU variant {path} ({reason}); remake it with "
                    f"`edgediff optimize {path.parent.parent.parent} --force`, or pass cpu_variant='off'"
                ) from e
            raise ModelFolderError(
                f"{component}: ONNX Runtime cannot load {path} ({reason}); "
                "the file is damaged or incomplete: re-export the model"
            ) from e
        del weights_file  # ONNX Runtime copied what it needs while creating the session
        self.providers = self.session.get_providers()
        self.inputs = {a.name: _spec(a) for a in self.session.get_inputs()}
        self.outputs = {a.name: _spec(a) for a in self.session.get_outputs()}
        self.device = _device_of(self.providers[0])
        self.io_binding = (self.device != "cpu") if io_binding is None else bool(io_binding)
        self._bound: dict[str, tuple[np.ndarray, object]] = {}  # input name -> (array, its device copy)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feed(self.component, self.inputs, feeds)
        try:
            return self._run(feeds, checked)
        except Exception as e:  # onnxruntime's Fail / RuntimeException / bad_alloc, as one line
            if self.session is None:
                raise
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in checked.items())
            if _is_allocation_failure(e):
                raise ResourceError(
                    f"{self.component} ran out of memory on inputs {shapes} ({_first_line(e)}); reduce the width/"
                    "height or the number of images, or use low_memory=True (--low-memory)"
                ) from e
            raise EngineRunError(
                f"{self.component} failed in ONNX Runtime on inputs {shapes}: {_first_line(e)}"
            ) from e

    def _run(self, feeds, checked) -> dict[str, np.ndarray]:
        if not self.io_binding:
            values = self.session.run(None, checked)
            return dict(zip(self.outputs, values))
        binding = self.session.io_binding()
        for name, value in checked.items():
            binding.bind_ortvalue_input(name, self._device_value(name, feeds[name], value))
        for name in self.outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))

    def _device_value(self, name: str, original, value: np.ndarray):
        """The input as an OrtValue on the engine's device. An input passed again as the same
        read-only array (the pipeline freezes the prompt embeddings) is not copied again: on a GPU
        the embeddings cross the bus once per image, only the latents move each step."""
        frozen = isinstance(original, np.ndarray) and not original.flags.writeable
        cached = self._bound.get(name)
        if frozen and cached is not None and cached[0] is original:
            return cached[1]
        ortvalue = ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
        if frozen:
            self._bound[name] = (original, ortvalue)
        return ortvalue

    def close(self) -> None:
        self._bound = {}
        self.session = None

    @staticmethod
    def gemm_gflops(precision: str = "int8", threads: int | None = None) -> float | None:
        return gemm_gflops(precision, threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def gemm_gflops(precision: str = "int8", threads: int | None = None, n: int = 2048, repeats: int = 5) -> float | None:
    """Achieved GOP/s of ONNX Runtime's CPU int8 matrix product (MatMulInteger, uint8 x int8, the kernel its
    int8 UNets run): the ceiling ``edgediff bench`` sets an int8 UNet against. None without ``onnx`` (the
    optimize extra) to build the graph; fp32 is measured with numpy's SGEMM instead."""
    from edgediff.runtime.measure import best_seconds

    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    if precision != "int8":
        return None
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, size=(n, n), dtype=np.int8), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), sess_options=make_session_options(threads),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    x = rng.integers(0, 256, size=(n, n), dtype=np.uint8)
    session.run(None, {"a": x})
    return 2 * n**3 / best_seconds(lambda: session.run(None, {"a": x}), repeats) / 1e9
