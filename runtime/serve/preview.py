"""The cheap live preview: latents (UNet space) -> RGB by one 4x3 matrix and a bias per latent space, at latent
resolution. ComfyUI's fits (``comfy/latent_formats.py``, desktop_api.md §4.2) for SD 1.x/2.x and SDXL; models with
another latent space (not 4 channels) get a grey-scale view of their first channel."""

from __future__ import annotations

import numpy as np
from PIL import Image

# rows: latent channels c0..c3; columns: R, G, B
LATENT_RGB = {
    "sd": (np.array([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                     [-0.2120, -0.2616, -0.7177]], np.float32), np.zeros(3, np.float32)),
    "sdxl": (np.array([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
                       [-0.3165, -0.2492, -0.2188]], np.float32), np.array([0.1084, -0.0175, -0.0011], np.float32)),
}  # fmt: skip


def latent_preview(latents: np.ndarray, family: str) -> Image.Image:
    """The first image of ``latents`` [B, C, h, w] as an h x w RGB picture."""
    x = np.asarray(latents[0], dtype=np.float32)
    if x.shape[0] == 4:
        m, b = LATENT_RGB["sdxl" if family == "sdxl" else "sd"]
        rgb = np.einsum("chw,cr->hwr", x, m) + b
    else:
        rgb = np.repeat(x[0][..., None], 3, axis=-1)
    return Image.fromarray(np.round((np.clip(rgb, -1, 1) + 1) * 127.5).astype(np.uint8))
