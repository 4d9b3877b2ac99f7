"""AUTOMATIC1111's API shapes (desktop_api.md §1): a request body -> a checked edgediff call plan, the plan run as a
job (A1111's seed + i per image, ``n_iter`` batches, interrupt and skip returning what was made), and the
response (base64 PNGs with their infotext, the echoed parameters, the ``info`` JSON string)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .. import parameters
from ..errors import EdgediffError, ParametersError
from ..image import png_bytes
from ..pipeline import GenerationCancelled, Pipeline, __version__
from .jobs import JobState


class ApiError(EdgediffError):
    """A request the server refuses: ``status`` and a ``detail`` that names the field."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class Limits:
    max_side: int = 2048
    max_steps: int = 150
    max_images: int = 16  # batch_size x n_iter
    max_body_bytes: int = 50 << 20
    max_image_pixels: int = 4096 * 4096


@dataclass
class Plan:
    call: dict[str, Any]  # Pipeline call arguments, seeds excluded
    seed: int
    batch_size: int
    n_iter: int
    sampler: str  # A1111's name, for info
    echo: dict[str, Any] = field(default_factory=dict)  # the request's fields with their defaults
    mode: str = "txt2img"


def _field(body: dict, name: str, kind, default, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        value = default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(422, f"{name} must be {what or kind.__name__}, got {value!r}"[:300])
    if check is not None and not check(value):
        raise ApiError(422, f"{name} must be {what}, got {value!r}"[:300])
    return value


def _seed(body: dict) -> int:
    value = body.get("seed", -1)
    if isinstance(value, str):
        value = value.strip()
        if value in ("", "-1"):
            value = -1
        else:
            try:
                value = int(value)
            except ValueError:
                raise ApiError(422, f"seed must be an integer (-1: random), got {value!r}") from None
    if value is None:
        value = -1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"seed must be an integer (-1: random), got {value!r}")
    return random.randrange(4294967294) if value == -1 else value


def _refuse_unsupported(body: dict) -> None:
    """Fields that would change the picture in ways edgediff does not do: a 422 naming each, never ignored."""
    checks = [
        ("enable_hr", bool(body.get("enable_hr")), "hires fix is not supported; send enable_hr: false"),
        ("restore_faces", bool(body.get("restore_faces")), "face restoration is not supported"),
        ("tiling", bool(body.get("tiling")), "tiling is not supported"),
        ("subseed_strength", bool(body.get("subseed_strength")), "variation seeds are not supported; send 0"),
        ("refiner_checkpoint", bool(body.get("refiner_checkpoint")), "the SDXL refiner is not supported"),
        ("script_name", bool(body.get("script_name")), "scripts are not supported"),
        ("styles", bool(body.get("styles")), "prompt styles are not supported; send []"),
        ("alwayson_scripts", any((v or {}).get("args") for v in (body.get("alwayson_scripts") or {}).values()
                                  if isinstance(v, dict)), "extensions (ControlNet, ...) are not supported"),
    ]  # fmt: skip
    clip = (body.get("override_settings") or {}).get("CLIP_stop_at_last_layers", 1)
    checks.append(("override_settings.CLIP_stop_at_last_layers", clip not in (1, None), "clip skip is not supported"))
    for name, bad, why in checks:
        if bad:
            raise ApiError(422, f"{name}: {why}")


