"""Decoded VAE output -> uint8 -> PIL, and PNG files that carry their generation parameters."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """[B,3,H,W] in [-1, 1] -> [B,H,W,3] uint8, exactly as diffusers' VaeImageProcessor."""
    x = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(img) for img in images]


def format_parameters(p: dict) -> str:
    """The ``parameters`` text chunk other Stable Diffusion tools read (A1111 convention):
    prompt line, optional ``Negative prompt:`` line, then ``Key: value`` pairs."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    pairs = [
        ("Steps", p.get("num_inference_steps")),
        ("Sampler", p.get("scheduler")),
        ("CFG scale", p.get("guidance_scale")),
        ("Seed", p.get("seed")),
        ("Size", f"{p.get('width')}x{p.get('height')}"),
        ("Model", p.get("model")),
        ("Version", f"edgediff {p.get('edgediff_version', '')}".strip()),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Create ``path`` through a temporary file in the same folder, then rename: a reader never
    sees a half-written file. ``write`` is bytes or a callable that writes to a binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(write) if isinstance(write, bytes) else write(f)
        umask = os.umask(0)  # mkstemp creates 0600; give the file the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write ``image`` to ``path`` atomically (temporary file, then rename)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    return write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))
