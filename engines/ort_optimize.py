"""``edgediff optimize``: ONNX Runtime CPU variants of a model folder's components, made once.

For each component it (1) runs ONNX Runtime's transformer optimiser (attention, LayerNorm and
GELU fusions into ONNX Runtime's contrib ops: ``MultiHeadAttention``, ``SkipLayerNormalization``,
…) with only the fusions the CPU provider implements, then (2) lets ONNX Runtime apply its full
graph optimisation (level ``all``: constant folding, the CPU provider's blocked NCHWc layout) and
save the result (ONNX Runtime's "offline optimised model"). Later sessions load that file with
graph optimisation off: faster loads, the fused attention kernels at run time.

The variants live beside the portable model, never instead of it:
``MODEL/ort-cpu/<component>/model.onnx`` (+ ``model.onnx.data``) and ``optimized.json``, whose
key (source file identity, ONNX Runtime version, CPU model and SIMD flags) must match for the
engine to use them (``OrtEngine(optimized="auto")``, the default). The contrib ops would stop
TensorRT's parser, so ``unet/model.onnx`` itself is left as exported.

``--int8`` (opt-in, UNet by default) writes an int8 variant after the fusions to
``MODEL/ort-cpu-int8/``; the engine uses it only when asked (``cpu_variant="int8"``, ``--int8``).
Two kinds, the last one made is the one used (its key records which):

- ``dynamic`` (``--int8`` / ``--int8 dynamic``): ONNX Runtime's dynamic quantisation of the
  MatMuls with constant weights (the transformer blocks' linear layers; per-tensor int8 weights,
  activations quantised per call). Convolutions stay fp32 (dynamic ConvInteger runs at half the
  speed of the fp32 convolution). Needs no data.
- ``static`` (``--int8 static``): calibrated post-training quantisation in QDQ form of the
  convolutions and the constant-weight MatMuls (per-channel int8 weights, uint8 activations whose
  scales come from ``calibration``: the UNet inputs of real fp32 runs, ``runtime/calibrate.py``);
  ONNX Runtime fuses the QDQ pairs into its int8 kernels (QLinearConv, MatMulIntegerToFloat) when
  it saves the variant. The fused attention stays fp32.

Both change the image; the benchmark results report by how much.

Needs ``onnx`` (the ``dev``/``export`` extras) and onnxruntime's bundled ``transformers`` tools,
which need ``sympy``: the ``optimize`` extra. Imported only by the ``optimize`` command.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgediff.runtime.errors import EdgediffError, ModelFolderError
from edgediff.runtime.files import replace_dir

from .variants import matching, read_key, source_identity

logger = logging.getLogger(__name__)

VARIANT_DIR = "ort-cpu"
VARIANT_DIRS = {"fp32": VARIANT_DIR, "int8": "ort-cpu-int8"}
INT8_COMPONENTS = ("unet",)  # what `optimize --int8` makes when no --component is given
# The optimised graph must reproduce the original within this (max |difference| / (1 + max |output|)
# on random inputs); int8 cannot (0.05 on SD 1.5, 0.19 on the small embedded model), so its bound
# only catches a broken quantisation (wrong scales: O(1) or NaN); image fidelity is the real check.
TOLERANCE = {"fp32": 1e-3, "int8": 0.5}
KEY_FILE = "optimized.json"
# Bumped when what `edgediff optimize` writes changes, so variants made by an older one are redone.
# 2: self-attention as MultiHeadAttention (flash attention on the CPU provider).
RECIPE = 2
# component -> the transformer optimiser's model type
MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
# Fusions whose ops only the CUDA provider implements (the CPU provider would refuse the graph).
_GPU_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_packed_qkv", "enable_packed_kv", "enable_bias_add")  # fmt: skip


class OptimizeError(EdgediffError, RuntimeError):
    """An optimised variant could not be made or does not reproduce the original's outputs."""


