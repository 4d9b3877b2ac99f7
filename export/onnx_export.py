"""torch -> ONNX, one function per sub-model. Input/output names, dynamic axes and dummy inputs come
from ``edgediff.runtime.specs`` so export, engines and runtime agree by construction.

We call ``torch.onnx.export`` (TorchScript exporter, as optimum's exporter does) rather than
optimum's ``main_export``: it writes the same layout and tensor names, but its sub-model list,
I/O dtypes (int32 ids for TensorRT) and validation are what this module controls.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from edgediff.runtime import specs
from edgediff.runtime.specs import FAMILIES, SUBMODELS, SubmodelSpec
from edgediff.runtime.tokenizer import max_length

from .weights_map import DATA_FILE as EXTERNAL_DATA

# protobuf's hard limit; larger models keep their weights in one external-data file
_PROTOBUF_LIMIT = 2**31 - 1


class TextEncoderWrapper(torch.nn.Module):
    """The contract's outputs in its order: CLIPTextModel (last_hidden_state, pooler_output), SDXL's
    CLIPTextModelWithProjection (text_embeds, last_hidden_state); then, with ``hidden_states``, every layer's."""

    def __init__(self, text_encoder, hidden_states: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.hidden_states = hidden_states

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=self.hidden_states, return_dict=True)
        first = (out.text_embeds, out.last_hidden_state) if hasattr(out, "text_embeds") else (
            out.last_hidden_state, out.pooler_output)  # fmt: skip
        return (*first, *out.hidden_states) if self.hidden_states else first


class UNetWrapper(torch.nn.Module):
    """Positional inputs in the contract's order; SDXL's text_embeds/time_ids go in as ``added_cond_kwargs``,
    an LCM UNet's guidance embedding as ``timestep_cond``."""

    def __init__(self, unet, inputs: tuple[str, ...] = ("sample", "timestep", "encoder_hidden_states")):
        super().__init__()
        self.unet = unet
        self.input_names = inputs

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        named = dict(zip(self.input_names[3:], extra, strict=True))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=named.get("timestep_cond"),
                         added_cond_kwargs=added or None, return_dict=False)[0]  # fmt: skip


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """Outputs the latent distribution's parameters (mean ‖ logvar); sampling happens in numpy."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        return h


class TinyDecoderWrapper(torch.nn.Module):
    """diffusers' AutoencoderTiny decoder: the UNet's latents (its scaling factor is 1) -> pixels in [-1, 1]."""

    def __init__(self, vae_tiny):
        super().__init__()
        self.vae = vae_tiny

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class TinyEncoderWrapper(torch.nn.Module):
    """diffusers' AutoencoderTiny encoder: pixels in [-1, 1] -> the latents themselves (no distribution)."""

    def __init__(self, vae_tiny):
        super().__init__()
        self.vae = vae_tiny

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0]


class TinyVaeSource:
    """The tiny autoencoder alone, for adding it to a model folder that is already exported: what the export and
    validation helpers read of a pipeline (the contract's symbols, the VAE factor, the native latent size)."""

    def __init__(self, vae_tiny, symbols: dict[str, int], downscale: int, native: tuple[int, int]):
        self.vae_tiny = vae_tiny
        self.symbols, self.downscale, self.native = symbols, downscale, native


def wrap(pipe, name: str) -> torch.nn.Module:
    spec = pipe_spec(pipe, name)
    hidden = any(t.name.startswith("hidden_states.") for t in spec.outputs)
    module = {
        "text_encoder": lambda: TextEncoderWrapper(pipe.text_encoder, hidden),
        "text_encoder_2": lambda: TextEncoderWrapper(pipe.text_encoder_2, hidden),
        "unet": lambda: UNetWrapper(pipe.unet, tuple(t.name for t in spec.inputs)),
        "vae_decoder": lambda: VaeDecoderWrapper(pipe.vae),
        "vae_encoder": lambda: VaeEncoderWrapper(pipe.vae),
        "vae_decoder_tiny": lambda: TinyDecoderWrapper(pipe.vae_tiny),
        "vae_encoder_tiny": lambda: TinyEncoderWrapper(pipe.vae_tiny),
    }[name]()
    return module.eval()


def family_of(pipe) -> str:
    return specs.family_for(getattr(pipe.text_encoder.config, "hidden_act", None),
                            two_encoders=getattr(pipe, "text_encoder_2", None) is not None)  # fmt: skip


def features_of(pipe) -> frozenset[str]:
    """The model's ``specs.FEATURES``: its family's, and ``timestep_cond`` for an LCM-distilled UNet."""
    if isinstance(pipe, TinyVaeSource):
        return frozenset()
    lcm = getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None
    return FAMILIES[family_of(pipe)].features | ({"timestep_cond"} if lcm else set())


def pipe_spec(pipe, name: str) -> SubmodelSpec:
    """Sub-model ``name``'s contract for this pipeline's model."""
    module = getattr(pipe, SUBMODELS[name].source, None)
    layers = getattr(getattr(module, "config", None), "num_hidden_layers", None) if name.startswith("text_") else None
    return SUBMODELS[name].for_model(features_of(pipe), layers)


def text_length(pipe) -> int:
    """S: the runtime tokenizer's rule applied to the source's tokenizer."""
    positions = getattr(pipe.text_encoder.config, "max_position_embeddings", None)
    return max_length(pipe.tokenizer.model_max_length, positions if isinstance(positions, int) else None)


