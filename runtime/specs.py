"""The I/O contract of each sub-model and the model families, as plain data shared by export, engines and runtime.

Names follow optimum / diffusers (``sample``, ``timestep``, ``encoder_hidden_states``,
``out_sample``, ``latent_sample``) so folders written by optimum's exporter load as they are.
Shapes use ints for fixed sizes and strings for symbols (``SYMBOLS``). Every consumer derives
from these tables: export (input/output names, dynamic axes, dummy inputs, validation
tolerance), export validation and ``edgediff optimize`` (probe shapes), bench (the UNet's shapes
for the FLOP count), TensorRT (profiles, the batch doubled for guidance) and ``ModelFolder``
(the components a folder must have, the family's defaults). Engines check feeds against the
specs they read from the model file itself (dtypes there win: an fp16 export declares fp16).

A new family (SDXL, an inpainting UNet) is an addition here: its sub-model entries and a
``FAMILIES`` row; the consumers pick it up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import ModelConfigError

SYMBOLS = {
    "B": "batch: images per call; doubled (uncond ‖ cond) for the inputs a sub-model lists in guidance_doubled",
    "S": "tokens per prompt: the tokenizer's max length (CLIP: 77)",
    "D": "width of the text embeddings the UNet attends to",
    "V": "text encoder vocabulary size (dummy token ids only)",
    "C": "latent channels (the VAE's)",
    "C_in": "UNet input channels: the latent's, plus mask and masked-image latents for an inpainting UNet (9)",
    "C_out": "UNet output channels: the latent's",
    "C2": "VAE encoder output channels: mean ‖ logvar, 2 x C",
    "h": "latent height",
    "w": "latent width",
    "H": "image height in pixels (h x the VAE's factor)",
    "W": "image width in pixels (w x the VAE's factor)",
}
CLIP_POSITIONS = 77  # CLIP text encoders' max_position_embeddings: S of every family below

# (atol, rtol) of export validation: max|onnx - torch| <= atol + rtol * max|torch| per output
TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 2e-2)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]  # ints are fixed, strings are symbols, e.g. ("B", "C_in", "h", "w")
    # how dummy_inputs fills it: ("normal",), ("uniform", low, high) or ("integers", low, high), where high
    # may be a symbol; not part of the tensor's identity (specs read from a model file have the default)
    fill: tuple = field(default=("normal",), compare=False, repr=False)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def concrete(self, symbols: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with every symbol replaced by its value in ``symbols``."""
        missing = [d for d in self.shape if isinstance(d, str) and d not in symbols]
        if missing:
            raise ModelConfigError(
                f"{self.name}: the I/O contract's symbol(s) {missing} have no value for this model (known: "
                f"{sorted(symbols)}); give them in the family's defaults in runtime/specs.py"
            )
        return tuple(d if isinstance(d, int) else int(symbols[d]) for d in self.shape)

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
    source: str  # the diffusers pipeline's module it is exported from (``pipe.vae`` for both VAE halves)
    # inputs that carry uncond ‖ cond under classifier-free guidance (their B is doubled); every input with
    # a B axis must be listed or none: a model's batch axis is one size
    guidance_doubled: tuple[str, ...] = ()
    tolerance: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(TOLERANCE), hash=False)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's ``dynamic_axes`` from the symbolic dims."""
        axes = {}
        for t in (*self.inputs, *self.outputs):
            sym = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if sym:
                axes[t.name] = sym
        return axes

    def input_shapes(self, symbols: Mapping[str, int], guidance: bool = False) -> dict[str, tuple[int, ...]]:
        """Each input's concrete shape; ``guidance``: the doubled inputs get 2 x B."""
        doubled = dict(symbols, B=2 * symbols["B"]) if guidance and "B" in symbols else symbols
        return {t.name: t.concrete(doubled if t.name in self.guidance_doubled else symbols) for t in self.inputs}


def dummy_inputs(spec: SubmodelSpec, symbols: Mapping[str, int], rng: np.random.Generator,
                 guidance: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Random inputs of the contract's shapes, dtypes and value ranges (numpy; export converts to torch)."""
    shapes = spec.input_shapes(symbols, guidance)
    out = {}
    for t in spec.inputs:
        shape, kind, *args = shapes[t.name], *t.fill
        args = [symbols[a] if isinstance(a, str) else a for a in args]
        value: np.ndarray
        if kind == "integers":
            value = rng.integers(args[0], args[1], size=shape)
        elif kind == "uniform":
            value = rng.uniform(args[0], args[1], size=shape)
        else:
            value = rng.standard_normal(shape)
        out[t.name] = np.asarray(value, dtype=t.dtype)
    return out


def resolve_symbols(model: Mapping[str, int], batch: int, latent_hw: tuple[int, int], vae_downscale: int) -> dict:
    """Every symbol's value for one call: the model's fixed ones (``C``, ``S``, ``D``, ``V``, ``C_in``,
    ``C_out``, a family's own) plus the batch and sizes. ``C_in`` and ``C_out`` default to ``C``."""
    c = model["C"]
    h, w = latent_hw
    return {"C_in": c, "C_out": c, "C2": 2 * c, **model,
            "B": batch, "h": h, "w": w, "H": h * vae_downscale, "W": w * vae_downscale}  # fmt: skip


F32 = np.dtype(np.float32)

TEXT_ENCODER = SubmodelSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", np.dtype(np.int32), ("B", "S"), fill=("integers", 0, "V")),),
    outputs=(
        TensorSpec("last_hidden_state", F32, ("B", "S", "D")),
        TensorSpec("pooler_output", F32, ("B", "D")),
    ),
    source="text_encoder",
    guidance_doubled=("input_ids",),
)

