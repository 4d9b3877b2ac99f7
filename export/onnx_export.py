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

# protobuf's hard limit; larger models keep their weights in one external-data file
_PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA = "model.onnx_data"


class TextEncoderWrapper(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int64), return_dict=False)
        return out[0], out[1]


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


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


def wrap(pipe, name: str) -> torch.nn.Module:
    module = {
        "text_encoder": lambda: TextEncoderWrapper(pipe.text_encoder),
        "unet": lambda: UNetWrapper(pipe.unet),
        "vae_decoder": lambda: VaeDecoderWrapper(pipe.vae),
        "vae_encoder": lambda: VaeEncoderWrapper(pipe.vae),
    }[name]()
    return module.eval()


def family_of(pipe) -> str:
    return specs.family_for(getattr(pipe.text_encoder.config, "hidden_act", None))


def text_length(pipe) -> int:
    """S: the runtime tokenizer's rule applied to the source's tokenizer."""
    positions = getattr(pipe.text_encoder.config, "max_position_embeddings", None)
    return max_length(pipe.tokenizer.model_max_length, positions if isinstance(positions, int) else None)


def vae_downscale(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def native_latent(pipe) -> tuple[int, int]:
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return size, size


def model_symbols(pipe) -> dict[str, int]:
    """The contract's fixed symbols for a diffusers pipeline: its family's defaults, overridden by its configs."""
    unet, te = pipe.unet.config, pipe.text_encoder.config
    return {**FAMILIES[family_of(pipe)].defaults, "C": int(pipe.vae.config.latent_channels),
            "C_in": int(unet.in_channels), "C_out": int(unet.out_channels), "S": text_length(pipe),
            "D": int(unet.cross_attention_dim), "V": int(te.vocab_size)}  # fmt: skip


def dummy_inputs(pipe, name: str, batch: int = 1, latent_hw: tuple[int, int] | None = None, seed: int = 0) -> dict:
    """Random inputs of the contract's shapes and dtypes for sub-model ``name`` (torch tensors)."""
    symbols = specs.resolve_symbols(model_symbols(pipe), batch, latent_hw or native_latent(pipe), vae_downscale(pipe))
    arrays = specs.dummy_inputs(SUBMODELS[name], symbols, np.random.default_rng(seed))
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def export_component(pipe, name: str, out_dir: Path, opset: int = 17, device: str = "cpu") -> Path:
    """Export sub-model ``name`` to ``out_dir/model.onnx`` (+ one external-data file if > 2 GB)."""
    spec: SubmodelSpec = SUBMODELS[name]
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
    save_onnx(onnx.load(str(raw)), out_dir / "model.onnx")
    for f in raw_dir.iterdir():
        f.unlink()
    raw_dir.rmdir()
    return out_dir / "model.onnx"


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