def _use_cpu_attention_fusion() -> None:
    """Two changes to ONNX Runtime's UNet attention fusion, made by swapping in a subclass (the
    pattern matching is ONNX Runtime's, unchanged; the optimiser imports its modules by their
    bare names, so the class is replaced in ``onnx_model_unet``'s namespace, where it is used):

    1. numpy 2: the head count is read with ``int(array_of_shape_[1])``, which numpy >= 2.4
       refuses (TypeError: only 0-dimensional arrays can be converted); ours uses ``.item()``.
    2. Self-attention becomes ``MultiHeadAttention`` on separate Q, K and V instead of the
       ``Attention`` op with one packed QKV weight. On the CPU provider only MultiHeadAttention
       with separate inputs runs MLAS's flash-attention kernel, which never materialises the
       [batch, heads, tokens, tokens] score matrix: at 512 px that matrix is 1 GiB per
       self-attention layer (4096 tokens), the largest activation in the UNet."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts the tools' folder on sys.path)

    # isort: split
    import fusion_attention_unet
    import onnx_model_unet
    from onnx import helper

    if getattr(onnx_model_unet.FusionAttentionUnet, "_edgediff_fix", False):
        return

    class FusionAttentionUnetNumpy2(fusion_attention_unet.FusionAttentionUnet):
        _edgediff_fix = True

        def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
            value = None
            if is_torch2:  # Reshape(q, Concat(batch, seq, heads, head_dim))
                parent = self.model.get_parent(reshape_q, 1)
                if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                    value = self.model.get_constant_value(parent.input[2])
            else:  # Reshape(q, constant [0, 0, heads, head_dim])
                shape = self.model.get_constant_value(reshape_q.input[1])
                if isinstance(shape, np.ndarray) and shape.shape == (4,):
                    value = shape[2:3]
            if isinstance(value, np.ndarray) and value.size == 1 and value.item() > 0:
                return int(value.item())
            return 0

        def create_attention_node(self, q_matmul, k_matmul, v_matmul, num_heads, hidden_size, input, output):
            if self.is_cross_attention or self.enable_packed_qkv:
                return super().create_attention_node(q_matmul, k_matmul, v_matmul, num_heads, hidden_size, input,
                                                     output)  # fmt: skip
            if not (q_matmul.input[0] == k_matmul.input[0] == v_matmul.input[0] == input):
                return None
            if num_heads <= 0 or (hidden_size > 0 and hidden_size % num_heads):
                return None
            name = self.model.create_node_name("MultiHeadAttention")
            node = helper.make_node("MultiHeadAttention", [q_matmul.output[0], k_matmul.output[0], v_matmul.output[0]],
                                    [output], name=name, domain="com.microsoft", num_heads=num_heads)  # fmt: skip
            self.increase_counter("MultiHeadAttention (self attention, separate q/k/v)")
            return node

    onnx_model_unet.FusionAttentionUnet = FusionAttentionUnetNumpy2


def _cpu_identity() -> dict:
    from edgediff.runtime.measure import machine_info

    m = machine_info()
    return {"cpu": m["cpu"], "flags": m["flags"], "onnxruntime": ort.__version__}


def variant_key(source: Path, fused: bool, precision: str = "fp32") -> dict:
    return {"source": source_identity(source), "fused": fused, "precision": precision, "recipe": RECIPE,
            **_cpu_identity()}  # fmt: skip


def find_variant(source: Path, component: str, precision: str = "fp32") -> Path | None:
    """The optimised file for the component at ``source`` if one exists and its key matches this
    machine, ONNX Runtime and source file; None otherwise (stale variants are logged, not used)."""
    folder = source.parent.parent / VARIANT_DIRS[precision] / component
    recorded = read_key(folder / KEY_FILE)
    if recorded is None:
        return None
    current = variant_key(source, recorded.get("fused", False), precision)
    if not matching(folder / KEY_FILE, current, component, "optimised variant", "edgediff optimize"):
        return None
    return folder / "model.onnx"


def recorded_key(source: Path, component: str, precision: str) -> dict:
    """The key file of the component's variant as written (empty when unreadable)."""
    return read_key(source.parent.parent / VARIANT_DIRS[precision] / component / KEY_FILE) or {}


