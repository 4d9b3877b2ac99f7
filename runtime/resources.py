"""How much memory a request needs, estimated before it runs, against what the machine has.

A 2048 x 2048 request on SD 1.5 does not fail at once: it fails inside ONNX Runtime minutes later
with an arena traceback, or the kernel's OOM killer ends the process (and the desktop app that
embeds it). The check here refuses such a request up front, with the size that would fit.

The estimate is the working memory of the largest stage (weights are not counted: a loaded
engine's weights are already resident, so they are out of ``MemAvailable`` already; in low-memory
mode they are added). It comes from the components' diffusers configs and counts what dominates:

- attention scores: an exported (unfused) attention materialises softmax(QK^T) as
  [batch, heads, tokens, tokens] float32, several copies alive at once. The UNet's
  self-attention at its first attention level and the VAE decoder's mid-block attention (one head
  over every latent pixel) grow with the fourth power of the side. The fused UNet of
  ``edgediff optimize`` (flash attention) does not materialise them.
- convolution activations: a few tensors of [batch, channels, height, width] float32 alive at the
  widest level, plus the UNet's skip connections.

It counts only the dominant terms, so it is below the real peak by a small factor (embedded
model at 256 / 512 px: estimate 0.30 / 4.6 GiB, measured peak growth 0.42 / 6.4 GiB); its job is to
refuse what clearly cannot fit (the terms grow with the fourth power of the side, so a size too
large is too large by far). Allocation failures that slip through become a ``ResourceError`` in
the engine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
_F32 = 4
_LIVE_ACTIVATIONS = 4  # tensors of the widest level alive at once (input, norm, activation, output)
# Copies of an attention score matrix alive at once in an exported graph (scaled QK^T, Softmax
# output, and the Softmax input while it runs), and the slack of ONNX Runtime's arena, which grows
# by powers of two. Calibrated on the embedded model (see DECISIONS.md, issue 11).
_SCORE_COPIES = 3
_ARENA_SLACK = 1.5


def available_memory_bytes() -> int | None:
    """Memory the OS can give this process now (Linux ``MemAvailable``; elsewhere free physical
    pages); None where unknown, which turns the check off."""
    try:
        m = re.search(r"^MemAvailable:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _config(folder: Path, rel: str) -> dict:
    try:
        data = json.loads((folder / rel).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _ints(value, default: list[int]) -> list[int]:
    if isinstance(value, list) and value and all(isinstance(v, int) and v > 0 for v in value):
        return value
    return default


@dataclass(frozen=True)
class Estimate:
    stage: str  # "unet", "vae_decoder" or "vae_encoder": the stage that needs the most
    what: str  # what dominates that stage, in words
    bytes: int


def unet_bytes(folder: Path, batch: int, latent_h: int, latent_w: int, fused_attention: bool) -> tuple[int, str]:
    """Working memory of one UNet call over ``batch`` latents (guidance already counted in batch)."""
    cfg = _config(folder, "unet/config.json")
    channels = _ints(cfg.get("block_out_channels"), [320, 640, 1280, 1280])
    blocks = cfg.get("down_block_types") or ["CrossAttnDownBlock2D"] * (len(channels) - 1) + ["DownBlock2D"]
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8
    heads = heads if isinstance(heads, list) else [heads] * len(channels)
    conv, scores, where = 0, 0, "activations"
    for i, c in enumerate(channels):
        tokens = max(latent_h >> i, 1) * max(latent_w >> i, 1)
        level = batch * c * tokens * _F32
        conv = max(conv, _LIVE_ACTIVATIONS * level)
        conv += 3 * level  # skip connections kept for the up path (layers_per_block + 1 per level)
        attends = (i < len(blocks) and "CrossAttn" in str(blocks[i])) or i == len(channels) - 1  # or the mid-block
        if attends and not fused_attention:
            h = heads[min(i, len(heads) - 1)] if isinstance(heads[0], int) else 8
            s = _SCORE_COPIES * batch * h * tokens * tokens * _F32
            if s > scores:
                scores, where = s, f"self-attention scores at {max(latent_h >> i, 1)}x{max(latent_w >> i, 1)} latents"
    return conv + scores, where if scores > conv else "activations"


def vae_bytes(
    folder: Path, batch: int, latent_h: int, latent_w: int, component: str = "vae_decoder"
) -> tuple[int, str]:
    """Working memory of the VAE decoder over ``batch`` latents, or of its encoder (``component="vae_encoder"``) over
    ``batch`` images: both run block_out_channels[i] at latent x 2^(n-1-i) and attend over the latent in the
    mid-block."""
    cfg = _config(folder, f"{component}/config.json")
    channels = _ints(cfg.get("block_out_channels"), [128, 256, 512, 512])
    n = len(channels)
    conv = 0
    for i, c in enumerate(channels):  # level i runs at latent x 2^(n-1-i)
        scale = 2 ** (n - 1 - i)
        conv = max(conv, _LIVE_ACTIVATIONS * batch * c * latent_h * scale * latent_w * scale * _F32)
    attention = 0
    if cfg.get("mid_block_add_attention", True):
        tokens = latent_h * latent_w
        attention = _SCORE_COPIES * batch * tokens * tokens * _F32
    total = conv + attention
    return total, (
        f"its mid-block attention over {latent_h}x{latent_w} latents" if attention > conv else "activations"
    )


def estimate(folder: Path, *, images: int, guidance: bool, height: int, width: int, vae_downscale: int,
             fused_attention: bool, weights: int = 0, encodes: bool = False) -> Estimate:  # fmt: skip
    """The largest stage's working memory for ``images`` images of ``height`` x ``width``; ``encodes``: the call
    runs the VAE encoder too (image-to-image, inpainting), on one image (the runtime encodes the input once)."""
    h, w = height // vae_downscale, width // vae_downscale
    stages = [("unet", *unet_bytes(folder, images * (2 if guidance else 1), h, w, fused_attention)),
              ("vae_decoder", *vae_bytes(folder, images, h, w))]  # fmt: skip
    if encodes:
        stages.append(("vae_encoder", *vae_bytes(folder, 1, h, w, "vae_encoder")))
    stage, need, what = max(stages, key=lambda s: s[1])
    return Estimate(stage, what, int(need * _ARENA_SLACK) + weights)


def largest_square(folder: Path, limit: int, multiple: int, **kw) -> int | None:
    """The largest square side (a multiple of ``multiple``) whose estimate fits ``limit``."""
    lo, hi = 0, 1
    while estimate(folder, height=hi * multiple, width=hi * multiple, **kw).bytes <= limit and hi < 1 << 12:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate(folder, height=mid * multiple, width=mid * multiple, **kw).bytes <= limit:
            lo = mid
        else:
            hi = mid
    return lo * multiple or None
