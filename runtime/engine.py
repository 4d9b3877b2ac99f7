"""The Engine protocol every backend implements, and the feed check they share.

An engine is numpy in, numpy out. It declares its tensors as read from the compiled model (not
assumed), casts feeds to the dtypes its model declares (so the pipeline never cares whether a
component is fp16 or fp32), and checks names and ranks, naming the tensor on error.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import EngineInputError, EngineUnavailableError
from .specs import TensorSpec


@runtime_checkable
class Engine(Protocol):
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def check_feed(component: str, specs: Mapping[str, TensorSpec], feeds: Mapping[str, np.ndarray]) -> dict:
    """Validate ``feeds`` against ``specs`` and cast each to its declared dtype.

    Raises ``EngineInputError`` naming the component and tensor for a missing or unexpected
    name, a rank mismatch, a fixed dimension mismatch, or a value that cannot be cast safely
    (a float fed to an integer input).
    """
    missing = [n for n in specs if n not in feeds]
    extra = [n for n in feeds if n not in specs]
    if missing or extra:
        raise EngineInputError(
            f"{component}: inputs do not match the model: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}; the model takes {list(specs)}"
        )
    out = {}
    for name, spec in specs.items():
        value = np.asarray(feeds[name])
        if value.ndim != spec.rank:
            # A scalar model input accepts a 1-element array and vice versa (timestep conventions differ).
            if value.size == 1 and spec.rank <= 1:
                value = value.reshape(spec.shape if spec.rank else ())
            else:
                raise EngineInputError(
                    f"{component}: input {name!r} expects rank {spec.rank} {list(spec.shape)}, "
                    f"got shape {list(value.shape)}"
                )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
            if isinstance(want, int) and want != got:
                raise EngineInputError(
                    f"{component}: input {name!r} dimension {axis} must be {want}, got {got} "
                    f"(shape {list(value.shape)})"
                )
        if value.dtype != spec.dtype:
            if np.issubdtype(spec.dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
                raise EngineInputError(
                    f"{component}: input {name!r} is {spec.dtype.name} in the model, got {value.dtype.name}; "
                    "pass integer values"
                )
            value = value.astype(spec.dtype)
        # (not np.ascontiguousarray: it turns a 0-d scalar into shape [1])
        out[name] = value if value.flags.c_contiguous else value.copy(order="C")
    return out


# name -> (module, factory). Imported lazily so a missing backend only fails when asked for.
ENGINES = {
    "onnxruntime": ("edgediff.engines.onnxruntime", "OrtEngine"),
    "tensorrt": ("edgediff.engines.tensorrt", "TrtEngine"),
    "openvino": ("edgediff.engines.openvino", "OvEngine"),
}


def engine_class(kind: str):
    """The class of engine ``kind``, importing its library (EngineUnavailableError if missing)."""
    if kind not in ENGINES:
        raise EngineUnavailableError(f"unknown engine {kind!r}; available engines: {', '.join(ENGINES)}")
    module_name, cls_name = ENGINES[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # the backend's own library is missing
        raise EngineUnavailableError(f"engine {kind!r} cannot be imported ({e}); install its extra") from e
    return getattr(module, cls_name)


def create_engine(kind: str, path, component: str, **options) -> Engine:
    """Instantiate the engine ``kind`` for the model file at ``path``."""
    return engine_class(kind)(path, component=component, **options)