def _fuse(source: Path, component: str, work: Path) -> tuple[Path, dict]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _use_cpu_attention_fusion()
    model_type = MODEL_TYPES[component]
    options = FusionOptions(model_type)
    for name in _GPU_ONLY_FUSIONS:
        if hasattr(options, name):
            setattr(options, name, False)
    model = optimize_model(str(source), model_type=model_type, opt_level=0, optimization_options=options,
                           use_gpu=False)  # fmt: skip
    stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    out = work / "fused.onnx"
    model.save_model_to_file(str(out), use_external_data_format=source.stat().st_size > 1 << 30 or
                             source.with_name(source.name + "_data").exists())  # fmt: skip
    return out, stats


def _quantize_int8(model_in: Path, work: Path) -> Path:
    """ONNX Runtime's dynamic quantisation of the MatMuls whose second input is a weight."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "int8.onnx"
    root = logging.getLogger()  # its advice to run shape-inference pre-processing does not apply to fused graphs
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(model_in, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         use_external_data_format=True,
                         # the fused contrib ops have no ONNX shape inference: their outputs are fp32
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})  # fmt: skip
    finally:
        root.setLevel(level)
    return out


def _has_vnni() -> bool:
    flags = set(_cpu_identity()["flags"])
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _quantize_static(model_in: Path, work: Path, samples: list[dict]) -> Path:
    """ONNX Runtime's static QDQ quantisation of Conv and constant-weight MatMul, calibrated on ``samples``."""
    from onnx import TensorProto
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._samples = iter(samples)

        def get_next(self):
            return next(self._samples, None)

    out = work / "int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(model_in, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul"],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        # without VNNI, u8 x s8 products saturate in AVX2's 16-bit adds: 7-bit weights avoid it
                        reduce_range=not _has_vnni(), calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True,
                        # (the MinMax calibrator keeps only each tensor's min and max per sample: small; its
                        # CalibMaxIntermediateOutputs option drops the data in ONNX Runtime 1.32, so it is not used)
                        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})  # fmt: skip
    finally:
        root.setLevel(level)
    return out


def _save_optimized(model_in: Path, out: Path) -> None:
    """ONNX Runtime's offline optimisation: a session at level ``all`` writes what it would run."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3  # its warning (NCHWc makes the file machine-specific) is why the key holds the CPU
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(model_in), sess_options=so, providers=["CPUExecutionProvider"])


def _check_same_outputs(source: Path, variant: Path, component: str, shapes: dict, feeds: dict | None = None) -> float:
    """Run both on the same inputs (``feeds``, else random ones); return the max |difference| / (1 + max|original|)."""
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    new = ort.InferenceSession(str(variant), sess_options=so, providers=["CPUExecutionProvider"])
    if feeds is not None:
        a, b = ref.run(None, feeds)[0], new.run(None, feeds)[0]
        return float(np.abs(a.astype(np.float64) - b).max() / (1 + np.abs(a).max()))
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in ref.get_inputs():
        shape = shapes[arg.name]
        if "int" in arg.type:
            feeds[arg.name] = rng.integers(0, 400, size=shape).astype(np.int64 if "64" in arg.type else np.int32)
        else:
            dtype = np.float16 if "float16" in arg.type else np.float32
            value = rng.standard_normal(shape) if shape else np.float32(rng.uniform(1, 999))
            feeds[arg.name] = np.asarray(value, dtype=dtype)
    a, b = ref.run(None, feeds)[0], new.run(None, feeds)[0]
    return float(np.abs(a.astype(np.float64) - b).max() / (1 + np.abs(a).max()))


def _probe_shapes(folder, component: str) -> dict:
    """The contract's shapes at the native size, one image, doubled where guidance doubles."""
    return folder.spec(component).input_shapes(folder.symbols(), guidance=True)


