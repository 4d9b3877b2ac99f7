"""Text-to-image with numpy sampling and compiled engines: the runtime's main object.

    from edgediff.runtime import Pipeline
    pipe = Pipeline.load("sd15-onnx")
    result = pipe("a red circle on a blue background", num_inference_steps=20, seed=42)
    result.images[0].save("out.png")
    edited = pipe("a red circle on a green background", image="out.png", strength=0.7, seed=1)

Stages, shared by every mode: prompt encoding (``_encode_prompt``: the UNet's conditioning inputs), start latents
(noise, or the image's VAE latents noised by the scheduler's ``add_noise``), the denoising loop (``_denoise``:
guidance, scheduler step, checks, callback; no modes, one ``StepHook``), decoding (``_decode``).
Arguments mean what they mean in diffusers' StableDiffusionPipeline. A Pipeline holds no
per-call state: schedules, scheduler history and random streams are made per call, so one
object serves concurrent calls from several threads.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from . import lora_apply, parameters, resources, schedulers
from .engine import Engine, create_engine, engine_class
from .errors import EdgediffError, InvalidArgumentError, ModelFolderError, NonFiniteError, ResourceError
from .image import load_image, load_mask, paste_unmasked, preprocess, preprocess_mask, to_pil, to_uint8
from .model_folder import ModelFolder
from .rng import Generator, GeneratorList, check_seed, make_generator
from .tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

try:
    __version__ = metadata.version("edgediff")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

# callback(step_index, timestep, latents) -> False to cancel; it may also take ``preview`` / ``denoised`` keywords
Callback = Callable[..., Any]
# The engine options an image's record keeps: the ones that change its pixels (the model file, the device, the
# arithmetic), so --from-png regenerates it on the same engine
RECORDED_OPTIONS = ("cpu_variant", "providers", "device", "precision")


EMBEDDED_MODEL = Path(__file__).resolve().parent / "models" / "shapes"


def embedded_model_path() -> Path:
    """The model folder that ships inside the package."""
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        raise ModelFolderError(
            f"the embedded model is missing from this installation ({EMBEDDED_MODEL}); reinstall edgediff "
            "or pass a model folder"
        )
    return EMBEDDED_MODEL


def scheduler_label(sched: schedulers.Scheduler) -> str:
    """The short name users type that selects ``sched``'s class and the options a name can say, e.g.
    ``dpmpp_2m_sde_karras``; the parameters record the other options (``scheduler_options``) and the full
    config (``scheduler_config``)."""
    return parameters.scheduler_name(sched)


class GenerationCancelled(EdgediffError):
    """The progress callback returned False."""


@dataclass
class GenerationResult:
    """``timings`` (seconds): tokenize, text_encoder, vae_encoder (img2img), unet (all UNet calls), denoise (the whole
    loop), host (denoise minus the UNet calls and the callback: scheduler, guidance, copies),
    callback (the progress callback's own time, when one is given), vae_decoder, postprocess (to
    uint8 and PIL), total, and ``load_<component>`` in low-memory mode. ``unet_calls``: the
    seconds of each UNet call in order."""

    images: list[Image.Image]
    parameters: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    unet_calls: list[float] = field(default_factory=list)


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Pipeline:
    def __init__(self, folder: ModelFolder, engines: dict[str, Engine], tokenizer: ClipTokenizer, engine_name: str):
        self.folder = folder
        self.engines = engines
        self._engine_options: dict[str, Any] = {}
        self.low_memory = False
        self.memory_limit: int | str | None = "auto"
        self.load_times: dict[str, float] = {}  # seconds to create each engine (empty in low-memory mode)
        self.tokenizer = tokenizer
        self.engine_name = engine_name
        self.default_scheduler = schedulers.resolve(None, folder.scheduler_config)
        self._load_lock = threading.Lock()
        self._loras: list[lora_apply.Lora] = []
        self._weights: dict[str, Mapping[str, np.ndarray]] = {}  # component -> its LoRA-merged initializers (lazy)

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike | None = None,
        engine: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        low_memory: bool = False,
        memory_limit: int | str | None = "auto",
        loras=None,
        lora_strict: bool = False,
        **engine_options,
    ) -> Pipeline:
        """Open a model folder and create one engine per component (text encoder, UNet, VAE decoder; the VAE
        encoder loads on the first image-to-image call).

        ``folder=None`` loads the embedded model that ships inside the package (a tiny model of
        the shapes world, see ``edgediff.runtime.shapes``): it needs no download.

        ``engine``: ``"onnxruntime"`` (default), ``"openvino"`` (``device``, ``precision``: see
        ``edgediff.engines.openvino``) or ``"tensorrt"`` (plans from ``edgediff build``).
        ``providers``: ONNX Runtime execution providers
        in priority order, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` (default CPU).
        ``low_memory``: keep no engine loaded between calls; each call loads the text encoder,
        the UNet and the VAE decoder one at a time and releases each before the next, so peak
        memory is that of the largest component (slower: every call pays the load time).
        ``memory_limit``: on the CPU, each call first estimates the memory it needs
        (``edgediff.runtime.resources``) and refuses with ``ResourceError`` what does not fit:
        ``"auto"`` (default) compares with the memory available at that moment, a number of bytes
        with that number, ``None`` turns the check off.
        ``loras``: LoRA files applied to the UNet and text encoders, ``[("style.safetensors", 0.8), ...]`` (a
        bare file means strength 1): kohya / A1111, diffusers / PEFT and LoCon ``.safetensors`` files, merged
        into the weights as the engines are created (``edgediff.runtime.lora_apply``; nothing is written).
        ``set_loras`` changes them later. Modules of a LoRA that match no layer are counted in a warning;
        ``lora_strict=True`` refuses such a file instead.
        Other keyword arguments go to the engine (ONNX Runtime: ``threads``, ``optimization``, …; OpenVINO:
        ``device``, ``precision``, ``threads``, ``shapes``, ``cache``).
        """
        if not (
            memory_limit in ("auto", None)
            or (isinstance(memory_limit, (int, float)) and not isinstance(memory_limit, bool) and memory_limit > 0)
        ):
            raise InvalidArgumentError(f"memory_limit must be 'auto', None or a positive number of bytes, got "
                                       f"{memory_limit!r}")  # fmt: skip
        mf = ModelFolder.open(embedded_model_path() if folder is None else folder)
        tokenizer = mf.tokenizer or ClipTokenizer(mf.path / "tokenizer", mf.text_max_positions)
        if "tokenizer_2" in mf.family.tokenizers and mf.tokenizer_2 is None:
            mf.tokenizer_2 = ClipTokenizer(mf.path / "tokenizer_2")
        options = dict(engine_options)
        if providers is not None:
            options["providers"] = providers
        # the options that decide the pixels are recorded even when left to the engine's defaults
        options = {**getattr(engine_class(engine), "RECORDED_DEFAULTS", {}), **options}
        pipe = cls(mf, {}, tokenizer, engine)
        pipe._engine_options = options
        pipe.low_memory = bool(low_memory)
        pipe.memory_limit = memory_limit
        pipe.load_times = {}
        pipe._loras = lora_apply.as_loras(loras)
        pipe._weights = lora_apply.merged_weights(mf, pipe._loras, strict=lora_strict, lazy=True)
        if low_memory:  # (engine_class above: a missing engine library fails here, not in the middle of a call)
            return pipe
        try:
            for name in mf.required_components:
                t0 = time.perf_counter()
                pipe.engines[name] = pipe._create(name)
                pipe.load_times[name] = time.perf_counter() - t0
        except BaseException:
            pipe.close()
            raise
        return pipe

    def _create(self, component: str) -> Engine:
        options = self._engine_options
        if self._weights.get(component):
            options = {**options, "weights": self._weights[component]}
        return create_engine(self.engine_name, self.folder.component_path(component), component=component, **options)

    @property
    def loras(self) -> list[tuple[str, float]]:
        """The LoRAs applied now: ``[(file, scale), ...]``."""
        return [(str(lora.file.path), lora.scale) for lora in self._loras]

    def set_loras(self, loras=None, strict: bool = False) -> list[str]:
        """Apply ``loras`` (as ``load`` takes them; ``[]`` or None: none) in place of the current ones; return the
        components whose engines were re-created. Only the engines whose weights change are re-created, each from
        the base weights plus the new LoRAs (never onto weights merged before), so removing every LoRA gives the
        base model's engines back. Every file is read and matched before anything changes: a bad one leaves the
        pipeline as it was. Call it between generations, not while another thread runs one: the engines it
        re-creates are closed first."""
        new = lora_apply.as_loras(loras)
        before, after = lora_apply.touched(self._loras), lora_apply.touched(new)
        changed = sorted(c for c in set(before) | set(after) if before.get(c) != after.get(c))
        # matched here, before any engine goes (bad input leaves the pipeline as it was); merged only as the new
        # engines read them, after the old engines and their weights are gone
        weights = lora_apply.merged_weights(self.folder, new, strict=strict, components=changed, lazy=True)
        with self._load_lock:
            loaded = [c for c in changed if c in self.engines]
            for component in changed:
                if component in self.engines:
                    self.engines.pop(component).close()
                self._weights.pop(component, None)
            gc.collect()
            self._loras = new
            self._weights.update(weights)
            for component in loaded:
                t0 = time.perf_counter()
                self.engines[component] = self._create(component)
                self.load_times[component] = time.perf_counter() - t0
        return changed

    @contextmanager
    def _component(self, name: str, timings: dict[str, float]):
        """The engine for ``name``; in low-memory mode it is loaded here and released on exit."""
        if name not in self.engines and not self.low_memory and name not in self.folder.required_components:
            with self._load_lock:  # an optional component (vae_encoder) loads on first use and stays
                if name not in self.engines:
                    t0 = time.perf_counter()
                    self.engines[name] = self._create(name)
                    self.load_times[name] = time.perf_counter() - t0
        if name in self.engines:
            yield self.engines[name]
            return
        t0 = time.perf_counter()
        eng = self._create(name)
        timings[f"load_{name}"] = time.perf_counter() - t0
        try:
            yield eng
        finally:
            eng.close()
            del eng
            gc.collect()  # release the session's memory before the next component loads

    def _check_memory(self, images: int, guidance: bool, height: int, width: int, encodes: bool = False) -> None:
        """Refuse a request whose estimated working memory exceeds the limit (CPU engines only:
        a GPU's memory is the engine's to report). ``encodes``: the call runs the VAE encoder too."""
        providers = self._engine_options.get("providers")
        if (
            self.memory_limit is None
            or self.engine_name != "onnxruntime"
            or (providers and providers[0] != "CPUExecutionProvider")
        ):
            return
        limit = resources.available_memory_bytes() if self.memory_limit == "auto" else int(self.memory_limit)
        if limit is None:
            return
        fused = self._unet_attention_fused()
        weights = 0
        if self.low_memory:  # nothing is resident between calls: the component's weights come on top
            stages = ("unet", "vae_decoder", "vae_encoder") if encodes else ("unet", "vae_decoder")
            weights = max(self.folder.component_bytes(name) for name in stages)
        kw: dict[str, Any] = dict(images=images, guidance=guidance, vae_downscale=self.folder.vae_downscale,
                                  fused_attention=fused, weights=weights, encodes=encodes)  # fmt: skip
        need = resources.estimate(self.folder.path, height=height, width=width, **kw)
        if need.bytes <= limit:
            return
        side = resources.largest_square(self.folder.path, limit, self.folder.size_multiple, **kw)
        gib = resources.GIB
        what = "available now" if self.memory_limit == "auto" else "allowed by memory_limit"
        fixes = [f"a smaller width/height (about {side}x{side} fits)" if side else "a smaller width/height"]
        if images > 1:
            fixes.append("fewer images per call")
        if need.stage == "unet" and not fused:
            fixes.append(f"`edgediff optimize {self.folder.path}` (flash attention needs far less memory)")
        raise ResourceError(
            f"{width}x{height} x {images} image(s) needs about {need.bytes / gib:.1f} GiB in the {need.stage} "
            f"({need.what}), more than the {limit / gib:.1f} GiB {what}; use {', or '.join(fixes)}. To run it "
            "anyway: memory_limit=None (CLI: --memory-limit off)"
        )

    def _unet_attention_fused(self) -> bool:
        """Whether the UNet runs the fused (flash) attention of `edgediff optimize`'s variant."""
        eng = self.engines.get("unet")
        model_file = getattr(eng, "model_file", None) if eng is not None else None
        if eng is None and self.engine_name == "onnxruntime":  # low-memory mode: the variant it would load
            from edgediff.engines.onnxruntime import saved_cpu_variant

            choice = self._engine_options.get("cpu_variant", "auto")
            if choice != "off":
                precision = "int8" if choice == "int8" else "fp32"
                model_file = saved_cpu_variant(self.folder.component_path("unet"), "unet", precision)
        if model_file is None or Path(model_file).parent.parent.name not in ("ort-cpu", "ort-cpu-int8"):
            return False
        try:
            return bool(json.loads((Path(model_file).parent / "optimized.json").read_text()).get("fused"))
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        self.engines = {}
        self._weights = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        scheduler: str | dict | schedulers.Scheduler | None = None,
        num_images_per_prompt: int = 1,
        callback: Callback | None = None,
        generator: Generator | None = None,
        eta: float = 0.0,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        image: Any = None,
        strength: float | None = None,
        mask_image: Any = None,
        keep_unmasked: bool = False,
        seeds: Sequence[int] | None = None,
        guidance_rescale: float = 0.0,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        decoder: str = "full",
    ) -> GenerationResult:
        """Generate images. Arguments as diffusers' StableDiffusionPipeline: ``eta`` reaches DDIM
        only; ``timesteps`` / ``sigmas`` give a custom schedule to schedulers that accept one
        (then ``num_inference_steps`` is ignored).

        ``image`` (a PIL image, an HxWx3 uint8 array or a path) makes it image-to-image, as diffusers'
        StableDiffusionImg2ImgPipeline: ``strength`` (default 0.8, in (0, 1]) keeps the last
        ``int(num_inference_steps * strength)`` steps of the schedule and starts from the image's VAE latents
        noised to that level. The output has the image's size, floored to a multiple of the folder's
        ``size_multiple`` (diffusers floors to the VAE factor), unless ``width``/``height`` are given; the image is
        resized to it with Pillow's Lanczos filter, as diffusers' VaeImageProcessor.

        ``mask_image`` (white = repaint; a PIL image, a path, or an HxW / HxWx3 uint8 or bool array of the image's
        size) with ``image`` makes it inpainting, as diffusers' StableDiffusionInpaintPipeline (``strength`` default
        1.0): a 9-channel inpainting UNet gets the mask and the masked image's latents every step; a standard UNet
        gets the image's latents, re-noised to the next step's level, blended back outside the mask after every
        step. Like diffusers, the pixels outside the mask are the VAE's rendering of them, not the input's:
        ``keep_unmasked=True`` pastes the input's pixels back there (the mask's grey edge blends). The output size
        follows the image as for img2img (diffusers' inpainting defaults to the model's native size instead).

        ``seeds`` (one per image, e.g. ``[s, s+1, ...]`` as A1111-style clients send): image i draws everything from
        its own generator, so ``seed=seeds[i]`` alone remakes image i; without it one generator (``seed``) draws
        for the whole batch in diffusers' order.

        ``num_inference_steps``, ``guidance_scale`` and ``strength`` default to the model's
        (``ModelFolder.call_defaults``): diffusers' for the family and mode (SD 50 steps at 7.5; SDXL 5.0, its
        img2img strength 0.3, inpainting 0.9999 at 7.5), or what a few-step model folder says (Turbo: 1 step at
        guidance 0; LCM: 4 steps at 8).
        ``guidance_rescale`` (0..1): diffusers' ``rescale_noise_cfg`` after guidance, as in its SD and SDXL pipelines.

        SDXL models only, as diffusers' StableDiffusionXLPipeline: ``prompt_2`` / ``negative_prompt_2`` for the
        second text encoder (default: ``prompt`` / ``negative_prompt``); the size conditioning ``original_size``,
        ``crops_coords_top_left``, ``target_size`` (``(height, width)`` and ``(top, left)`` in pixels; default the
        output size and (0, 0)) and their ``negative_`` counterparts (default: the positive ones). With no
        ``negative_prompt`` an SDXL model whose folder says ``force_zeros_for_empty_prompt`` conditions the negative
        on zeros (``""`` is encoded).

        ``decoder="tiny"``: the folder's tiny autoencoder (TAESD, ``edgediff add-tiny-vae``) decodes the image, and
        encodes img2img's and inpainting's picture (as diffusers with ``pipe.vae = AutoencoderTiny``): much faster,
        a little softer.

        ``callback(step, timestep, latents)`` runs after every UNet call (return False to cancel); one that also
        takes a ``preview`` keyword gets a function that decodes the current estimate of the clean image to PIL
        images, on the tiny decoder when the folder has one (a live preview at the cost of one decode); one that
        takes ``denoised`` gets a function returning that estimate's latents."""
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        custom_latents = latents is not None  # not recorded: an image made from them cannot be regenerated
        # 1. Check inputs
        prompts = _text_list("prompt", prompt)
        negatives = [""] * len(prompts) if negative_prompt is None else _text_list("negative_prompt", negative_prompt,
                                                                                   len(prompts))  # fmt: skip
        sizes = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                 "target_size": target_size, "negative_original_size": negative_original_size,
                 "negative_crops_coords_top_left": negative_crops_coords_top_left,
                 "negative_target_size": negative_target_size}  # fmt: skip
        texts = _Texts(prompts, negatives)
        if "added_cond" in self.folder.features:
            texts = _Texts(prompts, negatives, _text_list("prompt_2", prompt_2 or prompt, len(prompts)),
                           _text_list("negative_prompt_2", negative_prompt_2 or negative_prompt or "", len(prompts)),
                           zero_negatives=negative_prompt is None
                           and self.folder.force_zeros_for_empty_prompt)  # fmt: skip
        else:
            self._refuse_sdxl_arguments(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, **sizes)
        mode = "txt2img" if image is None else "img2img" if mask_image is None else "inpaint"
        defaults = self.folder.call_defaults(mode)
        tiny = self._tiny_decoder(decoder)
        per_prompt = _check_positive_int("num_images_per_prompt", num_images_per_prompt)
        init_image, mask, strength, height, width = self._image_inputs(image, mask_image, strength, latents,
                                                                       keep_unmasked, height, width, tiny)  # fmt: skip
        native_h, native_w = self.folder.native_size
        height = native_h if height is None else height
        width = native_w if width is None else width
        f = self.folder.vae_downscale
        for name, v in (("width", width), ("height", height)):
            _check_side(name, v, self.folder)
        if guidance_scale is None:
            guidance_scale = defaults["guidance_scale"]
        guidance_scale = _check_finite("guidance_scale", guidance_scale, f"this model's default is "
                                       f"{defaults['guidance_scale']:g}; 1 or less turns guidance off")  # fmt: skip
        guidance_rescale = _check_finite("guidance_rescale", guidance_rescale, "the share of the rescaled guidance, "
                                         "0 (off) to 1", minimum=0.0)  # fmt: skip
        if guidance_rescale > 1:
            raise InvalidArgumentError(f"guidance_rescale must be between 0 (off) and 1, got {guidance_rescale:g}")
        self._warn_distilled_guidance(guidance_scale)
        if generator is not None and seed is not None:
            raise InvalidArgumentError(
                "pass seed or generator, not both: the generator draws the noise, so the seed would be recorded "
                "for an image it did not make"
            )
        if seed is not None:
            seed = check_seed(seed)
        plan = self._plan(num_inference_steps, scheduler, eta, timesteps, sigmas, strength)
        sched, schedule, begin, steps, eta = plan.scheduler, plan.schedule, plan.begin, plan.steps, plan.eta
        batch = len(prompts) * per_prompt
        if seeds is not None:
            generator = _seed_list(seeds, seed, generator, batch, len(prompts), per_prompt)
        shape = (batch, self.folder.latent_channels, height // f, width // f)
        if latents is not None:
            with np.errstate(over="ignore"):  # 1e39 becomes inf in float32: refused just below
                latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise InvalidArgumentError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
            if not np.isfinite(latents).all():
                raise InvalidArgumentError(
                    "latents contain NaN or infinite values (or values beyond float32's range, about 3.4e38); "
                    "pass finite starting latents"
                )
        do_cfg = self._guided(guidance_scale)
        size_rows = self._size_conditioning(sizes, height, width) if "added_cond" in self.folder.features else None
        self._check_memory(batch, do_cfg, height, width, encodes=init_image is not None)

        # 2. Prompt encoding -> the UNet's conditioning inputs
        conditioning = self._encode_prompt(texts, do_cfg, per_prompt, timings)
        if size_rows is not None:
            rows = size_rows if do_cfg else size_rows[1:]
            conditioning["time_ids"] = _frozen(np.concatenate([np.repeat(row[None], batch, axis=0) for row in rows]))
        if "timestep_cond" in self.folder.features:
            conditioning["timestep_cond"] = _frozen(self._guidance_embedding(guidance_scale, batch))

        # 3. Start latents
        if generator is None:
            generator = make_generator(seed)
        seed = getattr(generator, "seed", None)  # what actually draws the noise; None for a foreign generator
        hook, soft = None, None
        if init_image is not None:
            pixels = preprocess(init_image, height, width)
            binary_mask, soft = (None, None) if mask is None else preprocess_mask(mask, height, width)
            latents, hook = self._image_start(pixels, binary_mask, shape, sched, schedule, begin, strength, do_cfg,
                                              generator, timings, tiny)  # fmt: skip
        else:
            if latents is None:
                latents = generator.randn(shape).astype(np.float32)
            latents = latents * np.float32(schedule.init_noise_sigma)

        # 4. Denoising loop
        latents, unet_calls = self._denoise(sched, schedule, begin, latents, conditioning, guidance_scale, generator,
                                            callback, hook, timings, guidance_rescale)  # fmt: skip

        # 5. Decode
        images = self._decode(latents, timings, tiny)
        if keep_unmasked and soft is not None:
            images = paste_unmasked(images, init_image, soft)
        timings["total"] = time.perf_counter() - t_start
        # Everything that changes the pixels, so that pipe(**parameters.call_arguments(params)) repeats the call
        params = {
            "prompt": prompts[0] if isinstance(prompt, str) else prompts,
            "negative_prompt": negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "eta": eta if "eta" in sched.step_options else None,
            "timesteps": [float(t) for t in timesteps] if timesteps is not None else None,
            "sigmas": [float(s) for s in sigmas] if sigmas is not None else None,
            "width": width,
            "height": height,
            "seed": seed,
            "custom_latents": custom_latents,
            "scheduler": scheduler_label(sched),
            "scheduler_class": sched.class_name,
            "scheduler_config": dict(sched.config),
            "scheduler_options": parameters.scheduler_options(sched, self.folder.scheduler_config),
            "num_images_per_prompt": per_prompt,
            "model": self.folder.path.name,
            "model_hash": parameters.model_hash(self.folder),
            "engine": self.engine_name,
            "engine_options": {k: v for k, v in self._engine_options.items() if k in RECORDED_OPTIONS},
            "edgediff_version": __version__,
        }
        if guidance_rescale:
            params["guidance_rescale"] = guidance_rescale
        if tiny:
            params["decoder"] = "tiny"
        if "added_cond" in self.folder.features:  # SDXL's own arguments, as given
            params["prompt_2"] = prompt_2
            params["negative_prompt_2"] = negative_prompt_2
            params |= {k: list(v) if v is not None else None for k, v in sizes.items()}
        if isinstance(generator, GeneratorList):
            params["seeds"] = generator.seeds
        if init_image is not None:  # img2img and inpainting only, so that txt2img records keep their keys
            params["strength"] = strength
            params["init_image"] = True  # the input image is not in the record
        if mask is not None:
            params["mask"] = True  # nor is the mask
            params["keep_unmasked"] = bool(keep_unmasked)
        if self._loras:
            params["loras"] = [{"name": lora.name, "file": str(lora.file.path), "scale": lora.scale,
                                "hash": lora.hash} for lora in self._loras]  # fmt: skip
        return GenerationResult(images, params, timings, unet_calls)

    def planned_calls(self, num_inference_steps: int | None = None, scheduler=None, eta: float = 0.0, timesteps=None,
                      sigmas=None, image=None, strength=None, mask_image=None, **_other) -> int:  # fmt: skip
        """How many UNet calls (callbacks) ``pipe(**the same arguments)`` makes: a progress bar's total. img2img and
        inpainting run the schedule's tail; Heun makes 2N-1 calls for N steps, PNDM N+1."""
        mode = "txt2img" if image is None else "img2img" if mask_image is None else "inpaint"
        strength = None if image is None else _strength(strength, mask_image is not None,
                                                        self.folder.call_defaults(mode)["strength"])  # fmt: skip
        plan = self._plan(num_inference_steps, scheduler, eta, timesteps, sigmas, strength)
        return len(plan.schedule.timesteps) - plan.begin

    # -- stages ----------------------------------------------------------------------------------
    def _plan(self, num_inference_steps, scheduler, eta, timesteps, sigmas, strength: float | None) -> _Plan:
        """The scheduler, its schedule (immutable, per call) and the first call that runs: diffusers'
        ``get_timesteps`` for img2img's and inpainting's ``strength``, else 0."""
        if timesteps is not None:
            steps = len(timesteps)
        elif sigmas is not None:
            steps = len(sigmas) - 1
        else:
            if num_inference_steps is None:
                mode = "txt2img" if strength is None else "img2img"  # the same in every mode of a family
                num_inference_steps = self.folder.call_defaults(mode)["num_inference_steps"]
            steps = _check_positive_int("num_inference_steps", num_inference_steps)
        eta = _check_finite("eta", eta, "DDIM's eta is between 0 (deterministic) and 1", minimum=0.0)
        if scheduler is None and not eta:
            sched = self.default_scheduler
        else:
            sched = schedulers.resolve(scheduler, self.folder.scheduler_config, eta=eta)
        if timesteps is None and sigmas is None:
            schedule = sched.schedule(steps)
        else:
            schedule = sched.schedule(timesteps=timesteps, sigmas=sigmas)
        begin = 0
        if strength is not None:
            n = steps if timesteps is None and sigmas is None else len(schedule.timesteps)
            begin = _begin_index(n, strength, sched.order)
        return _Plan(sched, schedule, begin, steps, eta)

    def _image_inputs(self, image, mask_image, strength, latents, keep_unmasked: bool, height, width,
                      tiny: bool = False):  # fmt: skip
        """Checks the image-to-image and inpainting arguments; returns (RGB image or None, mask or None, strength,
        height, width) with diffusers' strength defaults (img2img 0.8, inpainting 1.0)."""
        inpainting_unet = self.folder.unet_kind == "inpainting"
        if mask_image is not None and image is None:
            raise InvalidArgumentError("mask_image needs image=: the mask says which part of that image to repaint")
        if inpainting_unet and mask_image is None:
            raise InvalidArgumentError(
                f"{self.folder.path.name} is an inpainting model (its UNet takes latents, mask and masked-image "
                "latents): pass image= and mask_image=, or use a standard "
                "model for text-to-image and image-to-image"
            )
        if keep_unmasked and mask_image is None:
            raise InvalidArgumentError("keep_unmasked applies only to inpainting: pass image= and mask_image= too")
        if image is None:
            if strength is not None:
                raise InvalidArgumentError("strength applies only to image-to-image and inpainting: pass image= too, "
                                           "or drop strength")  # fmt: skip
            return None, None, None, height, width
        mode = "img2img" if mask_image is None else "inpaint"
        strength = _strength(strength, mask_image is not None, self.folder.call_defaults(mode)["strength"])
        if latents is not None:
            raise InvalidArgumentError("pass image or latents, not both: img2img starts from the image's latents")
        encoder = "vae_encoder_tiny" if tiny else "vae_encoder"
        if encoder not in self.engines and not self.folder.component_path(encoder).is_file():
            mode = "image-to-image" if mask_image is None else "inpainting"
            fix = "re-export the model with `edgediff export` (it writes vae_encoder/model.onnx)"
            if tiny:
                fix = f"add the tiny autoencoder again: `edgediff add-tiny-vae {self.folder.path} TAESD_DIR --force`"
            raise ModelFolderError(f"{self.folder.path} has no {encoder}, which {mode} needs; {fix}")
        init_image = load_image(image)
        mask = None
        if mask_image is not None:
            mask = load_mask(mask_image)
            if mask.size != init_image.size:
                raise InvalidArgumentError(
                    f"mask_image is {mask.width}x{mask.height} but image is {init_image.width}x{init_image.height}; "
                    "give a mask of the image's size (white = repaint), so that it lines up with the picture"
                )
        height, width = self._image_size(init_image, height, width)
        return init_image, mask, strength, height, width

    def _image_size(self, img: Image.Image, height: int | None, width: int | None) -> tuple[int, int]:
        """img2img's output size: the given sides, else the image's floored to ``size_multiple`` (diffusers floors
        to the VAE factor; the exported UNet needs the larger multiple)."""
        m = self.folder.size_multiple
        sides = []
        for name, given, own in (("height", height, img.height), ("width", width, img.width)):
            if given is None:
                given = own - own % m
                if given <= 0:
                    raise InvalidArgumentError(
                        f"image: its {name} {own} is below the model's size multiple {m}; pass a larger image or "
                        f"{name}= (it is then resized)"
                    )
            sides.append(given)
        if (sides[1], sides[0]) != img.size:
            logger.info("img2img: resizing the %dx%d image to %dx%d", img.width, img.height, sides[1], sides[0])
        return sides[0], sides[1]

    def _encode_prompt(self, texts: _Texts, do_cfg: bool, per_prompt: int,
                       timings: dict[str, float]) -> dict[str, np.ndarray]:  # fmt: skip
        """The UNet's conditioning inputs: uncond ‖ cond, each prompt's row repeated ``per_prompt`` times in a row, as
        diffusers. SD 1/2: one text encoder's last hidden state. SDXL: both encoders' penultimate hidden states side
        by side (``encoder_hidden_states``) and the second's pooled projection (``text_embeds``); zeros for the
        negative when ``texts.zero_negatives``."""
        t0 = time.perf_counter()

        def labels(name: str, n: int) -> list[str]:
            return [name] if n == 1 else [f"{name} {i + 1}" for i in range(n)]

        encode_negative = do_cfg and not (texts.zero_negatives and texts.prompts_2 is not None)
        encoders = [("text_encoder", self.tokenizer, texts.prompts, texts.negatives, "")]
        if texts.prompts_2 is not None:
            assert self.folder.tokenizer_2 is not None and texts.negatives_2 is not None  # an SDXL folder has both
            encoders.append(("text_encoder_2", self.folder.tokenizer_2, texts.prompts_2, texts.negatives_2, "_2"))
        ids = []
        for _, tokenizer, prompts, negatives, suffix in encoders:
            batch, names = prompts, labels(f"prompt{suffix}", len(prompts))
            if encode_negative:
                batch, names = negatives + prompts, labels(f"negative_prompt{suffix}", len(negatives)) + names
            ids.append(tokenizer.encode(batch, labels=names))
        timings["tokenize"] = time.perf_counter() - t0
        timings["text_encoder"] = 0.0
        hidden, pooled = [], None
        for (name, *_), name_ids in zip(encoders, ids, strict=True):
            with self._component(name, timings) as text_encoder:
                t0 = time.perf_counter()
                out = text_encoder.run({"input_ids": name_ids})
                timings["text_encoder"] += time.perf_counter() - t0
            if texts.prompts_2 is None:  # SD 1/2
                hidden.append(out["last_hidden_state"])
                continue
            layers = [k for k in out if k.startswith("hidden_states.")]
            if len(layers) < 2:
                raise ModelFolderError(
                    f"{name} of {self.folder.path} has no per-layer outputs (hidden_states.0 ..), which SDXL's "
                    "conditioning needs (its penultimate layer); re-export the model with `edgediff export`"
                )
            hidden.append(out[f"hidden_states.{len(layers) - 2}"])  # the penultimate layer, as diffusers' [-2]
            if "text_embeds" in out:  # the pooled embedding: the second encoder's projection
                pooled = out["text_embeds"]
        emb = np.concatenate([h.astype(np.float32, copy=False) for h in hidden], axis=-1)
        if not np.isfinite(emb).all() or (pooled is not None and not np.isfinite(pooled).all()):
            raise NonFiniteError(
                "the text encoder produced NaN or infinite embeddings: its weights are damaged or overflow in this "
                "precision; re-export the model (without --fp16 if it was fp16)"
            )
        conditioning = {"encoder_hidden_states": emb}
        if pooled is not None:
            conditioning["text_embeds"] = pooled.astype(np.float32, copy=False)
        for key, value in conditioning.items():
            if do_cfg and not encode_negative:  # SDXL's zeros for an absent negative prompt
                value = np.concatenate([np.zeros_like(value), value])
            n = len(value) // (2 if do_cfg else 1)
            value = np.concatenate([np.repeat(half, per_prompt, axis=0) for half in np.split(value, len(value) // n)])
            conditioning[key] = _frozen(value)
        return conditioning

    def _refuse_sdxl_arguments(self, **given) -> None:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise InvalidArgumentError(
                f"{', '.join(named)} appl{'ies' if len(named) == 1 else 'y'} only to SDXL models (two text encoders "
                f"and size conditioning); {self.folder.path.name} is a {self.folder.family.name} model: drop "
                f"{'it' if len(named) == 1 else 'them'}"
            )

    def _guided(self, guidance_scale: float) -> bool:
        """Classifier-free guidance (a doubled UNet batch): guidance_scale > 1, except for an LCM UNet, which takes
        the guidance as an embedding instead (diffusers' ``do_classifier_free_guidance``)."""
        return guidance_scale > 1.0 and "timestep_cond" not in self.folder.features

    def _warn_distilled_guidance(self, guidance_scale: float) -> None:
        if self._guided(guidance_scale) and self.folder.guidance_distilled:
            logger.warning(
                "%s is a guidance-distilled model (trained to work at guidance_scale 0, e.g. SD-Turbo): "
                "guidance_scale %g doubles every UNet call's batch (about twice the time) and usually makes the image "
                "worse; use guidance_scale 0", self.folder.path.name, guidance_scale,
            )  # fmt: skip

    def _size_conditioning(self, sizes: dict, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """SDXL's ``time_ids`` rows (negative, positive): (original h, w, crop top, left, target h, w). Each negative
        number defaults to its positive one (diffusers' img2img rule; see DECISIONS for its txt2img quirks)."""
        checked: dict[str, tuple[int, int] | None] = {}
        for key, value in sizes.items():
            if value is None:
                checked[key] = None
                continue
            is_crop = "crops" in key
            if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2
                    or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                               and v >= (0 if is_crop else 1) for v in value)):  # fmt: skip
                what = "(top, left), two integers >= 0" if is_crop else "(height, width) in pixels, two integers >= 1"
                raise InvalidArgumentError(f"{key} must be {what}, got {value!r}")
            checked[key] = (int(value[0]), int(value[1]))
        original = checked["original_size"] or (height, width)
        crop = checked["crops_coords_top_left"] or (0, 0)
        target = checked["target_size"] or (height, width)
        negative = (checked["negative_original_size"] or original, checked["negative_crops_coords_top_left"] or crop,
                    checked["negative_target_size"] or target)  # fmt: skip
        rows = [np.asarray([*a, *b, *c], dtype=np.float32) for a, b, c in (negative, (original, crop, target))]
        n = self.folder.model_symbols().get("T", 6)
        if len(rows[0]) != n:
            raise ModelFolderError(f"the UNet of {self.folder.path} takes {n} size-conditioning numbers; edgediff "
                                   "gives SDXL base's 6")  # fmt: skip
        return rows[0], rows[1]

    def _guidance_embedding(self, guidance_scale: float, batch: int) -> np.ndarray:
        """An LCM UNet's ``timestep_cond``: diffusers' ``get_guidance_scale_embedding(guidance_scale - 1)`` in float32,
        with the frequencies torch computed at export (the manifest's; numpy's exp misses some by an ulp)."""
        dim = self.folder.model_symbols()["E"]
        half = dim // 2
        freqs = self.folder.manifest.get("guidance_embedding", {}).get("frequencies")
        if not (isinstance(freqs, list) and len(freqs) == half):  # an optimum folder: correctly rounded instead
            freqs = np.exp(np.arange(half) * -(np.log(np.float32(10000.0)).astype(np.float64) / (half - 1)))
        w = np.float32(guidance_scale - 1) * np.float32(1000.0)
        angles = w * np.asarray(freqs, dtype=np.float32)
        emb = np.concatenate([np.sin(angles), np.cos(angles)]).astype(np.float32)
        if dim % 2:
            emb = np.concatenate([emb, np.zeros(1, np.float32)])
        return np.repeat(emb[None], batch, axis=0)

    def _encode_image(self, pixels: np.ndarray, batch: int, generator: Generator,
                      timings: dict[str, float], tiny: bool = False) -> np.ndarray:  # fmt: skip
        """[1,3,H,W] in [-1, 1] -> [batch,C,h,w] scaled latents sampled from the VAE encoder's diagonal Gaussian
        (mean ‖ logvar) as diffusers' ``latent_dist.sample(generator)``: one draw of one image's latent shape, tiled
        to the batch; with per-image generators (``seeds``) each image's row is its own generator's draw. ``tiny``:
        the tiny encoder gives the latents themselves (no draw), times its own scaling factor."""
        if tiny:
            with self._component("vae_encoder_tiny", timings) as vae_encoder:
                t0 = time.perf_counter()
                z = vae_encoder.run({"sample": pixels})["latent_sample"].astype(np.float32)
                timings["vae_encoder"] = timings.get("vae_encoder", 0.0) + time.perf_counter() - t0
            z = (np.float32(self.folder.tiny_vae_scaling_factor) * z).astype(np.float32)
            return np.concatenate([z] * batch) if batch > 1 else z
        with self._component("vae_encoder", timings) as vae_encoder:
            t0 = time.perf_counter()
            moments = vae_encoder.run({"sample": pixels})["latent_parameters"].astype(np.float32)
            timings["vae_encoder"] = timings.get("vae_encoder", 0.0) + time.perf_counter() - t0
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
        rows = batch if isinstance(generator, GeneratorList) else 1
        z = mean + std * generator.randn((rows, *mean.shape[1:])).astype(np.float32)
        if not np.isfinite(z).all():
            raise NonFiniteError(
                "the VAE encoder produced NaN or infinite latents (an fp16 VAE overflows this way); re-export the "
                "model without --fp16"
            )
        z = (np.float32(self.folder.vae_scaling_factor) * z).astype(np.float32)
        return np.concatenate([z] * (batch // rows)) if rows < batch else z

    def _image_start(self, pixels, mask, shape, sched, schedule, begin, strength, do_cfg, generator, timings,
                     tiny: bool = False):  # fmt: skip
        """img2img's and inpainting's start latents, and inpainting's StepHook, as diffusers (its draws: the image's
        VAE sample, then the noise, then the masked image's VAE sample; an inpainting UNet at strength 1.0 never
        uses the image latents, so they are not drawn). ``mask``: [1,1,H,W] of 0/1, or None for img2img."""
        batch = shape[0]
        inpainting_unet = mask is not None and self.folder.unet_kind == "inpainting"
        image_latents = None
        if not (inpainting_unet and strength == 1.0):
            image_latents = self._encode_image(pixels, batch, generator, timings, tiny)
        noise = generator.randn(shape).astype(np.float32)
        if mask is not None and strength == 1.0:  # inpainting from pure noise (img2img at 1.0 still adds noise)
            latents = noise * np.float32(schedule.init_noise_sigma)
        else:
            latents = sched.add_noise(schedule, image_latents, noise, begin)
        if mask is None:
            return latents, None
        masked = self._encode_image(pixels * (mask < 0.5), batch, generator, timings, tiny)  # repainted: mid-grey
        f = self.folder.vae_downscale
        m = np.repeat(mask[:, :, ::f, ::f], batch, axis=0)  # nearest: each latent cell takes its top-left pixel
        if inpainting_unet:
            extra = np.concatenate([m, masked], axis=1)
            extra = np.concatenate([extra, extra]) if do_cfg else extra
            extra.flags.writeable = False  # the same array every step, as the conditioning
            return latents, StepHook(extra_inputs=lambda j: extra)
        last = len(schedule.timesteps) - 1
        keep = np.float32(1) - m

        def blend(j: int, latents: np.ndarray) -> np.ndarray:
            """The original outside the mask, re-noised to the next call's level with the start noise (clean after
            the last call)."""
            k = begin + j
            original = sched.add_noise(schedule, image_latents, noise, k + 1) if k < last else image_latents
            return keep * original + m * latents

        return latents, StepHook(after_step=blend)

    def _denoise(
        self,
        sched: schedulers.Scheduler,
        schedule: schedulers.Schedule,
        begin: int,
        latents: np.ndarray,
        conditioning: dict[str, np.ndarray],
        guidance_scale: float,
        generator: Generator,
        callback: Callback | None,
        hook: StepHook | None,
        timings: dict[str, float],
        guidance_rescale: float = 0.0,
    ) -> tuple[np.ndarray, list[float]]:
        """Calls ``begin``.. of ``schedule``: guidance, scheduler step, non-finite check, callback and cancel. It knows
        no modes: ``hook`` adds UNet input channels and post-step work (inpainting)."""
        do_cfg = self._guided(guidance_scale)
        unet_calls: list[float] = []
        in_callback = 0.0
        with self._component("unet", timings) as unet:
            t0 = time.perf_counter()
            timestep_spec = unet.inputs["timestep"]
            state = sched.initial_state(schedule)
            n_calls = len(schedule.timesteps) - begin
            wanted = [k for k in ("preview", "denoised") if callback is not None and _takes_keyword(callback, k)]
            for j, i in enumerate(range(begin, len(schedule.timesteps))):
                t = schedule.timesteps[i]
                before = latents
                model_in = np.concatenate([latents, latents]) if do_cfg else latents
                model_in = sched.scale_model_input(schedule, i, model_in)
                if hook is not None and hook.extra_inputs is not None:
                    model_in = np.concatenate([model_in, hook.extra_inputs(j)], axis=1)
                feeds = {"sample": model_in, "timestep": _timestep(timestep_spec, t, model_in.shape[0]),
                         **conditioning}  # fmt: skip
                u0 = time.perf_counter()
                noise = unet.run(feeds)["out_sample"]
                unet_calls.append(time.perf_counter() - u0)
                noise = noise.astype(np.float32, copy=False)
                with np.errstate(invalid="ignore", over="ignore"):  # a NaN is reported below, in words
                    if do_cfg:
                        uncond, cond = np.split(noise, 2)
                        noise = uncond + np.float32(guidance_scale) * (cond - uncond)
                        if guidance_rescale > 0:
                            noise = _rescale_guidance(noise, cond, guidance_rescale)
                    latents, state = sched.step(schedule, i, noise, latents, state, generator)
                    if hook is not None and hook.after_step is not None:
                        latents = hook.after_step(j, latents)
                if not np.isfinite(latents).all():
                    raise NonFiniteError(
                        f"the latents stopped being finite (NaN or infinity) at step {j + 1} of {n_calls} "
                        f"(timestep {float(t):g}) with {sched.class_name} and guidance_scale {guidance_scale:g}; "
                        "nothing was written. Try another scheduler or scheduler settings, or a lower guidance_scale"
                    )
                if callback is not None:
                    c0 = time.perf_counter()
                    if wanted:
                        extra = self._step_views(sched, schedule, i, before, noise, wanted)
                        stop = cast(Any, callback)(j, float(t), latents, **extra) is False
                    else:
                        stop = callback(j, float(t), latents) is False
                    in_callback += time.perf_counter() - c0
                    if stop:
                        raise GenerationCancelled(f"cancelled by the callback at step {j + 1} of {n_calls}")
            timings["denoise"] = time.perf_counter() - t0
        timings["unet"] = sum(unet_calls)
        if callback is not None:
            timings["callback"] = in_callback
        timings["host"] = timings["denoise"] - timings["unet"] - in_callback
        return latents, unet_calls

    def _step_views(self, sched, schedule, i: int, sample: np.ndarray, prediction: np.ndarray,
                    wanted: list[str]) -> dict[str, Callable]:  # fmt: skip
        """What a callback asked for, as zero-argument functions (computed only when called): ``denoised``, call
        ``i``'s estimate of the clean latents; ``preview``, those decoded (tiny decoder when there is one)."""

        def denoised() -> np.ndarray:
            return sched.denoised(schedule, i, sample, prediction)

        def preview() -> list[Image.Image]:
            return self._decode(denoised(), {}, self.folder.has_tiny_vae)

        views = {"denoised": denoised, "preview": preview}
        return {k: views[k] for k in wanted}

    def decode(self, latents: np.ndarray, decoder: str = "full") -> list[Image.Image]:
        """Latents in the UNet's space (what the callback sees, or its ``denoised()``) -> images, on the full VAE or
        the tiny one: what a server returns for a job interrupted mid-way."""
        return self._decode(np.asarray(latents, dtype=np.float32), {}, self._tiny_decoder(decoder))

    def _tiny_decoder(self, decoder) -> bool:
        if decoder not in ("full", "tiny"):
            raise InvalidArgumentError(
                f"decoder must be 'full' (the model's VAE) or 'tiny' (its TAESD), got {decoder!r}"
            )
        if decoder == "tiny" and not self.folder.has_tiny_vae:
            raise ModelFolderError(
                f"{self.folder.path} has no tiny autoencoder (vae_decoder_tiny/); add one with `edgediff "
                f"add-tiny-vae {self.folder.path} TAESD_DIR`, TAESD_DIR being a diffusers AutoencoderTiny folder "
                "(madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL)"
            )
        return decoder == "tiny"

    def _decode(self, latents: np.ndarray, timings: dict[str, float], tiny: bool = False) -> list[Image.Image]:
        name, scale = ("vae_decoder_tiny", self.folder.tiny_vae_scaling_factor) if tiny else (
            "vae_decoder", self.folder.vae_scaling_factor)  # fmt: skip
        with self._component(name, timings) as vae_decoder:
            t0 = time.perf_counter()
            decoded = vae_decoder.run({"latent_sample": latents / np.float32(scale)})
            timings["vae_decoder"] = time.perf_counter() - t0
        if not np.isfinite(decoded["sample"]).all():
            raise NonFiniteError(
                "the VAE decoder produced NaN or infinite pixels (an fp16 VAE overflows this way); re-export the "
                "model without --fp16, or check the manifest's vae_scaling_factor"
            )
        t0 = time.perf_counter()
        images = to_pil(to_uint8(decoded["sample"]))
        timings["postprocess"] = time.perf_counter() - t0
        return images


