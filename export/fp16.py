"""fp32 ONNX -> fp16 ONNX. Weights and compute go to fp16; graph inputs and outputs stay fp32
(so the timestep input stays fp32, as DESIGN.md requires, and engines need no special casing).

Uses ONNX Runtime's own float16 converter (it ships inside the onnxruntime package and knows
which ops must stay fp32) rather than writing our own. The converter needs value types for every
tensor (else it turns Resize's scale constants into fp16, which is invalid); shape inference is
run on the file path first, which also works for models over protobuf's 2 GB limit.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .onnx_export import save_onnx


def convert_to_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # beside the source, so relative external-data references still resolve
    inferred = src.parent / ".shape-inferred.onnx"
    try:
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred))
    finally:
        inferred.unlink(missing_ok=True)
    fp16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    save_onnx(fp16, dst)
