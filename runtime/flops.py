"""Floating-point operations of an ONNX graph at given input shapes, read from the graph itself.

Counts the multiply-adds of Conv, ConvTranspose, MatMul and Gemm (2 FLOP each), which are
>99 % of a Stable Diffusion UNet's arithmetic; normalisations, activations and element-wise ops
are not counted (the usual convention, as in the published SD GFLOP figures). Shapes come from
ONNX Runtime's symbolic shape inference on the graph with its inputs fixed (onnx's own inference
leaves the attention reshapes unknown); weights are not loaded, so a 3.4 GB UNet costs a few
seconds. Needs ``onnx`` and ``sympy`` (the ``optimize`` extra), imported here only: the
runtime's generate path never needs them; without them ``edgediff bench`` reports no FLOPs.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference


def _dims(value_info) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]  # 0: a symbolic dimension
    return None if any(d <= 0 for d in dims) else dims


def count_flops(path: str | Path, input_shapes: dict[str, list[int]]) -> dict:
    """``{"total": FLOP, "by_op": {op: FLOP}, "uncounted": [node names whose shapes are unknown]}``
    for one call of the model at ``path`` with ``input_shapes`` (every dynamic input named)."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    # Shape inference reads the values of small constants (reshape targets, scales); bring those in
    # from an external-data file, leave the weights where they are.
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for init in graph.initializer:
        if uses_external_data(init):
            length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
            if length is not None and length <= 1 << 16:
                load_external_data_for_tensor(init, str(Path(path).parent))
                init.data_location = onnx.TensorProto.DEFAULT
    initializer_names = {i.name for i in graph.initializer}
    for inp in graph.input:
        if inp.name in initializer_names:
            continue
        if inp.name not in input_shapes:
            dims = _dims(inp)
            if dims is None and inp.type.tensor_type.shape.dim:
                raise ValueError(f"give a shape for input {inp.name!r}")
            continue
        shape = input_shapes[inp.name]
        dim_list = inp.type.tensor_type.shape.dim
        if len(dim_list) != len(shape):
            raise ValueError(f"input {inp.name!r} has rank {len(dim_list)}, got shape {shape}")
        for d, v in zip(dim_list, shape):
            d.Clear()
            d.dim_value = int(v)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes: dict[str, list[int] | None] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[vi.name] = _dims(vi)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)

    by_op: dict[str, float] = {}
    uncounted = []
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        a = shapes.get(node.input[0])
        b = shapes.get(node.input[1])
        out = shapes.get(node.output[0])
        if a is None or b is None or out is None:
            uncounted.append(node.name or node.op_type)
            continue
        if node.op_type == "Conv":  # out [N, Cout, *spatial], weight [Cout, Cin/groups, *kernel]
            flop = 2 * math.prod(out) * math.prod(b[1:])
        elif node.op_type == "ConvTranspose":  # weight [Cin, Cout/groups, *kernel]: each input pixel scatters
            flop = 2 * math.prod(a) * math.prod(b[1:])
        elif node.op_type == "MatMul":  # [..., M, K] @ [..., K, N] -> [..., M, N]
            flop = 2 * math.prod(out) * a[-1]
        else:  # Gemm: transA decides which of A's dims is K
            trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
            flop = 2 * math.prod(out) * (a[0] if trans_a else a[-1])
        by_op[node.op_type] = by_op.get(node.op_type, 0.0) + float(flop)
    return {"total": sum(by_op.values()), "by_op": by_op, "uncounted": uncounted}
