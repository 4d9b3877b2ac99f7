"""Run each exported component and its PyTorch original on the same random inputs; collect every
mismatch, then raise one ExportValidationError listing them all (STYLE E7).

Tolerance: a component passes when ``max|onnx - torch| <= atol + rtol * max|torch|`` on every
output, for every probe (batch 1 at the native size, batch 3 at a smaller, non-square latent, so
dynamic axes are exercised; shapes and inputs from the I/O contract). (atol, rtol) is the
contract's per component (``SubmodelSpec.tolerance``): fp32 1e-4, 1e-3; fp16 1e-2, 2e-2 (a
looser bound, since fp16 keeps about 3 significant digits). PSNR is reported for a quick read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgediff.runtime.measure import psnr

from .onnx_export import dummy_inputs, native_latent, pipe_spec, wrap

logger = logging.getLogger(__name__)


@dataclass
class Check:
    component: str
    output: str
    shape: tuple
    max_abs: float
    ref_max: float
    psnr: float
    passed: bool

    def describe(self) -> str:
        return (
            f"{self.component}.{self.output} {list(self.shape)}: max|diff| {self.max_abs:.3g} "
            f"(ref max {self.ref_max:.3g}, PSNR {self.psnr:.1f} dB)"
        )


def probe_shapes(pipe, name: str) -> list[dict]:
    """Batch and latent size of each probe (``dummy_inputs`` keywords)."""
    size = native_latent(pipe)[0]
    small = max(size // 2 - (size // 2) % 8, 8) if size >= 16 else size
    return [dict(batch=1), dict(batch=3, latent_hw=(small, size))]


@dataclass
class Reference:
    """One probe: the inputs (numpy) and the PyTorch original's outputs, in the contract's order."""

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]


def reference_outputs(pipe, name: str, device: str = "cpu") -> list[Reference]:
    """The PyTorch original's outputs on every probe (computed once: the fp32 and fp16 checks share them, and the
    torch model can be released before ONNX Runtime loads the export)."""
    spec = pipe_spec(pipe, name)
    module = wrap(pipe, name)
    refs = []
    for k, probe in enumerate(probe_shapes(pipe, name)):
        inputs = dummy_inputs(pipe, name, seed=k + 1, **probe)
        with torch.inference_mode():
            out = module(*(inputs[t.name].to(device) for t in spec.inputs))
        out = out if isinstance(out, tuple) else (out,)
        refs.append(Reference({t.name: inputs[t.name].numpy() for t in spec.inputs},
                              [r.float().cpu().numpy() for r in out]))  # fmt: skip
    return refs


def compare(name: str, spec, onnx_path: Path, references: list[Reference], precision: str = "fp32",
            device: str = "cpu") -> list[Check]:  # fmt: skip
    """ONNX Runtime on the references' inputs against their outputs. ``device="cuda"`` runs ONNX Runtime with its
    CUDA provider when the installed onnxruntime has it (fast validation of full-size models)."""
    import onnxruntime as ort

    atol, rtol = spec.tolerance[precision]
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
    if (Path(onnx_path).parent / "model.onnx_data").is_file():  # over 2 GB: graph rewrites that copy weights off
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    checks = []
    for ref in references:
        got = session.run(None, ref.inputs)
        for t, r, g in zip(spec.outputs, ref.outputs, got):
            g = np.asarray(g, dtype=np.float32)
            if r.shape != g.shape:
                checks.append(Check(name, t.name, g.shape, math.inf, 0.0, -math.inf, False))
                continue
            max_abs = float(np.max(np.abs(r - g)))
            ref_max = float(np.max(np.abs(r)))
            ok = max_abs <= atol + rtol * ref_max
            checks.append(Check(name, t.name, r.shape, max_abs, ref_max, psnr(g, r, ref_max), ok))
    del session
    return checks


def check_component(pipe, name: str, onnx_path: Path, precision: str = "fp32", device: str = "cpu") -> list[Check]:
    """The ONNX export of sub-model ``name`` against its PyTorch original, on every probe."""
    return compare(name, pipe_spec(pipe, name), onnx_path, reference_outputs(pipe, name, device), precision, device)
