"""Random-weight Stable Diffusion pipelines built locally (no download): tiny ones for tests, and
the place where full-size published architectures will be added for benchmarks.

The tokenizer is a real CLIP-style byte-level BPE (vocab.json + merges.txt with ``</w>``
word ends and CLIP's special tokens), with merges learned on the spot from a small word list, so
``transformers.CLIPTokenizer`` and edgediff's tokenizer can be compared on it.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

from edgediff.runtime.specs import CLIP_POSITIONS, FAMILIES

_SD1_D, _SD2_D = FAMILIES["sd1"].defaults["D"], FAMILIES["sd2"].defaults["D"]  # CLIP ViT-L's / OpenCLIP ViT-H's width

_WORDS = (
    "a photo of the red green blue yellow purple orange white black circle square triangle star on in at with "
    "background small large big top bottom left right centre center painting portrait cat dog house tree sky "
    "sunset mountain river city night day beautiful detailed highly realistic art style light dark"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(
    out: Path, num_merges: int = 300, pad_token: str = "<|endoftext|>", words: list[str] | None = None
) -> int:
    """Write vocab.json, merges.txt and the configs of a small CLIP tokenizer; return the vocab size.

    Merges are learned on ``words`` (default: a small English word list), so frequent words
    become single tokens."""
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    words = Counter({tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in (words or _WORDS)})
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):  # classic BPE training, deterministic tie-break
        pairs: Counter = Counter()
        for word, freq in words.items():
            for a, b in itertools.pairwise(word):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged = Counter()
        for word, freq in words.items():
            w, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    w.append(word[i] + word[i + 1])
                    i += 2
                else:
                    w.append(word[i])
                    i += 1
            merged[tuple(w)] += freq
        words = merged
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = dict(special, model_max_length=CLIP_POSITIONS, tokenizer_class="CLIPTokenizer", do_lower_case=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return len(vocab)


# channel widths: (UNet/VAE blocks, norm groups, text/cross-attention width, text intermediate)
SIZES = {"tiny": ((32, 64), 32, 32, 37), "micro": ((16, 32), 8, 16, 20)}


def build_tiny_pipeline(
    out: str | Path, variant: str = "sd1", seed: int = 0, size: str = "tiny", inpaint: bool = False,
    lcm: bool = False, turbo: bool = False,
) -> Path:  # fmt: skip
    """Save a tiny random-weight Stable Diffusion pipeline to ``out`` (a normal diffusers folder).

    ``variant="sd1"``: epsilon prediction, quick_gelu CLIP, pad ``<|endoftext|>``.
    ``variant="sd2"``: v-prediction, gelu CLIP, pad ``!``, linear-projection attention.
    ``variant="sdxl"``: a StableDiffusionXLPipeline: two text encoders of different widths (the second with a
    projection, gelu, pad ``!`` = id 0), a UNet with SDXL's added conditioning, an SDXL-style VAE (scaling 0.13025),
    Euler leading, ``force_zeros_for_empty_prompt``.
    ``inpaint``: the inpainting pipeline class, whose UNet takes 9 channels (latents, mask, masked-image latents).
    ``lcm``: an LCM-distilled UNet (``time_cond_proj_dim``) with LCMScheduler (SD: LatentConsistencyModelPipeline).
    ``turbo``: SD-Turbo/SDXL-Turbo's scheduler (Euler ancestral, trailing spacing).
    Latent 16x16, VAE downscale 2 -> native 32x32 images. ``size="micro"`` halves the widths
    (about 4x fewer weights) for models committed as test data.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if variant not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"variant must be 'sd1', 'sd2' or 'sdxl', got {variant!r}")
    blocks, groups, width, intermediate = SIZES[size]
    sd2, xl = variant == "sd2", variant == "sdxl"
    out = Path(out)
    vocab_size = write_clip_tokenizer(out / "tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    def text_config(hidden: int, layers: int, act: str, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=intermediate,
            layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=layers, vocab_size=vocab_size,
            hidden_act=act, projection_dim=projection,
        )  # fmt: skip

    torch.manual_seed(seed)
    # SDXL: the second encoder is wider than the first (so a swapped concat fails) and pools to its own width
    width_2, pooled, time_dim = width + width // 2, width + width // 4, 8
    unet = UNet2DConditionModel(
        block_out_channels=blocks,
        layers_per_block=1,
        sample_size=16,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width + width_2 if xl else width,
        attention_head_dim=(2, 4) if sd2 or xl else 8,
        use_linear_projection=sd2 or xl,
        norm_num_groups=groups,
        time_cond_proj_dim=2 * width if lcm else None,
        **(dict(transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + pooled)
           if xl else {}),
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=blocks,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=32,
        **(dict(scaling_factor=0.13025, force_upcast=True) if xl else {}),
    )
    text_encoder = CLIPTextModel(text_config(width, 2 if not xl else 3, "gelu" if sd2 else "quick_gelu", width))
    scheduler_config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            prediction_type="v_prediction" if sd2 else "epsilon")  # fmt: skip
    if turbo:
        scheduler = diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **scheduler_config)
    elif lcm:
        scheduler = diffusers.LCMScheduler(set_alpha_to_one=True, **scheduler_config)
    elif xl:
        scheduler = diffusers.EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading", **scheduler_config)
    else:
        scheduler = diffusers.PNDMScheduler(set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                                            **scheduler_config)  # fmt: skip
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if xl:
        write_clip_tokenizer(out / "tokenizer_2", pad_token="!")  # OpenCLIP's: pads with id 0
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection(text_config(width_2, 4, "gelu", pooled))
        name = "StableDiffusionXLInpaintPipeline" if inpaint else "StableDiffusionXLPipeline"
        pipe = getattr(diffusers, name)(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        name = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
        if lcm and not inpaint:
            name = "LatentConsistencyModelPipeline"
        pipe = getattr(diffusers, name)(**parts, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(out)
    return out


def build_tiny_autoencoder(out: str | Path, size: str = "tiny", seed: int = 0, latent_channels: int = 4) -> Path:
    """Save a random-weight diffusers AutoencoderTiny (TAESD's architecture) to ``out``. ``size="tiny"``: two
    16-wide blocks (factor 2, the tiny pipelines' VAE factor); ``size="full"``: TAESD / TAESDXL as published
    (diffusers' defaults: factor 8)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    options: dict = {}
    if size == "tiny":
        options = dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                       num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))  # fmt: skip
    elif size != "full":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    AutoencoderTiny(latent_channels=latent_channels, **options).save_pretrained(out)
    return Path(out)


# The published architectures (their config.json values are public facts): Stable Diffusion 1.5
# (CompVis/runwayml) and 2.1-base (Stability AI). Random weights cost what the real model costs.
_SD_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
_SD_UNET = dict(
    act_fn="silu", block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32,
    out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)  # fmt: skip
ARCHITECTURES = {
    "sd15": dict(
        unet=dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=_SD1_D),
        text=dict(hidden_size=_SD1_D, intermediate_size=4 * _SD1_D, num_attention_heads=12, num_hidden_layers=12,
                  hidden_act="quick_gelu", projection_dim=_SD1_D),
        prediction_type="epsilon", pad_token="<|endoftext|>",
    ),
    "sd21-base": dict(
        unet=dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=_SD2_D,
                  use_linear_projection=True),
        text=dict(hidden_size=_SD2_D, intermediate_size=4 * _SD2_D, num_attention_heads=16, num_hidden_layers=23,
                  hidden_act="gelu", projection_dim=512),
        prediction_type="epsilon", pad_token="!",
    ),
    # stabilityai/stable-diffusion-xl-base-1.0: CLIP ViT-L (penultimate layer) + OpenCLIP ViT-bigG with projection
    "sdxl-base": dict(
        unet=dict(_SD_UNET, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, sample_size=128),
        text=dict(hidden_size=_SD1_D, intermediate_size=4 * _SD1_D, num_attention_heads=12, num_hidden_layers=12,
                  hidden_act="quick_gelu", projection_dim=_SD1_D),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                    hidden_act="gelu", projection_dim=1280),
        vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        prediction_type="epsilon", pad_token="<|endoftext|>",
    ),
}  # fmt: skip


def build_full_size_pipeline(out: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Save a random-weight pipeline with the exact published architecture ``arch`` (sd15, sd21-base, sdxl-base).

    The text encoders keep CLIP's real vocabulary size (49408) so their embeddings cost what the real
    ones do; the tokenizers are the small locally trained one (its ids are a subset)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = ARCHITECTURES[arch]
    out = Path(out)
    write_clip_tokenizer(out / "tokenizer", pad_token=spec["pad_token"])
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    torch.manual_seed(seed)

    def text_config(**text) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=CLIP_POSITIONS, layer_norm_eps=1e-05,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **text,
        )  # fmt: skip

    parts = dict(unet=UNet2DConditionModel(**spec["unet"]), vae=AutoencoderKL(**spec.get("vae", _SD_VAE)),
                 text_encoder=CLIPTextModel(text_config(**spec["text"])), tokenizer=tokenizer)  # fmt: skip
    if "text_2" in spec:  # SDXL
        write_clip_tokenizer(out / "tokenizer_2", pad_token="!")
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection(text_config(**spec["text_2"]))
        scheduler = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading", prediction_type=spec["prediction_type"],
        )  # fmt: skip
        pipe = diffusers.StableDiffusionXLPipeline(**parts, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                                   add_watermarker=False)  # fmt: skip
    else:
        scheduler = diffusers.PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
            skip_prk_steps=True, steps_offset=1, prediction_type=spec["prediction_type"],
        )  # fmt: skip
        pipe = diffusers.StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m edgediff.export.random_model OUT [--variant sd1|sd2] [--seed N]``"""
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random-weight Stable Diffusion diffusers folder.")
    parser.add_argument("out")
    parser.add_argument("--variant", choices=["sd1", "sd2", "sdxl"], default="sd1")
    parser.add_argument("--inpaint", action="store_true")
    parser.add_argument("--lcm", action="store_true")
    parser.add_argument("--turbo", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), help="a full-size published architecture instead")
    args = parser.parse_args(argv)
    if args.arch:
        print(build_full_size_pipeline(args.out, args.arch, args.seed))
    else:
        print(build_tiny_pipeline(args.out, args.variant, args.seed, args.size, args.inpaint, args.lcm, args.turbo))


if __name__ == "__main__":
    main()