def decode_image(value, name: str, limits: Limits) -> Image.Image:
    """A base64 image (optionally a ``data:image/...;base64,`` URL). URLs and paths are never fetched or read."""
    if not isinstance(value, str) or not value:
        raise ApiError(422, f"{name} must be a base64-encoded image")
    if value.startswith(("http://", "https://", "file:")):
        raise ApiError(422, f"{name}: image URLs are not fetched; send the image as base64")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{name} is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.width * probe.height > limits.max_image_pixels:
                raise ApiError(422, f"{name} is {probe.width}x{probe.height}, over the {limits.max_image_pixels} "
                                    "pixels the server takes")  # fmt: skip
            image = probe.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ApiError(422, f"{name} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    return image


def _lora_tags(prompt: str, pipe: Pipeline) -> str:
    """A1111 clients ask for LoRAs with ``<lora:name:weight>`` in the prompt. The server applies the LoRAs it was
    started with (``serve --lora``); a tag naming one of them at its strength is taken off the prompt (it is
    applied), any other is a 422 that says which LoRAs the server has."""
    tags = parameters.LORA_TAG.findall(prompt)
    if not tags:
        return prompt
    loaded = {Path(file).stem: scale for file, scale in pipe.loras}
    for name, weight in tags:
        try:
            scale = float(weight) if weight else 1.0
        except ValueError:
            raise ApiError(422, f"prompt: <lora:{name}:{weight}>: the strength is not a number") from None
        if name not in loaded or abs(loaded[name] - scale) > 1e-6:
            have = ", ".join(f"{n} at {s:g}" for n, s in loaded.items()) or "none"
            raise ApiError(422, f"prompt: <lora:{name}:{weight or 1}>: this server applies only the LoRAs it was "
                                f"started with ({have}); start it with --lora FILE:{scale:g} for this "
                                "one")  # fmt: skip
    return parameters.LORA_TAG.sub("", prompt).strip()


def plan(body: Any, pipe: Pipeline, limits: Limits, mode: str = "txt2img") -> Plan:
    """Check a txt2img or img2img body and turn it into a Plan; unknown keys are ignored, as A1111 does."""
    if not isinstance(body, dict):
        raise ApiError(422, "the request body must be a JSON object")
    _refuse_unsupported(body)
    prompt = _field(body, "prompt", str, "", what="a string")
    negative = _field(body, "negative_prompt", str, "", what="a string")
    typed_prompt, prompt = prompt, _lora_tags(prompt, pipe)
    steps = _field(body, "steps", int, 50, lambda v: 1 <= v <= limits.max_steps, f"an integer 1..{limits.max_steps}")
    cfg = _field(body, "cfg_scale", float, 7.0, lambda v: 0 <= v <= 100, "a number 0..100")
    width = _field(body, "width", int, 512, lambda v: 1 <= v <= limits.max_side, f"an integer 1..{limits.max_side}")
    height = _field(body, "height", int, 512, lambda v: 1 <= v <= limits.max_side, f"an integer 1..{limits.max_side}")
    batch = _field(body, "batch_size", int, 1, lambda v: v >= 1, "an integer >= 1")
    n_iter = _field(body, "n_iter", int, 1, lambda v: v >= 1, "an integer >= 1")
    if batch * n_iter > limits.max_images:
        raise ApiError(422, f"batch_size x n_iter is {batch * n_iter}, over the {limits.max_images} images the "
                            "server makes per request")  # fmt: skip
    sampler = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    schedule = body.get("scheduler") or None
    if not isinstance(sampler, str) or not (schedule is None or isinstance(schedule, str)):
        raise ApiError(422, "sampler_name and scheduler must be strings")
    schedule = None if schedule is None or schedule.lower() == "automatic" else schedule[:1].upper() + schedule[1:]
    try:
        name, options = parameters.from_a1111(sampler, schedule)
    except ParametersError as e:
        raise ApiError(404, "Sampler not found") from e  # the pair AI-Render recognises (desktop_api.md §1.7)
    scheduler: Any = {**parameters.name_spec(name), **options} if options else name
    call: dict[str, Any] = dict(prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps,
                                guidance_scale=cfg, width=width, height=height, scheduler=scheduler)  # fmt: skip
    if name == "ddim" and body.get("eta") is not None:
        call["eta"] = _field(body, "eta", float, 0.0, lambda v: 0 <= v <= 1, "a number 0..1")
    echo = {"prompt": typed_prompt, "negative_prompt": negative, "steps": steps, "cfg_scale": cfg, "width": width,
            "height": height, "batch_size": batch, "n_iter": n_iter, "sampler_name": sampler,
            "scheduler": schedule or "Automatic"}  # fmt: skip
    if mode == "img2img":
        _image_fields(body, call, echo, limits)
    return Plan(call, _seed(body), batch, n_iter, parameters.a1111_sampler(*_class_and_config(scheduler)), echo, mode)


def _class_and_config(scheduler) -> tuple[str, dict]:
    spec = dict(scheduler) if isinstance(scheduler, dict) else parameters.name_spec(scheduler)
    return spec.pop("_class_name"), spec


def _image_fields(body: dict, call: dict, echo: dict, limits: Limits) -> None:
    images = body.get("init_images")
    if not images:
        raise ApiError(404, "Init image not found")
    if not isinstance(images, list):
        raise ApiError(422, "init_images must be a list of base64 images")
    image = decode_image(images[0], "init_images[0]", limits).convert("RGB")
    strength = _field(body, "denoising_strength", float, 0.75, lambda v: 0 < v <= 1, "a number in (0, 1]")
    if _field(body, "resize_mode", int, 0) != 0:
        raise ApiError(422, "resize_mode: only 0 (just resize) is supported")
    call.update(image=image, strength=strength)
    echo["denoising_strength"] = strength
    if body.get("mask"):
        mask = decode_image(body["mask"], "mask", limits).convert("L")
        if body.get("inpaint_full_res", True) not in (False, 0):  # A1111's default is True ("only masked")
            raise ApiError(422, "inpaint_full_res: 'only masked' inpainting (A1111's default) is not supported "
                                "yet; send inpaint_full_res: false")  # fmt: skip
        if mask.size != image.size:
            raise ApiError(422, f"mask is {mask.width}x{mask.height} but init_images[0] is {image.width}x"
                                f"{image.height}; send a mask of the image's size")  # fmt: skip
        blur = _field(body, "mask_blur", int, 4, lambda v: 0 <= v <= 64, "an integer 0..64")
        if _field(body, "inpainting_mask_invert", int, 0) == 1:
            mask = ImageOps.invert(mask)
        if blur:  # A1111 blurs the mask before it thresholds it for the latents
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        call["mask_image"] = mask
        echo.update(mask_blur=blur)


def run(pipe: Pipeline, p: Plan, state: JobState) -> dict:
    """The job: ``n_iter`` calls of ``batch_size`` images, image i drawn from seed + i; an interrupt or skip keeps
    what the current call had made (its clean estimate, decoded), as A1111 returns it with 200."""
    state.job_count, state.pipeline = p.n_iter, pipe
    images, records = [], []
    for it in range(p.n_iter):
        if state.interrupted.is_set():
            break
        state.job_no, state.sampling_step = it, 0
        seeds = [p.seed + it * p.batch_size + k for k in range(p.batch_size)]
        state.sampling_steps = pipe.planned_calls(**p.call)
        partial: dict = {}

        def callback(step, timestep, latents, denoised, partial=partial):
            state.sampling_step, state.denoised = step + 1, denoised
            if state.interrupted.is_set() or state.skipped.is_set():
                partial["latents"] = denoised()
                return False
            return True

        draw = {"seed": seeds[0]} if p.batch_size == 1 else {"seeds": seeds, "num_images_per_prompt": p.batch_size}
        try:
            result = pipe(**p.call, **draw, callback=callback)
            made, record = result.images, result.parameters
        except GenerationCancelled:
            made = pipe.decode(partial["latents"])
            record = _partial_record(pipe, p)
            state.skipped.clear()
        state.steps_done.append(state.sampling_step)
        for k, image in enumerate(made):
            images.append(image)
            records.append({**{key: v for key, v in record.items() if key != "seeds"}, "seed": seeds[k]})
    state.denoised = None
    return {"images": images, "records": records}


def _partial_record(pipe: Pipeline, p: Plan) -> dict:
    c = p.call
    scheduler = c["scheduler"] if isinstance(c["scheduler"], str) else None
    return {"prompt": c["prompt"], "negative_prompt": c.get("negative_prompt"),
            "num_inference_steps": c["num_inference_steps"], "guidance_scale": c["guidance_scale"],
            "width": c["width"], "height": c["height"], "scheduler": scheduler, "strength": c.get("strength"),
            "model": pipe.folder.path.name, "model_hash": parameters.model_hash(pipe.folder),
            "edgediff_version": __version__, "interrupted": True}  # fmt: skip


def response(p: Plan, made: dict, pipe: Pipeline, send_images: bool = True) -> dict:
    """A1111's ``{images, parameters, info}``; each PNG carries its own infotext (and edgediff's record)."""
    records = made["records"]
    infotexts = [parameters.format_parameters(r) for r in records]
    images = [base64.b64encode(png_bytes(im, r)).decode("ascii") for im, r in zip(made["images"], records)]
    seeds = [r["seed"] for r in records]
    title = model_title(pipe)
    info = {
        "prompt": p.call["prompt"], "all_prompts": [p.call["prompt"]] * len(records),
        "negative_prompt": p.echo["negative_prompt"],
        "all_negative_prompts": [p.echo["negative_prompt"]] * len(records),
        "seed": p.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(records),
        "subseed_strength": 0, "width": p.call["width"], "height": p.call["height"], "sampler_name": p.sampler,
        "cfg_scale": p.call["guidance_scale"], "steps": p.call["num_inference_steps"], "batch_size": p.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": pipe.folder.path.name,
        "sd_model_hash": (parameters.model_hash(pipe.folder) or "")[:10] or None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": p.call.get("strength"), "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": "", "clip_skip": 1,
        "is_using_inpainting_conditioning": pipe.folder.unet_kind == "inpainting" and "mask_image" in p.call,
        "version": f"edgediff {__version__}", "sd_model_checkpoint": title,
    }  # fmt: skip
    return {"images": images if send_images else [], "parameters": {**p.echo, "seed": p.seed},
            "info": json.dumps(info)}  # fmt: skip


def model_title(pipe: Pipeline) -> str:
    """A1111's checkpoint title, ``<name> [<10-hex hash>]``: what clients send back as ``sd_model_checkpoint``."""
    short = (parameters.model_hash(pipe.folder) or "")[:10]
    return f"{pipe.folder.path.name} [{short}]" if short else pipe.folder.path.name
