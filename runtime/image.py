"""Decoded VAE output -> uint8 -> PIL, and PNG files that carry their generation parameters (formats:
``parameters.py``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import OutputPathError
from .parameters import JSON_KEY, TEXT_KEY, format_parameters, to_json


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """[B,3,H,W] in [-1, 1] -> [B,H,W,3] uint8, exactly as diffusers' VaeImageProcessor."""
    x = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(img) for img in images]


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can be written at ``path`` (its folder may not exist
    yet: write_atomic creates it). Raises OutputPathError naming the path and the reason."""
    text = os.fspath(path)
    path = Path(text)
    if not text.strip() or path.name in ("", ".", ".."):
        raise OutputPathError(f"the output path {text!r} names no file; give a file name such as out.png")
    if path.is_dir():
        raise OutputPathError(
            f"the output path {path} is an existing folder; give a file name such as {path / 'out.png'}"
        )
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a folder")
    try:  # the only reliable test (root ignores permission bits; read-only mounts): try it
        fd, probe = tempfile.mkstemp(prefix=".edgediff-probe.", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {ancestor} is not writable ({e.strerror or e})") from None
    return path


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Create ``path`` through a temporary file in the same folder, then rename: a reader never
    sees a half-written file. ``write`` is bytes or a callable that writes to a binary file.
    OS failures (no permission, disk full, a folder in the way) raise OutputPathError."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(write) if isinstance(write, bytes) else write(f)
        umask = os.umask(0)  # mkstemp creates 0600; give the file the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OutputPathError):
            raise
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