def optimize_folder(model: str | os.PathLike, components=None, fuse: bool = True, force: bool = False,
                    int8: bool | str = False, tolerance: float | None = None,
                    calibration: list[dict] | None = None, calibration_info: dict | None = None) -> dict:  # fmt: skip
    """Make the CPU variants (``int8``: the int8 ones, ``True`` or ``"dynamic"``, or ``"static"`` with
    ``calibration``, the UNet input samples); returns {component: report}. Written atomically per component."""
    mode = {True: "dynamic", "dynamic": "dynamic", "static": "static", False: None}.get(int8, "?")
    if mode == "?":
        raise OptimizeError(f"int8 must be 'dynamic' or 'static', got {int8!r}")
    if mode == "static" and not calibration:
        raise OptimizeError("static int8 needs calibration samples (runtime/calibrate.py: edgediff optimize "
                            "--int8 static collects them)")  # fmt: skip
    int8 = mode is not None
    from edgediff.runtime.model_folder import ModelFolder

    folder = ModelFolder.open(model)
    try:  # the fusions read shapes with ONNX Runtime's symbolic shape inference
        import sympy  # noqa: F401
    except ImportError:
        raise OptimizeError("edgediff optimize needs sympy and onnx: pip install 'edgediff[optimize]'") from None
    precision = "int8" if int8 else "fp32"
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    default = INT8_COMPONENTS if int8 else folder.required_components
    components = list(components or [c for c in default if c in folder.components])
    unknown = [c for c in components if c not in folder.components]
    if unknown:
        raise ModelFolderError(f"{folder.path} has no component(s) {unknown}; it has {folder.components}")
    reports = {}
    for component in components:
        source = folder.component_path(component)
        if (
            not force
            and find_variant(source, component, precision) is not None
            and (not int8 or recorded_key(source, component, precision).get("int8_mode", "dynamic") == mode)
        ):
            reports[component] = {"skipped": "up to date"}
            continue
        final = folder.path / VARIANT_DIRS[precision] / component
        work = final.parent / f".{component}.partial-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.time()
        try:
            fused_stats: dict = {}
            model_in = source
            if fuse:
                try:
                    model_in, fused_stats = _fuse(source, component, work)
                except Exception as e:  # an unrecognised graph: keep ONNX Runtime's own optimisation only
                    logger.warning("%s: transformer fusions failed (%s: %s); saving without them",
                                   component, type(e).__name__, e)  # fmt: skip
                    model_in = source
            if mode == "dynamic":
                model_in = _quantize_int8(model_in, work)
            elif mode == "static":
                model_in = _quantize_static(model_in, work, calibration or [])
            stage = work / "stage"
            stage.mkdir()
            _save_optimized(model_in, stage / "model.onnx")
            # static int8 is checked on a real input (mid-schedule): its scales hold for those, not for noise
            probe = calibration[len(calibration) // 2] if mode == "static" and calibration else None
            error = _check_same_outputs(source, stage / "model.onnx", component, _probe_shapes(folder, component),
                                        probe)  # fmt: skip
            if not error <= tolerance:
                raise OptimizeError(
                    f"{component}: the {precision} optimised graph differs from the original by "
                    f"{error:.2e} (relative; tolerance {tolerance:g}); nothing was written"
                )
            key = variant_key(source, bool(fused_stats), precision)
            report = {**key, "fusions": fused_stats, "max_relative_difference": error, "seconds": time.time() - t0}
            if int8:
                report["int8_mode"] = mode
                if mode == "static":
                    report["calibration"] = {"samples": len(calibration or []), **(calibration_info or {})}
            (stage / KEY_FILE).write_text(json.dumps(report, indent=1) + "\n")
            replace_dir(stage, final)
            reports[component] = report
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return reports
