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

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import ModelConfigError

SYMBOLS = {
    "B": "batch: images per call; doubled (uncond ‖ cond) for the inputs a sub-model lists in guidance_doubled",
    "S": "tokens per prompt: the tokenizer's max length (CLIP: 77)",
    "D": "width of the text embeddings the UNet attends to (SDXL: both encoders' hidden states, D1 + D2)",
    "D1": "width of the (first) text encoder's hidden states: D in SD 1/2",
    "V": "text encoder vocabulary size (dummy token ids only)",
    "V2": "SDXL: the second text encoder's vocabulary size (dummy token ids only)",
    "C": "latent channels (the VAE's)",
    "C_in": "UNet input channels: the latent's, plus mask and masked-image latents for an inpainting UNet (9)",
    "C_out": "UNet output channels: the latent's",
    "C2": "VAE encoder output channels: mean ‖ logvar, 2 x C",
    "h": "latent height",
    "w": "latent width",
    "H": "image height in pixels (h x the VAE's factor)",
    "W": "image width in pixels (w x the VAE's factor)",
    "D2": "SDXL: width of the second text encoder's hidden states (D = the first's + D2)",
    "P": "SDXL: width of the pooled text embedding (the second text encoder's projection)",
    "T": "SDXL: size-conditioning numbers per image (6: original size, crop top-left, target size)",
    "E": "LCM: width of the guidance embedding (the UNet's time_cond_proj_dim)",
}
# Model features: what some models' tensors exist for. A tensor that names one (``TensorSpec.needs``) is in a
# model's contract only when the model has the feature (``SubmodelSpec.for_model``).
FEATURES = {
    "hidden_states": "text encoders output every layer's hidden states (SDXL conditions on the penultimate)",
    "added_cond": "SDXL's added conditioning: the UNet takes the pooled text embedding and the size numbers",
    "timestep_cond": "an LCM-distilled UNet takes the guidance scale as an embedding (time_cond_proj_dim)",
}
LAYER = "{layer}"  # in a tensor name: one tensor per hidden-state layer, 0 (the embeddings) .. the layer count
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
    # the model feature (``FEATURES``) this tensor exists for; None: every model has it
    needs: str | None = field(default=None, compare=False, repr=False)

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

    def for_model(self, features: Collection[str] = (), layers: int | None = None) -> SubmodelSpec:
        """This sub-model's contract for one model: the tensors of the ``features`` it has, and each per-layer
        tensor (``LAYER`` in its name) once per hidden state, ``hidden_states.0`` .. ``hidden_states.{layers}``."""

        def keep(tensors: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
            out: list[TensorSpec] = []
            for t in tensors:
                if t.needs is not None and t.needs not in features:
                    continue
                if LAYER not in t.name:
                    out.append(t)
                elif layers is None:
                    raise ModelConfigError(f"{self.name}: {t.name} needs the text encoder's layer count")
                else:
                    out += [replace(t, name=t.name.replace(LAYER, str(i))) for i in range(layers + 1)]
            return tuple(out)

        inputs = keep(self.inputs)
        doubled = tuple(n for n in self.guidance_doubled if any(t.name == n for t in inputs))
        return replace(self, inputs=inputs, outputs=keep(self.outputs), guidance_doubled=doubled)

    def all_input_names(self) -> tuple[str, ...]:
        """Every input any model may have (the optional ones included)."""
        return tuple(t.name for t in self.inputs)

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
    return {"C_in": c, "C_out": c, "C2": 2 * c, "D1": model.get("D", 0), **model,
            "B": batch, "h": h, "w": w, "H": h * vae_downscale, "W": w * vae_downscale}  # fmt: skip


F32 = np.dtype(np.float32)


def _hidden_states(width: str) -> TensorSpec:
    return TensorSpec(f"hidden_states.{LAYER}", F32, ("B", "S", width), needs="hidden_states")


TEXT_ENCODER = SubmodelSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", np.dtype(np.int32), ("B", "S"), fill=("integers", 0, "V")),),
    outputs=(
        TensorSpec("last_hidden_state", F32, ("B", "S", "D1")),
        TensorSpec("pooler_output", F32, ("B", "D1")),
        _hidden_states("D1"),
    ),
    source="text_encoder",
    guidance_doubled=("input_ids",),
)

