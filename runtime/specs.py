"""The I/O contract of each sub-model, as plain data shared by export, engines and runtime.

Names follow optimum / diffusers (``sample``, ``timestep``, ``encoder_hidden_states``,
``out_sample``, ``latent_sample``) so folders written by optimum's exporter load as they are.
Shapes use ints for fixed sizes and strings for symbols. ``export`` derives input/output names
and dynamic axes from these tables; engines check feeds against the specs they read from the
model file itself (dtypes there win: an fp16 export declares fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]  # ints are fixed, strings are symbols, e.g. ("B", 4, "h", "w")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": np.dtype(self.dtype).name, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], np.dtype(d["dtype"]), tuple(d["shape"]))


@dataclass(frozen=True)
class SubmodelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's ``dynamic_axes`` from the symbolic dims."""
        axes = {}
        for t in (*self.inputs, *self.outputs):
            sym = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if sym:
                axes[t.name] = sym
        return axes


F32 = np.dtype(np.float32)

TEXT_ENCODER = SubmodelSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", np.dtype(np.int32), ("B", "S")),),
    outputs=(
        TensorSpec("last_hidden_state", F32, ("B", "S", "D")),
        TensorSpec("pooler_output", F32, ("B", "D")),
    ),
)

UNET = SubmodelSpec(
    "unet",
    inputs=(
        TensorSpec("sample", F32, ("B", "C", "h", "w")),
        # Scalar fp32, also in fp16 engines: int64 would truncate Euler's fractional timesteps
        # and fp16 rounds 946.42 to 946.5 (DESIGN.md).
        TensorSpec("timestep", F32, ()),
        TensorSpec("encoder_hidden_states", F32, ("B", "S", "D")),
    ),
    outputs=(TensorSpec("out_sample", F32, ("B", "C", "h", "w")),),
)

VAE_DECODER = SubmodelSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent_sample", F32, ("B", "C", "h", "w")),),
    outputs=(TensorSpec("sample", F32, ("B", 3, "H", "W")),),
)

VAE_ENCODER = SubmodelSpec(
    "vae_encoder",
    inputs=(TensorSpec("sample", F32, ("B", 3, "H", "W")),),
    outputs=(TensorSpec("latent_parameters", F32, ("B", "C2", "h", "w")),),
)

SUBMODELS: dict[str, SubmodelSpec] = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
