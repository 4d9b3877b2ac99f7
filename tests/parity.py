"""Helpers shared by the image-to-image and inpainting parity tests: a test picture, the diffusers oracle's
uint8 images for an edgediff scheduler name, and the per-pixel comparison (within 1/255)."""

from pathlib import Path

import numpy as np
from PIL import Image

from golden_cases import SCHEDULER_NAMES

MICRO = Path(__file__).parent / "fixtures" / "micro-sd1"  # the committed micro model the torch-free cases run
PROMPT = "a red circle on a blue background"


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth picture with an edge (Lanczos resizing and the VAE see structure, not white noise)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.RandomState(seed)
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 16) * 16], axis=-1)
    rgb = np.clip(rgb + rng.randint(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def mask_for(w: int, h: int, box=(0.2, 0.25, 0.65, 0.8), mode: str = "L") -> Image.Image:
    """An inpainting mask: white (repaint) inside ``box`` (fractions x0, y0, x1, y1), black elsewhere."""
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = 255
    return Image.fromarray(m).convert(mode)


def diffusers_images(ref, name: str, seed, **kwargs) -> np.ndarray:
    """``ref`` (a diffusers pipeline) run with the scheduler edgediff calls ``name``, a CPU generator seeded with
    ``seed`` (a list: one generator per image), as [B,H,W,3] uint8."""
    import diffusers
    import torch

    cls_name, overrides = SCHEDULER_NAMES[name]
    original = ref.scheduler
    ref.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    if isinstance(seed, list):
        generator = [torch.Generator("cpu").manual_seed(s) for s in seed]
    else:
        generator = torch.Generator("cpu").manual_seed(seed)
    try:
        images = ref(generator=generator, output_type="np", **kwargs).images
    finally:
        ref.scheduler = original
    assert np.isfinite(images).all()
    return (images * 255).round().astype(np.uint8)


def pixel_difference(got_result, want: np.ndarray, label: str) -> np.ndarray:
    got = np.stack([np.asarray(im) for im in got_result.images])
    assert got.shape == want.shape, f"{label}: shape {got.shape} != {want.shape}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    print(f"{label}: max {diff.max()} mean {diff.mean():.5f} (/255)")
    return diff


def assert_close(got_result, want: np.ndarray, label: str) -> None:
    diff = pixel_difference(got_result, want, label)
    assert diff.max() <= 1, f"{label}: max pixel difference {diff.max()}/255"
