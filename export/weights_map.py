"""Which ONNX initializer holds each diffusers weight: the map LoRAs are applied through (issue 17).

torch's exporter renames and transposes weights: a ``Linear`` weight becomes a ``MatMul`` constant
``onnx::MatMul_<n>`` of shape ``[in, out]``, while convolution weights keep their parameter path. Names alone
cannot say which is which, so the export records it by value, right after ``torch.onnx.export``: every torch
parameter of rank >= 2 is matched to the initializer with the same bytes (fp32, or fp16 for an fp16 graph),
directly or transposed (NVIDIA's TensorRT demo matches the same way, by hashes, at refit time). The map is
written to ``<component>/weights_map.json``:

    {"format": 2,
     "model": {"sha1": <of model.onnx>, "data": "model.onnx_data", "data_bytes": <its size>},
     "weights": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
        {"initializer": "onnx::MatMul_9046", "transposed": true, "shape": [320, 320]}, ...},
     "ambiguous": [...],
     "initializers": {"onnx::MatMul_9046": {"offset": 0, "length": 409600, "dtype": "float32",
                                           "shape": [320, 320]}, ...}}

Parameter names are the diffusers module paths (the export wrapper's own prefix removed), as LoRA files name
them. Tensors whose bytes are not unique (all-zero or repeated weights) cannot be told apart by value: they are
listed under ``ambiguous`` and left out of the map, never guessed.

The runtime merges LoRAs with numpy alone (no ``onnx`` package), so a LoRA target keeps every initializer in
its external-data file ``model.onnx_data`` (``externalize``), and the map says where each float initializer's
bytes lie there. That is also what ONNX Runtime needs: ``add_external_initializers`` replaces external
initializers only, and it is the one API that replaces convolution weights at optimisation level ``all``
(``add_initializer`` silently keeps the old ones; ../shared/reference/lora.md §4). ``model.sha1`` ties the map to
the graph it was made on: a map that no longer matches its ``model.onnx`` is refused with the command that
remakes it (``edgediff weights-map``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# the runtime reads the map (edgediff.runtime.lora_apply): its file name and format are defined there
from edgediff.runtime.lora_apply import MAP_FILE
from edgediff.runtime.lora_apply import MAP_FORMAT as FORMAT

DATA_FILE = "model.onnx_data"  # every export's one external-data file (onnx_export.py takes it from here)

_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()  # identity, not security


def parameter_digests(module, prefix: str, dtype=np.float32) -> dict[str, tuple[str, str | None, list[int]]]:
    """``{diffusers name: (digest, digest of the transpose or None, shape)}`` for every float parameter of rank >= 2
    of the export wrapper ``module`` whose names start with ``prefix`` (the wrapper's attribute, removed), taken in
    ``dtype`` (fp16 for an fp16 graph: the converter rounds the fp32 weights to nearest, as numpy does)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if tensor.ndim < 2 or not name.startswith(prefix) or not tensor.is_floating_point():
            continue
        array = tensor.detach().float().cpu().numpy().astype(dtype)
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
    if tensor.data_type in _TO_NUMPY:
        return numpy_helper.to_array(tensor).tobytes()
    return None


def graph_dtype(path: Path) -> type:
    """np.float16 when the graph's weights are fp16 (an fp16 export), else np.float32."""
    model = onnx.load(str(path), load_external_data=False)
    kinds = [t.data_type for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type in _TO_NUMPY]
    return np.float16 if kinds and kinds.count(onnx.TensorProto.FLOAT16) > len(kinds) // 2 else np.float32


def initializer_digests(path: Path) -> dict[str, list[str]]:
    """``{digest: [initializer names]}`` of the float initializers of rank >= 2 of the model at ``path``, read one
    tensor at a time (the weights are never all in memory)."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, list[str]] = {}
    for tensor in model.graph.initializer:
        if len(tensor.dims) < 2 or tensor.data_type not in _TO_NUMPY:
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


def _align(offset: int, size: int) -> int:
    step = 4096 if size >= 1 << 20 else 64  # page-aligned large tensors, so ONNX Runtime can map them
    return -(-offset // step) * step


def externalize(path: Path) -> bool:
    """Move every inline initializer of the model at ``path`` into its external-data file (appended to
    ``model.onnx_data``, created if absent); True when the model changed. The data file only grows (bytes the old
    graph never names), and ``model.onnx`` is written beside itself and renamed over the old one, so an
    interruption leaves a working model."""
    model = onnx.load(str(path), load_external_data=False)
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    if not inline:
        return False
    data_path = path.parent / DATA_FILE
    with open(data_path, "ab") as data:
        offset = data.tell()
        for tensor in inline:
            raw = numpy_helper.to_array(tensor).tobytes()
            start = _align(offset, len(raw))
            data.write(b"\0" * (start - offset) + raw)
            offset = start + len(raw)
            dims, name, dtype = list(tensor.dims), tensor.name, tensor.data_type
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", DATA_FILE), ("offset", str(start)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        data.flush()
        os.fsync(data.fileno())
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return True


def storage(path: Path) -> tuple[dict, dict]:
    """``(model record, {initializer: {offset, length, dtype, shape}})`` for the float initializers of the model at
    ``path``, all stored in ``model.onnx_data`` (``externalize`` first)."""
    model = onnx.load(str(path), load_external_data=False)
    table = {}
    for tensor in model.graph.initializer:
        if tensor.data_type not in _TO_NUMPY:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location != onnx.TensorProto.EXTERNAL or info.get("location") != DATA_FILE:
            raise ValueError(f"{path}: initializer {tensor.name!r} is not in {DATA_FILE}; externalize the model first")
        dtype = np.dtype(_TO_NUMPY[tensor.data_type]).name
        table[tensor.name] = {"offset": int(info.get("offset", 0)), "length": int(info["length"]), "dtype": dtype,
                              "shape": list(tensor.dims)}  # fmt: skip
    record = {"sha1": hashlib.sha1(path.read_bytes()).hexdigest(), "data": DATA_FILE,
              "data_bytes": (path.parent / DATA_FILE).stat().st_size}  # fmt: skip
    return record, table


def make(path: Path, params: dict) -> dict:
    """The whole map of the model at ``path`` (externalized here) for the torch digests ``params``."""
    externalize(path)
    weights_map = build(params, initializer_digests(path))
    weights_map["model"], weights_map["initializers"] = storage(path)
    return weights_map


def remake(path: Path, weights_map: dict) -> dict:
    """The map of a converted graph that kept the initializer names (the fp16 export): the same weights, its own
    storage."""
    externalize(path)
    out = {k: v for k, v in weights_map.items() if k not in ("model", "initializers")}
    out["model"], out["initializers"] = storage(path)
    return out


def write(component_dir: Path, weights_map: dict) -> Path:
    path = component_dir / MAP_FILE
    tmp = path.with_name(f".{MAP_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(weights_map, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