def vae_downscale(pipe) -> int:
    if isinstance(pipe, TinyVaeSource):
        return pipe.downscale
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def native_latent(pipe) -> tuple[int, int]:
    if isinstance(pipe, TinyVaeSource):
        return pipe.native
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return size, size


def model_symbols(pipe) -> dict[str, int]:
    """The contract's fixed symbols for a diffusers pipeline: its family's defaults, overridden by its configs."""
    if isinstance(pipe, TinyVaeSource):
        return dict(pipe.symbols)
    unet, te = pipe.unet.config, pipe.text_encoder.config
    symbols = {**FAMILIES[family_of(pipe)].defaults, "C": int(pipe.vae.config.latent_channels),
               "C_in": int(unet.in_channels), "C_out": int(unet.out_channels), "S": text_length(pipe),
               "D": int(unet.cross_attention_dim), "D1": int(te.hidden_size), "V": int(te.vocab_size)}  # fmt: skip
    if getattr(unet, "time_cond_proj_dim", None) is not None:
        symbols["E"] = int(unet.time_cond_proj_dim)
    te2 = getattr(pipe, "text_encoder_2", None)
    if te2 is not None:
        p = int(te2.config.projection_dim)
        symbols |= {
            "D2": int(te2.config.hidden_size),
            "V2": int(te2.config.vocab_size),
            "P": p,
            "T": (int(unet.projection_class_embeddings_input_dim) - p) // int(unet.addition_time_embed_dim),
        }
    return symbols


def dummy_inputs(pipe, name: str, batch: int = 1, latent_hw: tuple[int, int] | None = None, seed: int = 0) -> dict:
    """Random inputs of the contract's shapes and dtypes for sub-model ``name`` (torch tensors)."""
    symbols = specs.resolve_symbols(model_symbols(pipe), batch, latent_hw or native_latent(pipe), vae_downscale(pipe))
    arrays = specs.dummy_inputs(pipe_spec(pipe, name), symbols, np.random.default_rng(seed))
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def guidance_frequencies(dim: int) -> list[float]:
    """The frequencies of an LCM UNet's guidance embedding as torch computes them in float32 (diffusers'
    ``get_guidance_scale_embedding``); numpy's float32 ``exp`` differs from torch's by an ulp in about half of
    them, which moves sin(w x f) by up to 1e-3 at w = 7000, so the runtime reads them from the manifest."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    return [float(f) for f in torch.exp(torch.arange(half, dtype=torch.float32) * -step)]


def export_component(pipe, name: str, out_dir: Path, opset: int = 17, device: str = "cpu",
                     consolidate: bool = True) -> Path:  # fmt: skip
    """Export sub-model ``name`` to ``out_dir/model.onnx`` (+ one external-data file if > 2 GB). ``consolidate=False``
    stops after torch's export and returns its raw file (``out_dir/.raw/model.onnx``, weights maybe scattered over
    many files): ``consolidate_onnx`` finishes it, after the torch model's memory is released."""
    spec = pipe_spec(pipe, name)
    module = wrap(pipe, name)
    # batch 2, as optimum: tracing with batch 1 lets some broadcasts be recorded with a fixed size
    inputs = dummy_inputs(pipe, name, batch=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_dir = out_dir / ".raw"  # the exporter may scatter >2 GB weights over many files
    raw_dir.mkdir(exist_ok=True)
    raw = raw_dir / "model.onnx"
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python bools in diffusers' shape checks
        torch.onnx.export(
            module,
            tuple(inputs[t.name].to(device) for t in spec.inputs),
            str(raw),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    del module
    return consolidate_onnx(raw, out_dir) if consolidate else raw


def consolidate_onnx(raw: Path, out_dir: Path) -> Path:
    """torch's raw export -> ``out_dir/model.onnx`` (weights inline, or in one external-data file); the raw files
    are removed. A raw export whose weights are external (over 2 GB: torch writes one file per tensor) is
    rewritten tensor by tensor into ``model.onnx_data``, never holding the weights in memory (``onnx.load`` of
    SDXL's 10 GB UNet needs over twice that)."""
    model = onnx.load(str(raw), load_external_data=False)
    tensors = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not tensors:
        save_onnx(model, out_dir / "model.onnx")
    else:
        with open(out_dir / EXTERNAL_DATA, "wb") as data:
            for t in tensors:
                info = {e.key: e.value for e in t.external_data}
                with open(raw.parent / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    length = int(info["length"]) if "length" in info else None
                    offset = data.tell()
                    copied = _copy(src, data, length)
                del t.external_data[:]
                for key, value in (("location", EXTERNAL_DATA), ("offset", str(offset)), ("length", str(copied))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
        onnx.save_model(model, str(out_dir / "model.onnx"))
    for f in raw.parent.iterdir():
        f.unlink()
    raw.parent.rmdir()
    return out_dir / "model.onnx"


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included."""

    def graph_tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for g in attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(model.graph)


def _copy(src, dst, length: int | None, chunk: int = 64 << 20) -> int:
    """Copy ``length`` bytes (None: to the end) from ``src`` to ``dst`` in chunks; the bytes copied."""
    done = 0
    while length is None or done < length:
        block = src.read(chunk if length is None else min(chunk, length - done))
        if not block:
            break
        dst.write(block)
        done += len(block)
    return done


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save inline when it fits protobuf's 2 GB limit, else with one external-data file."""
    try:
        large = model.ByteSize() > _PROTOBUF_LIMIT - (64 << 20)
    except Exception:  # protobuf refuses to even size a message over 2 GB (ValueError or EncodeError,
        large = True  # depending on the protobuf version)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA,
        size_threshold=1024,
    )
