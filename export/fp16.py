"""fp32 ONNX -> fp16 ONNX. Weights and compute go to fp16; graph inputs and outputs stay fp32
(so the timestep input stays fp32, as DESIGN.md requires, and engines need no special casing).

Uses ONNX Runtime's own float16 converter (it ships inside the onnxruntime package and knows
which ops must stay fp32) rather than writing our own.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .onnx_export import save_onnx


def convert_to_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    fp16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    save_onnx(fp16, dst)