# SDXL's second encoder (CLIPTextModelWithProjection); optimum's output order
TEXT_ENCODER_2 = SubmodelSpec(
    "text_encoder_2",
    inputs=(TensorSpec("input_ids", np.dtype(np.int32), ("B", "S"), fill=("integers", 0, "V2")),),
    outputs=(
        TensorSpec("text_embeds", F32, ("B", "P")),
        TensorSpec("last_hidden_state", F32, ("B", "S", "D2")),
        _hidden_states("D2"),
    ),
    source="text_encoder_2",
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
        TensorSpec("text_embeds", F32, ("B", "P"), needs="added_cond"),
        # (h, w, top, left, h, w) in pixels: sizes up to a few thousand
        TensorSpec("time_ids", F32, ("B", "T"), fill=("uniform", 0, 1024), needs="added_cond"),
        TensorSpec("timestep_cond", F32, ("B", "E"), needs="timestep_cond"),
    ),
    outputs=(TensorSpec("out_sample", F32, ("B", "C_out", "h", "w")),),
    source="unet",
    guidance_doubled=("sample", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond"),
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

# The tiny autoencoder (diffusers' AutoencoderTiny, TAESD): latents in the scaled space the UNet works in (its
# scaling factor is 1), pixels in [-1, 1]; its encoder gives the latents themselves, not a distribution.
VAE_DECODER_TINY = replace(VAE_DECODER, name="vae_decoder_tiny", source="vae_tiny")
VAE_ENCODER_TINY = SubmodelSpec(
    "vae_encoder_tiny",
    inputs=(TensorSpec("sample", F32, ("B", 3, "H", "W"), fill=("uniform", -1, 1)),),
    outputs=(TensorSpec("latent_sample", F32, ("B", "C", "h", "w")),),
    source="vae_tiny",
)
TINY_COMPONENTS = ("vae_decoder_tiny", "vae_encoder_tiny")

SUBMODELS: dict[str, SubmodelSpec] = {
    s.name: s
    for s in (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER, VAE_DECODER_TINY, VAE_ENCODER_TINY)
}


MODES = ("txt2img", "img2img", "inpaint")
SD_DEFAULTS = {
    "txt2img": {"num_inference_steps": 50, "guidance_scale": 7.5},
    "img2img": {"num_inference_steps": 50, "guidance_scale": 7.5, "strength": 0.8},
    "inpaint": {"num_inference_steps": 50, "guidance_scale": 7.5, "strength": 1.0},
}
SDXL_DEFAULTS = {  # diffusers' StableDiffusionXL*Pipeline signatures (0.39); inpainting's 0.9999 since 0.21
    "txt2img": {"num_inference_steps": 50, "guidance_scale": 5.0},
    "img2img": {"num_inference_steps": 50, "guidance_scale": 5.0, "strength": 0.3},
    "inpaint": {"num_inference_steps": 50, "guidance_scale": 7.5, "strength": 0.9999},
}


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
    features: frozenset[str] = frozenset()  # FEATURES every model of the family has
    tokenizers: tuple[str, ...] = ("tokenizer",)  # one per text encoder, in order
    # the diffusers pipeline that loads a source folder of the family (any of source_pipelines)
    loader: str = "StableDiffusionPipeline"
    # diffusers' call defaults per mode (txt2img, img2img, inpaint): num_inference_steps, guidance_scale, strength
    call_defaults: Mapping[str, Mapping[str, float]] = field(hash=False, default_factory=lambda: dict(SD_DEFAULTS))


_SD1 = Family(
    "sd1",
    source_pipelines=(
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "LatentConsistencyModelPipeline",
    ),
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
    # SDXL base: CLIP ViT-L (penultimate layer) ‖ OpenCLIP ViT-bigG (penultimate layer; its pooled projection and
    # the size numbers go in as added conditioning)
    "sdxl": Family(
        "sdxl",
        source_pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                          "StableDiffusionXLInpaintPipeline"),
        # optimum's SDXL export keeps the diffusers class name (diffusers has no ONNX SDXL pipeline)
        onnx_pipelines={"standard": "StableDiffusionXLPipeline", "inpainting": "StableDiffusionXLInpaintPipeline"},
        source_components=("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
        components=("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
        required=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
        text_hidden_act="quick_gelu",
        defaults={"S": CLIP_POSITIONS, "D": 2048, "D1": 768, "D2": 1280, "P": 1280, "T": 6, "C": 4},
        features=frozenset({"hidden_states", "added_cond"}),
        tokenizers=("tokenizer", "tokenizer_2"),
        loader="StableDiffusionXLPipeline",
        call_defaults=SDXL_DEFAULTS,
    ),
}  # fmt: skip
DEFAULT_FAMILY = "sd1"  # what a folder whose text encoder says nothing is taken for


def family_for(text_hidden_act: str | None, two_encoders: bool = False) -> str:
    """The family of a model: SDXL when it has a second text encoder, else the family whose text encoder uses
    ``text_hidden_act`` (SD 2's OpenCLIP: gelu), else ``DEFAULT_FAMILY``."""
    if two_encoders:
        return "sdxl"
    return next((f.name for f in FAMILIES.values() if f.text_hidden_act == text_hidden_act and len(f.tokenizers) == 1),
                DEFAULT_FAMILY)  # fmt: skip


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