@dataclass(frozen=True)
class _Plan:
    scheduler: schedulers.Scheduler
    schedule: schedulers.Schedule
    begin: int  # the index in the schedule of the first call that runs
    steps: int  # num_inference_steps as diffusers counts it (a custom schedule: its length)
    eta: float


@dataclass(frozen=True)
class StepHook:
    """What a mode adds to the denoising loop, the one extension point it has (inpainting): ``extra_inputs(j)``
    returns channels appended to the scaled UNet sample at loop step j (a 9-channel UNet's mask ‖ masked-image
    latents, already doubled for guidance); ``after_step(j, latents)`` returns the latents after scheduler step j
    (the 4-channel UNet's blend of the re-noised original outside the mask)."""

    extra_inputs: Callable[[int], np.ndarray] | None = None
    after_step: Callable[[int, np.ndarray], np.ndarray] | None = None


@dataclass(frozen=True)
class _Texts:
    """A call's prompts, one entry per prompt; ``prompts_2`` / ``negatives_2``: SDXL's second encoder's (None for
    SD 1/2); ``zero_negatives``: SDXL's zeros for the negative conditioning instead of encoding it."""

    prompts: list[str]
    negatives: list[str]
    prompts_2: list[str] | None = None
    negatives_2: list[str] | None = None
    zero_negatives: bool = False


