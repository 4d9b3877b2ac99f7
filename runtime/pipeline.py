"""Text-to-image with numpy sampling and compiled engines: the runtime's main object.

    from edgediff.runtime import Pipeline
    pipe = Pipeline.load("sd15-onnx")
    result = pipe("a red circle on a blue background", num_inference_steps=20, seed=42)
    result.images[0].save("out.png")

Arguments mean what they mean in diffusers' StableDiffusionPipeline. A Pipeline holds no
per-call state: schedules, scheduler history and random streams are made per call, so one
object serves concurrent calls from several threads.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import schedulers
from .engine import Engine, create_engine, engine_class
from .errors import EdgediffError, InvalidArgumentError, ModelFolderError
from .image import to_pil, to_uint8
from .model_folder import ModelFolder
from .rng import Generator, make_generator
from .tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

try:
    __version__ = metadata.version("edgediff")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

# callback(step_index, timestep, latents) -> False to cancel
Callback = Callable[[int, float, np.ndarray], Any]


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
    """Short name as users type it, e.g. ``dpmpp_2m_karras``."""
    karras = sched.config.get("use_karras_sigmas")
    return sched.short_name + ("_karras" if karras else "")


class GenerationCancelled(EdgediffError):
    """The progress callback returned False."""


COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@dataclass
class GenerationResult:
    """``timings`` (seconds): tokenize, text_encoder, unet (all UNet calls), denoise (the whole
    loop), host (denoise minus UNet calls: scheduler, guidance, copies), vae_decoder, postprocess
    (to uint8 and PIL), total, and ``load_<component>`` in low-memory mode. ``unet_calls``: the
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
        self.load_times: dict[str, float] = {}  # seconds to create each engine (empty in low-memory mode)
        self.tokenizer = tokenizer
        self.engine_name = engine_name
        self.default_scheduler = schedulers.resolve(None, folder.scheduler_config)

    @classmethod
    def load(
        cls,
        folder: str | Path | None = None,
        engine: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        low_memory: bool = False,
        **engine_options,
    ) -> Pipeline:
        """Open a model folder and create one engine per component (text encoder, UNet, VAE decoder).

        ``folder=None`` loads the embedded model that ships inside the package (a tiny model of
        the shapes world, see ``edgediff.runtime.shapes``): it needs no download.

        ``engine``: ``"onnxruntime"`` (default). ``providers``: ONNX Runtime execution providers
        in priority order, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` (default CPU).
        ``low_memory``: keep no engine loaded between calls; each call loads the text encoder,
        the UNet and the VAE decoder one at a time and releases each before the next, so peak
        memory is that of the largest component (slower: every call pays the load time).
        Other keyword arguments go to the engine (ONNX Runtime: ``threads``, ``optimization``, …).
        """
        mf = ModelFolder.open(embedded_model_path() if folder is None else folder)
        tokenizer = ClipTokenizer(mf.path / "tokenizer")
        options = dict(engine_options)
        if providers is not None:
            options["providers"] = providers
        pipe = cls(mf, {}, tokenizer, engine)
        pipe._engine_options = options
        pipe.low_memory = bool(low_memory)
        pipe.load_times = {}
        if low_memory:
            engine_class(engine)  # a missing engine library fails here, not in the middle of a call
            return pipe
        try:
            for name in COMPONENTS:
                t0 = time.perf_counter()
                pipe.engines[name] = pipe._create(name)
                pipe.load_times[name] = time.perf_counter() - t0
        except BaseException:
            pipe.close()
            raise
        return pipe

    def _create(self, component: str) -> Engine:
        return create_engine(
            self.engine_name, self.folder.component_path(component), component=component, **self._engine_options
        )

    @contextmanager
    def _component(self, name: str, timings: dict[str, float]):
        """The engine for ``name``; in low-memory mode it is loaded here and released on exit."""
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

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        self.engines = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
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
    ) -> GenerationResult:
        """Generate images. Arguments as diffusers' StableDiffusionPipeline: ``eta`` reaches DDIM
        only; ``timesteps`` / ``sigmas`` give a custom schedule to schedulers that accept one
        (then ``num_inference_steps`` is ignored)."""
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidArgumentError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise InvalidArgumentError(
                    f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; give one per prompt"
                )
        if timesteps is None and sigmas is None:
            steps = _check_positive_int("num_inference_steps", num_inference_steps)
        else:
            steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        per_prompt = _check_positive_int("num_images_per_prompt", num_images_per_prompt)
        native_h, native_w = self.folder.native_size
        height = native_h if height is None else height
        width = native_w if width is None else width
        f = self.folder.vae_downscale
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % f:
                raise InvalidArgumentError(
                    f"{name} must be a positive multiple of {f} (the VAE downscale factor), got {v!r}"
                )
        guidance_scale = float(guidance_scale)
        if scheduler is None and not eta:
            sched = self.default_scheduler
        else:
            sched = schedulers.resolve(scheduler, self.folder.scheduler_config, eta=eta)
        batch = len(prompts) * per_prompt
        shape = (batch, self.folder.latent_channels, height // f, width // f)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise InvalidArgumentError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
        do_cfg = guidance_scale > 1.0

        # 2. Encode the prompt: uncond ‖ cond in one text-encoder batch
        t0 = time.perf_counter()
        ids = self.tokenizer.encode((negatives + prompts) if do_cfg else prompts)
        timings["tokenize"] = time.perf_counter() - t0
        with self._component("text_encoder", timings) as text_encoder:
            t0 = time.perf_counter()
            emb = text_encoder.run({"input_ids": ids})["last_hidden_state"].astype(np.float32)
            timings["text_encoder"] = time.perf_counter() - t0
        emb = np.repeat(emb, per_prompt, axis=0)  # each prompt's embedding n times in a row, as diffusers
        emb.flags.writeable = False  # the same array every step: GPU engines keep their device copy

        # 3. Plan the schedule (immutable, per call)
        if timesteps is None and sigmas is None:
            plan = sched.plan(steps)
        else:
            plan = sched.plan(timesteps=timesteps, sigmas=sigmas)
        state = sched.initial_state(plan)

        # 4. Starting noise, scaled by the scheduler's init_noise_sigma
        if generator is None:
            generator = make_generator(seed)
        seed = getattr(generator, "seed", seed)
        if latents is None:
            latents = generator.randn(shape).astype(np.float32)
        latents = latents * np.float32(plan.init_noise_sigma)

        # 5. Denoising loop
        unet_calls: list[float] = []
        with self._component("unet", timings) as unet:
            t0 = time.perf_counter()
            timestep_spec = unet.inputs["timestep"]
            for i, t in enumerate(plan.timesteps):
                model_in = np.concatenate([latents, latents]) if do_cfg else latents
                model_in = sched.scale_model_input(plan, i, model_in)
                feeds = {"sample": model_in, "timestep": _timestep(timestep_spec, t, model_in.shape[0]),
                         "encoder_hidden_states": emb}  # fmt: skip
                u0 = time.perf_counter()
                noise = unet.run(feeds)["out_sample"]
                unet_calls.append(time.perf_counter() - u0)
                noise = noise.astype(np.float32, copy=False)
                if do_cfg:
                    uncond, cond = np.split(noise, 2)
                    noise = uncond + np.float32(guidance_scale) * (cond - uncond)
                latents, state = sched.step(plan, i, noise, latents, state, generator)
                if callback is not None and callback(i, float(t), latents) is False:
                    raise GenerationCancelled(f"cancelled by the callback at step {i + 1} of {len(plan.timesteps)}")
            timings["denoise"] = time.perf_counter() - t0
        timings["unet"] = sum(unet_calls)
        timings["host"] = timings["denoise"] - timings["unet"]

        # 6. Decode
        with self._component("vae_decoder", timings) as vae_decoder:
            t0 = time.perf_counter()
            decoded = vae_decoder.run({"latent_sample": latents / np.float32(self.folder.vae_scaling_factor)})
            timings["vae_decoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = to_pil(to_uint8(decoded["sample"]))
        timings["postprocess"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        params = {
            "prompt": prompts[0] if isinstance(prompt, str) else prompts,
            "negative_prompt": negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "eta": eta if "eta" in sched.step_options else None,
            "timesteps": [float(t) for t in plan.timesteps] if timesteps is not None or sigmas is not None else None,
            "width": width,
            "height": height,
            "seed": seed,
            "scheduler": scheduler_label(sched),
            "scheduler_config": dict(sched.config),
            "num_images_per_prompt": per_prompt,
            "model": self.folder.path.name,
            "engine": self.engine_name,
            "edgediff_version": __version__,
        }
        return GenerationResult(images, params, timings, unet_calls)


def _timestep(spec, t: float, batch: int) -> np.ndarray:
    """The timestep in the rank the UNet declares: scalar, [1] or [B]."""
    value = np.float32(t)
    if np.issubdtype(spec.dtype, np.integer):
        value = np.int64(t)  # an integer-timestep export truncates, as diffusers' ONNX pipeline does
    if spec.rank == 0:
        return np.asarray(value)
    n = spec.shape[0] if isinstance(spec.shape[0], int) else batch
    return np.full((n,), value)
