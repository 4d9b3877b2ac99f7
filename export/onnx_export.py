"""torch -> ONNX, one function per sub-model. Input/output names and dynamic axes come from
``edgediff.runtime.specs`` so export, engines and runtime agree by construction.

We call ``torch.onnx.export`` (TorchScript exporter, as optimum's exporter does) rather than
optimum's ``main_export``: it writes the same layout and tensor names, but its sub-model list,
I/O dtypes (int32 ids for TensorRT) and validation are what this module controls.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from edgediff.runtime.specs import SUBMODELS, SubmodelSpec

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


def dummy_inputs(pipe, name: str, batch: int = 1, latent_hw: tuple[int, int] | None = None, seed: int = 0) -> dict:
    """Random inputs of the right shapes and dtypes for sub-model ``name``."""
    g = torch.Generator().manual_seed(seed)
    unet_cfg, vae_cfg = pipe.unet.config, pipe.vae.config
    size = unet_cfg.sample_size if isinstance(unet_cfg.sample_size, int) else unet_cfg.sample_size[0]
    h, w = latent_hw or (size, size)
    down = 2 ** (len(vae_cfg.block_out_channels) - 1)
    seq = pipe.tokenizer.model_max_length
    if name == "text_encoder":
        vocab = pipe.text_encoder.config.vocab_size
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int32)}
    if name == "unet":
        return {
            "sample": torch.randn(batch, unet_cfg.in_channels, h, w, generator=g),
            "timestep": torch.tensor(float(torch.randint(0, 1000, (1,), generator=g)) + 0.5),
            "encoder_hidden_states": torch.randn(batch, seq, unet_cfg.cross_attention_dim, generator=g),
        }
    if name == "vae_decoder":
        return {"latent_sample": torch.randn(batch, vae_cfg.latent_channels, h, w, generator=g)}
    if name == "vae_encoder":
        return {"sample": torch.rand(batch, 3, h * down, w * down, generator=g) * 2 - 1}
    raise KeyError(name)


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