def _text_list(name: str, value, n: int | None = None) -> list[str]:
    """A prompt argument as one string per prompt (a string stands for all ``n``)."""
    if n is not None and isinstance(value, str):
        return [value] * n
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    if not values or not all(isinstance(v, str) for v in values):
        raise InvalidArgumentError(f"{name} must be a string or a non-empty list of strings, got {value!r}"[:200])
    if n is not None and len(values) != n:
        raise InvalidArgumentError(f"{name} has {len(values)} entries but prompt has {n}; give one per prompt")
    return values


def _takes_keyword(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _rescale_guidance(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """diffusers' ``rescale_noise_cfg``: the guided prediction scaled to the conditional one's std per image, mixed
    in by ``phi`` (the ratio of stds does not depend on torch's unbiased estimate)."""
    axes = tuple(range(1, guided.ndim))
    ratio = cond.std(axis=axes, keepdims=True) / guided.std(axis=axes, keepdims=True)
    return (np.float32(phi) * (guided * ratio) + np.float32(1 - phi) * guided).astype(np.float32)


def _frozen(value: np.ndarray) -> np.ndarray:
    """The same array every step: GPU engines keep their device copy of an input that is not writeable."""
    value = np.ascontiguousarray(value, dtype=np.float32)
    value.flags.writeable = False
    return value


def _strength(strength, inpainting: bool, default: float) -> float:
    """``strength`` checked, or the model's default (diffusers': img2img 0.8, inpainting 1.0; SDXL 0.3, 0.9999)."""
    strength = default if strength is None else strength
    strength = _check_finite("strength", strength, "the share of the schedule that runs, in (0, 1]")
    if not 0.0 < strength <= 1.0:
        raise InvalidArgumentError(
            f"strength must be in (0, 1] (the share of the schedule that runs; diffusers' default is {default:g} "
            f"for {'inpainting' if inpainting else 'image-to-image'}), got {strength:g}"
        )
    return strength


def _seed_list(seeds, seed, generator, batch: int, prompts: int, per_prompt: int) -> GeneratorList:
    if seed is not None or generator is not None:
        raise InvalidArgumentError("pass seeds or seed/generator, not both: seeds gives every image its own seed")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise InvalidArgumentError(f"seeds must be a list of integers, one per image, got {seeds!r}")
    if len(seeds) != batch:
        raise InvalidArgumentError(
            f"seeds has {len(seeds)} entries but the call makes {batch} image(s) ({prompts} prompt(s) x "
            f"num_images_per_prompt {per_prompt}); give one seed per image"
        )
    return GeneratorList([make_generator(check_seed(s)) for s in seeds])


def _begin_index(n: int, strength: float, order: int) -> int:
    """diffusers' ``get_timesteps``: keep the last ``min(int(n*strength), n)`` of n steps (Python float product,
    truncated: 100*0.29 -> 28), i.e. start at call ``t_start*order`` (Heun's doubled calls)."""
    init_timestep = min(int(n * strength), n)
    if init_timestep < 1:
        raise InvalidArgumentError(
            f"strength={strength:g} with {n} inference steps runs no step (int({n} * {strength:g}) = 0); raise "
            f"strength to at least {1 / n:.3g} or num_inference_steps to at least {math.ceil(1 / strength)}"
        )
    return max(n - init_timestep, 0) * order


def _check_finite(name: str, value, hint: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgumentError(f"{name} must be a number ({hint}), got {value!r}")
    value = float(value)
    if not np.isfinite(value) or (minimum is not None and value < minimum):
        at_least = f" >= {minimum:g}" if minimum is not None else ""
        raise InvalidArgumentError(f"{name} must be a finite number{at_least} ({hint}), got {value!r}")
    return value


def _check_side(name: str, value, folder: ModelFolder) -> None:
    """Sides must be multiples of the VAE's factor times the UNet's own down-sampling, or the
    UNet's skip connections do not line up (ONNX Runtime fails in a Concat)."""
    m = folder.size_multiple
    why = f"the VAE's factor {folder.vae_downscale} x the UNet's down-sampling {folder.unet_downscale}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be a positive multiple of {m} ({why}), got {value!r}")
    if value <= 0 or value % m:
        below, above = value // m * m, value // m * m + m
        nearest = f"{below} or {above}" if below > 0 else f"{above}"
        raise InvalidArgumentError(
            f"{name} must be a positive multiple of {m} ({why}), got {value}; nearest valid: {nearest}"
        )


def _timestep(spec, t: float, batch: int) -> np.ndarray:
    """The timestep in the rank the UNet declares: scalar, [1] or [B]."""
    value = np.float32(t)
    if np.issubdtype(spec.dtype, np.integer):
        value = np.int64(t)  # an integer-timestep export truncates, as diffusers' ONNX pipeline does
    if spec.rank == 0:
        return np.asarray(value)
    n = spec.shape[0] if isinstance(spec.shape[0], int) else batch
    return np.full((n,), value)
