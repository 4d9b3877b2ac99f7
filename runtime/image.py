"""Decoded VAE output -> uint8 -> PIL, and PNG files that carry their generation parameters (formats:
``parameters.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .files import write_atomic
from .parameters import JSON_KEY, TEXT_KEY, format_parameters, to_json


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """[B,3,H,W] in [-1, 1] -> [B,H,W,3] uint8, exactly as diffusers' VaeImageProcessor."""
    x = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(img) for img in images]


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict | str | None = None) -> Path:
    """Write ``image`` to ``path`` atomically (temporary file, then rename). ``parameters``: a record
    (``GenerationResult.parameters``) goes in as A1111's ``parameters`` text and in full as JSON in an
    ``edgediff`` chunk; a string goes in as the ``parameters`` text only."""
    info = PngImagePlugin.PngInfo()
    if isinstance(parameters, dict):
        info.add_text(TEXT_KEY, format_parameters(parameters))
        info.add_text(JSON_KEY, to_json(parameters))
    elif parameters:
        info.add_text(TEXT_KEY, parameters)
    return write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))
