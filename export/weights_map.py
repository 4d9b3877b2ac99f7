"""Which ONNX initializer holds each diffusers weight: the map LoRAs are applied through (issue 17).

torch's exporter renames and transposes weights: a ``Linear`` weight becomes a ``MatMul`` constant
``onnx::MatMul_<n>`` of shape ``[in, out]``, while convolution weights keep their parameter path. Names alone
cannot say which is which, so the export records it by value, right after ``torch.onnx.export``: every torch
parameter of rank >= 2 is matched to the initializer with the same fp32 bytes, directly or transposed
(NVIDIA's TensorRT demo matches the same way, by hashes, at refit time). The map is written to
``<component>/weights_map.json``:

    {"format": 1, "weights": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
        {"initializer": "onnx::MatMul_9046", "transposed": true, "shape": [320, 320]}, ...},
     "ambiguous": [...]}

Parameter names are the diffusers module paths (the export wrapper's own prefix removed), as LoRA files name
them. Tensors whose bytes are not unique (all-zero or repeated weights) cannot be told apart by value: they are
listed under ``ambiguous`` and left out of the map, never guessed. An fp16 export keeps the initializer names, so
the map made on the fp32 graph holds for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx

MAP_FILE = "weights_map.json"
FORMAT = 1
_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()  # identity, not security


def parameter_digests(module, prefix: str) -> dict[str, tuple[str, str | None, list[int]]]:
    """``{diffusers name: (digest, digest of the transpose or None, shape)}`` for every fp32 parameter of rank >= 2
    of the export wrapper ``module`` whose names start with ``prefix`` (the wrapper's attribute, removed)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if tensor.ndim < 2 or not name.startswith(prefix):
            continue
        array = tensor.detach().float().cpu().numpy()
        out[name[len(prefix) :]] = (_digest(array), _digest(array.T) if array.ndim == 2 else None, list(array.shape))
    return out


def _initializer_bytes(tensor: onnx.TensorProto, folder: Path) -> bytes | None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        with open(folder / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if tensor.raw_data:
        return bytes(tensor.raw_data)
    if tensor.float_data:
        return np.asarray(tensor.float_data, np.float32).tobytes()
    return None


def initializer_digests(path: Path) -> dict[str, list[str]]:
    """``{digest: [initializer names]}`` of the fp32 initializers of rank >= 2 of the model at ``path``, read one
    tensor at a time (the weights are never all in memory)."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, list[str]] = {}
    for tensor in model.graph.initializer:
        if len(tensor.dims) < 2 or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        data = _initializer_bytes(tensor, path.parent)
        if data is not None:
            out.setdefault(hashlib.sha1(data).hexdigest(), []).append(tensor.name)
    return out


def build(params: dict, initializers: dict) -> dict:
    """The map: each parameter to the one initializer with its bytes (direct first, then transposed)."""
    counts: dict[str, int] = {}
    for digest, digest_t, _ in params.values():
        for d in {digest, digest_t} - {None}:
            counts[d] = counts.get(d, 0) + 1
    weights, ambiguous = {}, []
    for name, (digest, digest_t, shape) in params.items():
        for d, transposed in ((digest, False), (digest_t, True)):
            if d is None or d not in initializers:
                continue
            if counts[d] > 1 or len(initializers[d]) > 1:
                ambiguous.append(name)
            else:
                weights[name] = {"initializer": initializers[d][0], "transposed": transposed, "shape": shape}
            break
    return {"format": FORMAT, "weights": dict(sorted(weights.items())), "ambiguous": sorted(ambiguous)}


def write(component_dir: Path, weights_map: dict) -> Path:
    path = component_dir / MAP_FILE
    tmp = path.with_name(f".{MAP_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(weights_map, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
