"""Tiny LoRAs for the tests (../shared/reference/lora.md §7): peft adapters on a tiny model's UNet and text
encoders, every up (B) factor filled with random values (peft starts it at zero, which would make every LoRA a
no-op and every test pass), written in the formats users have. Needs the export extra and peft."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

UNET_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
UNET_CONV = ["conv1", "conv2", "proj_in", "proj_out", "time_emb_proj"]  # LoCon's ResNet convs, and more
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(source: Path, components=("unet",), conv: bool = True, rank: int = 4, alpha: float = 8.0,
              seed: int = 0, sigma: float = 0.05) -> dict:  # fmt: skip
    """``{component: {module path: (A [r, in(, kh, kw)], B [out, r(, 1, 1)])}}`` in fp32 numpy, plus ``"alpha"`` and
    ``"rank"``: a peft LoRA on the tiny model at ``source`` (a diffusers folder)."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(source, local_files_only=True)
    torch.manual_seed(seed)
    out: dict = {"alpha": alpha, "rank": rank}
    for component in components:
        model = getattr(pipe, component)
        targets = (UNET_LINEAR + (UNET_CONV if conv else [])) if component == "unet" else TEXT
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
        model.add_adapter(config)
        out.setdefault("config", {})[component] = {k: sorted(v) if isinstance(v, set) else v
                                                   for k, v in config.to_dict().items()}  # fmt: skip
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, sigma)
        state = get_peft_model_state_dict(model)
        modules: dict[str, dict] = {}
        for key, value in state.items():
            module, part = key.rsplit(".lora_", 1)
            modules.setdefault(module, {})[part.split(".")[0]] = value.detach().float().numpy()
        out[component] = {m: (parts["A"], parts["B"]) for m, parts in modules.items()}
    return out


_KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def save_kohya(lora: dict, path: Path, bf16: bool = False, sdxl_te1: bool = False, sgm: bool = False) -> Path:
    """kohya / A1111 naming: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``;
    ``sgm``: the UNet's layers named as in the original checkpoints (kohya's SDXL files: ``input_blocks_4_1_…``),
    which diffusers' loader converts back by its own rules (the oracle for our mapping)."""
    import torch
    from safetensors.torch import save_file

    from edgediff.runtime.lora_apply import sgm_names

    tensors = {}
    for component, modules in _modules(lora):
        prefix = "lora_te1_" if component == "text_encoder" and sdxl_te1 else _KOHYA[component]
        rename = {v: k for k, v in sgm_names(modules).items()} if sgm and component == "unet" else {}
        for module, (a, b) in modules.items():
            base = prefix + rename.get(module, module).replace(".", "_")
            dtype = torch.bfloat16 if bf16 else torch.float32
            tensors[f"{base}.lora_down.weight"] = torch.from_numpy(a).to(dtype)
            tensors[f"{base}.lora_up.weight"] = torch.from_numpy(b).to(dtype)
            tensors[f"{base}.alpha"] = torch.tensor(float(lora["alpha"]))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(lora["rank"])})
    return path


def save_diffusers(lora: dict, path: Path, metadata: bool = True) -> Path:
    """diffusers' ``save_lora_weights`` naming: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, alpha in the
    ``lora_adapter_metadata`` JSON (``metadata=False``: none, which means alpha = rank)."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    meta = {}
    for component, modules in _modules(lora):
        for module, (a, b) in modules.items():
            tensors[f"{component}.{module}.lora_A.weight"] = torch.from_numpy(a)
            tensors[f"{component}.{module}.lora_B.weight"] = torch.from_numpy(b)
        # as diffusers' save_lora_weights writes peft's LoraConfig, each key prefixed by the component
        meta |= {f"{component}.{k}": v for k, v in lora["config"][component].items()}
        meta[f"{component}.lora_alpha"] = lora["alpha"]
    save_file(tensors, str(path),
              metadata={"lora_adapter_metadata": json.dumps(meta, default=str)} if metadata else None)  # fmt: skip
    return path


def _modules(lora: dict):
    return [(c, m) for c, m in lora.items() if c in _KOHYA]


def without_alpha(lora: dict) -> dict:
    """The same factors read as diffusers reads a file without metadata: alpha = rank."""
    return {**lora, "alpha": float(lora["rank"])}


def fused_pipeline(source: Path, files_and_scales, pipeline_class=None):
    """The oracle: the diffusers pipeline at ``source`` with each LoRA loaded by ``load_lora_weights`` and fused
    by ``fuse_lora(lora_scale=s)`` in turn, so the weights are W + Σ s·(α/r)·ΔW."""
    from diffusers import DiffusionPipeline

    cls = pipeline_class or DiffusionPipeline
    kw = {"safety_checker": None, "requires_safety_checker": False} if "StableDiffusionPipeline" in str(cls) else {}
    pipe = cls.from_pretrained(source, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, scale) in enumerate(files_and_scales):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{i}"])
        pipe.unload_lora_weights()  # the fused weights stay
    return pipe


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])
