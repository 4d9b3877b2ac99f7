"""Input images -> normalised arrays (as diffusers' VaeImageProcessor), decoded VAE output -> uint8 -> PIL, and
PNG, JPEG and WebP files that carry their generation parameters (formats: ``parameters.py``)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import InvalidArgumentError
from .files import write_atomic
from .parameters import JSON_KEY, TEXT_KEY, format_parameters, to_json


def load_image(image, name: str = "image") -> Image.Image:
    """A PIL image, an HxWx3 uint8 array or a path, as an RGB PIL image. RGBA/LA/palette/greyscale images are
    converted to RGB (diffusers would take a 4-channel image for latents)."""
    img = _open(image, name, "an HxWx3 uint8 array", lambda a: a.ndim == 3 and a.shape[2] == 3)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_mask(mask, name: str = "mask_image") -> Image.Image:
    """An inpainting mask (white = repaint): a PIL image, a path, or an HxW / HxWx1 / HxWx3 uint8 or bool array, as a
    PIL image in its own mode (diffusers resizes a mask in its own mode, then takes its luma)."""
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    if isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    return _open(mask, name, "an HxW, HxWx1 or HxWx3 uint8 or bool array",
                 lambda a: a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3))  # fmt: skip


def _open(image, name: str, arrays: str, shape_ok) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                f.load()
                img = ImageOps.exif_transpose(f)  # as diffusers.utils.load_image
        except FileNotFoundError:
            raise InvalidArgumentError(f"{name}: no such file {str(image)!r}; pass an existing image file") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InvalidArgumentError(f"{name}: cannot read {str(image)!r} as an image ({e}); pass a PNG/JPEG/WebP "
                                       "file") from None  # fmt: skip
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not shape_ok(image) or 0 in image.shape:
            raise InvalidArgumentError(
                f"{name}: an array must be {arrays}, got shape {list(image.shape)} dtype {image.dtype}"
            )
        img = Image.fromarray(image)
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise InvalidArgumentError(f"{name} must be a PIL image, {arrays} or a path, got {type(image).__name__}")
    return img


def preprocess(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB PIL image -> [1,3,H,W] float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess: Pillow's Lanczos
    resize to (width, height) (a copy when the size already matches), /255, then 2x − 1."""
    img = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.array(img).astype(np.float32) / 255.0
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None].astype(np.float32)


def preprocess_mask(mask: Image.Image, height: int, width: int) -> tuple[np.ndarray, Image.Image]:
    """A mask -> ([1,1,H,W] float32 of 0 and 1, the soft greyscale mask), as diffusers' mask processor
    (``VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)``): Pillow's Lanczos
    resize in the mask's own mode, then its luma (``convert("L")``: a pure red mask is 76, "keep"), /255, and
    values >= 0.5 become 1 (repaint). The soft mask is what ``keep_unmasked`` composites with."""
    soft = mask.resize((width, height), resample=Image.Resampling.LANCZOS).convert("L")
    x = np.array(soft).astype(np.float32) / 255.0
    return (x >= 0.5).astype(np.float32)[None, None], soft


def paste_unmasked(generated: list[Image.Image], original: Image.Image, soft_mask: Image.Image) -> list[Image.Image]:
    """``keep_unmasked``: the original's pixels where the mask is black, the generated ones where it is white, and a
    blend by the mask's grey level between (as diffusers' ``apply_overlay``, with the unbinarized mask). The
    original is resized to the mask's size once (a copy when it already has it)."""
    resized = original.resize(soft_mask.size, Image.Resampling.LANCZOS)
    return [Image.composite(image, resized, soft_mask) for image in generated]


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """[B,3,H,W] in [-1, 1] -> [B,H,W,3] uint8, exactly as diffusers' VaeImageProcessor."""
    x = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(img) for img in images]


def _png_info(parameters: dict | str | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if isinstance(parameters, dict):
        info.add_text(TEXT_KEY, format_parameters(parameters))
        info.add_text(JSON_KEY, to_json(parameters))
    elif parameters:
        info.add_text(TEXT_KEY, parameters)
    return info


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict | str | None = None) -> Path:
    """Write ``image`` to ``path`` atomically (temporary file, then rename). ``parameters``: a record
    (``GenerationResult.parameters``) goes in as A1111's ``parameters`` text and in full as JSON in an
    ``edgediff`` chunk; a string goes in as the ``parameters`` text only."""
    info = _png_info(parameters)
    return write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))


# output formats by file extension -> Pillow's format name
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag
_UNICODE = b"UNICODE\0"  # UserComment's character-code prefix; UTF-16 big-endian follows (piexif's "unicode")


def image_format(path: str | os.PathLike) -> str:
    """Pillow's format for an output path by its extension; any other extension is refused, naming the ones
    there are."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise InvalidArgumentError(f"{os.fspath(path)}: cannot write {suffix or 'a file without an extension'}; "
                                   f"use one of {', '.join(IMAGE_FORMATS)}")  # fmt: skip
    return IMAGE_FORMATS[suffix]


def user_comment(text: str) -> bytes:
    """EXIF UserComment bytes as AUTOMATIC1111 writes its infotext into JPEG and WebP files (piexif's
    ``UserComment.dump(text, encoding="unicode")``)."""
    return _UNICODE + text.encode("utf-16-be")


def read_user_comment(data: bytes) -> str:
    """The text of an EXIF UserComment (unicode big- or little-endian, ASCII or undefined code)."""
    code, body = bytes(data[:8]), bytes(data[8:])
    if code == _UNICODE:  # a byte-order mark when there is one, else big-endian (as A1111 writes it)
        return body.decode("utf-16" if body[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-16-be", errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\0")


def save_image(image: Image.Image, path: str | os.PathLike, parameters: dict | str | None = None,
               quality: int = 95) -> Path:  # fmt: skip
    """Write ``image`` to ``path`` atomically in the format its extension names: PNG with the parameters as
    ``save_png`` writes them, JPEG or WebP (at ``quality``, 1..100) with A1111's infotext in the EXIF UserComment,
    where other Stable Diffusion tools read it."""
    fmt = image_format(path)
    if fmt == "PNG":
        return save_png(image, path, parameters)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InvalidArgumentError(f"quality must be an integer 1..100, got {quality!r}")
    exif = Image.Exif()
    text = format_parameters(parameters) if isinstance(parameters, dict) else parameters
    if text:
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(text)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return write_atomic(path, lambda f: rgb.save(f, format=fmt, quality=quality, exif=exif))


def png_bytes(image: Image.Image, parameters: dict | str | None = None) -> bytes:
    """The PNG file ``save_png`` writes, as bytes (what a server sends)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(parameters))
    return buffer.getvalue()