UNET = SubmodelSpec(
    "unet",
    inputs=(
        TensorSpec("sample", F32, ("B", "C_in", "h", "w")),
        # Scalar fp32, also in fp16 engines: int64 would truncate Euler's fractional timesteps
        # and fp16 rounds 946.42 to 946.5 (DESIGN.md).
        TensorSpec("timestep", F32, (), fill=("uniform", 0, 1000)),
        TensorSpec("encoder_hidden_states", F32, ("B", "S", "D")),
    ),
    outputs=(TensorSpec("out_sample", F32, ("B", "C_out", "h", "w")),),
    source="unet",
    guidance_doubled=("sample", "encoder_hidden_states"),
)

VAE_DECODER = SubmodelSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent_sample", F32, ("B", "C", "h", "w")),),
    outputs=(TensorSpec("sample", F32, ("B", 3, "H", "W")),),
    source="vae",
)

VAE_ENCODER = SubmodelSpec(
    "vae_encoder",
    inputs=(TensorSpec("sample", F32, ("B", 3, "H", "W"), fill=("uniform", -1, 1)),),
    outputs=(TensorSpec("latent_parameters", F32, ("B", "C2", "h", "w")),),
    source="vae",
)

SUBMODELS: dict[str, SubmodelSpec] = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}


@dataclass(frozen=True)
class Family:
    name: str
    source_pipelines: tuple[str, ...]  # the diffusers pipeline classes (model_index.json ``_class_name``) export takes
    onnx_pipelines: Mapping[str, str] = field(hash=False)  # UNet kind -> the ``_class_name`` export writes
    source_components: tuple[str, ...]  # the sub-folders such a source has
    components: tuple[str, ...]  # what export writes, in this order
    required: tuple[str, ...]  # what the text-to-image pipeline runs: a model folder must have them
    text_hidden_act: str  # the text encoder's activation: what tells the families apart in a folder
    # symbol values of the family's published models; a folder's or source's own configs win
    defaults: Mapping[str, int] = field(hash=False)


_SD1 = Family(
    "sd1",
    source_pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    onnx_pipelines={"standard": "OnnxStableDiffusionPipeline", "inpainting": "OnnxStableDiffusionInpaintPipeline"},
    source_components=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    components=("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    required=("text_encoder", "unet", "vae_decoder"),
    text_hidden_act="quick_gelu",  # CLIP ViT-L/14
    defaults={"S": CLIP_POSITIONS, "D": 768, "C": 4},
)
FAMILIES: dict[str, Family] = {
    "sd1": _SD1,
    "sd2": replace(_SD1, name="sd2", text_hidden_act="gelu", defaults={**_SD1.defaults, "D": 1024}),  # OpenCLIP ViT-H
}
DEFAULT_FAMILY = "sd1"  # what a folder whose text encoder says nothing is taken for


def family_for(text_hidden_act: str | None) -> str:
    """The family whose text encoder uses ``text_hidden_act`` (SD 2's OpenCLIP: gelu); else ``DEFAULT_FAMILY``."""
    return next((f.name for f in FAMILIES.values() if f.text_hidden_act == text_hidden_act), DEFAULT_FAMILY)


def source_pipelines() -> list[str]:
    """The diffusers pipeline classes export takes, sorted."""
    return sorted({p for f in FAMILIES.values() for p in f.source_pipelines})


# What a UNet's ``sample`` input holds, told by its channel count C_in against the latents' C: "standard" takes the
# noisy latents; "inpainting" (SD's 9-channel inpainting UNets) takes latents ‖ mask ‖ masked-image latents.
UNET_KINDS = {"standard": "text-to-image, image-to-image, and inpainting by blending",
              "inpainting": "inpainting only: noisy latents ‖ 1-channel mask ‖ masked-image latents"}  # fmt: skip


def unet_kind(latent_channels: int, unet_in_channels: int) -> str:
    """The UNet kind (``UNET_KINDS``) of a UNet with ``unet_in_channels`` inputs over ``latent_channels`` latents."""
    if unet_in_channels == latent_channels:
        return "standard"
    if unet_in_channels == 2 * latent_channels + 1:
        return "inpainting"
    raise ModelConfigError(
        f"the UNet takes {unet_in_channels} input channels over {latent_channels} latent channels; edgediff runs "
        f"UNets of {latent_channels} (standard) or {2 * latent_channels + 1} (inpainting: latents, mask, "
        "masked-image latents) channels"
    )
