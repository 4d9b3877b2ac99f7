"""ONNX Runtime engine: one InferenceSession, numpy in and numpy out.

Any execution provider by name (``providers=["CUDAExecutionProvider", "CPUExecutionProvider"]``);
the default is the CPU provider. Tensor dtypes and ranks are read from the session, never assumed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgediff.runtime.engine import check_feed
from edgediff.runtime.errors import EngineUnavailableError, ModelFolderError
from edgediff.runtime.specs import TensorSpec

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - onnxruntime is a base dependency
    raise EngineUnavailableError(
        "onnxruntime is not installed; `pip install onnxruntime` (CPU) or `onnxruntime-gpu`"
    ) from e

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


class OrtEngine:
    def __init__(
        self,
        path: str | os.PathLike,
        component: str = "model",
        providers: Sequence[str] | None = None,
        session_options: ort.SessionOptions | None = None,
    ):
        self.component = component
        path = Path(path)
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise EngineUnavailableError(
                f"execution provider(s) {unknown} are not available in this onnxruntime build "
                f"(available: {available}); install the matching onnxruntime package or choose another provider"
            )
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ModelFolderError(
                f"{component}: ONNX Runtime cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "the file is damaged or incomplete: re-export the model"
            ) from e
        self.providers = self.session.get_providers()
        self.inputs = {a.name: _spec(a) for a in self.session.get_inputs()}
        self.outputs = {a.name: _spec(a) for a in self.session.get_outputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feed(self.component, self.inputs, feeds)
        values = self.session.run(None, checked)
        return dict(zip(self.outputs, values))

    def close(self) -> None:
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
