"""The ``edgediff`` command: export, generate, bench, info. Logging is configured here and only here."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from . import schedulers
from .errors import EdgediffError, InvalidArgumentError

logger = logging.getLogger("edgediff")


# exit codes (README "Exit codes"): 0 done, 1 bad input, 3 a failure while running, 130 interrupted
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 1, 3, 130


class _Group(click.Group):
    """Turns every EdgediffError into one line on stderr (no traceback) and an exit code: 1 for bad input (the
    message names it and the fix; command-line usage errors too), 3 for a failure while running (the engine failed,
    non-finite output), 130 when interrupted."""

    def invoke(self, ctx):
        from .errors import EngineRunError, NonFiniteError

        try:
            return super().invoke(ctx)
        except (EngineRunError, NonFiniteError) as e:
            logger.debug("the error in full (with its cause):", exc_info=e)
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_FAILED)
        except EdgediffError as e:
            logger.debug("the error in full (with its cause):", exc_info=e)  # shown with -v only
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.UsageError as e:  # click's own (unknown option, bad value): bad input too
            e.show()
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def main(verbose: bool) -> None:
    """edgediff: Stable Diffusion on the edge, no PyTorch at run time."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--fp16", is_flag=True, help="Write fp16 components (timestep stays fp32; VAE decoder kept fp32 if needed)."
)
@click.option("--force", is_flag=True, help="Replace OUT if it is an ONNX model folder (never SOURCE or other files).")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (14 to 20).")
@click.option(
    "--device", default="cpu", show_default=True, help="Trace and validate on this torch device (cpu, cuda)."
)
@click.option(
    "--tiny-vae",
    default=None,
    type=click.Path(path_type=Path),
    help="Also export this diffusers AutoencoderTiny folder (TAESD; taesdxl for SDXL): generate --tiny-vae.",
)
@click.option(
    "--few-step",
    type=click.Choice(["turbo", "lcm", "lcm_lora", "none"]),
    default=None,
    help="The model's kind when its configs do not say (Turbo: 1 step, guidance 0; LCM: 4 steps): its defaults.",
)
def export(source: Path, out: Path, fp16: bool, force: bool, opset: int, device: str, tiny_vae: Path | None,
           few_step: str | None) -> None:  # fmt: skip
    """Export the diffusers Stable Diffusion folder SOURCE to the ONNX model folder OUT."""
    try:
        from edgediff.export import export_model
    except ImportError as e:
        raise click.ClickException(
            f"export needs the PyTorch side ({e.name or e} is missing): pip install 'edgediff[export]'"
        ) from None
    folder = export_model(source, out, fp16=fp16, force=force, opset=opset, progress=sys.stderr.isatty(),
                          device=device, tiny_vae=tiny_vae, few_step=few_step)  # fmt: skip
    click.echo(f"exported {source} -> {folder}")


@main.command("add-tiny-vae")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("tiny_vae", type=click.Path(path_type=Path))
@click.option("--fp16", is_flag=True, help="Write fp16 tiny components (kept fp32 if fp16 misses the tolerance).")
@click.option("--force", is_flag=True, help="Replace the tiny autoencoder the folder already has.")
@click.option(
    "--device", default="cpu", show_default=True, help="Trace and validate on this torch device (cpu, cuda)."
)
def add_tiny_vae(model: Path, tiny_vae: Path, fp16: bool, force: bool, device: str) -> None:
    """Add the tiny autoencoder TINY_VAE (a diffusers AutoencoderTiny folder: madebyollin/taesd for SD 1.x/2.x,
    madebyollin/taesdxl for SDXL) to the model folder MODEL: fast final images (generate --tiny-vae) and
    previews."""
    try:
        from edgediff.export import add_tiny_vae as add
    except ImportError as e:
        raise click.ClickException(
            f"add-tiny-vae needs the PyTorch side ({e.name or e} is missing): pip install 'edgediff[export]'"
        ) from None
    add(model, tiny_vae, fp16=fp16, force=force, device=device)
    click.echo(f"added {tiny_vae} to {model} (vae_decoder_tiny, vae_encoder_tiny)")


@main.command("weights-map")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--device", default="cpu", show_default=True, help="Load the source's weights on this torch device (cpu, cuda)."
)
def weights_map(model: Path, source: Path, device: str) -> None:
    """Make the LoRA weights maps of MODEL, an ONNX folder exported without them (by an older edgediff or by
    optimum), from SOURCE, the diffusers folder it was exported from. Needed once, before --lora; new exports
    have them."""
    try:
        from edgediff.export import write_weights_maps
    except ImportError as e:
        raise click.ClickException(
            f"weights-map needs the PyTorch side ({e.name or e} is missing): pip install 'edgediff[export]'"
        ) from None
    for name, count in write_weights_maps(model, source, device=device).items():
        click.echo(f"{name}: {count} weights mapped ({model / name / 'weights_map.json'})")


_HINT_MIN_BYTES = 200 * 2**20  # UNet files above this size (every real SD model) get the hint


def _optimize_hint(pipe, providers) -> None:
    """One line on stderr when a large model runs on the CPU without `edgediff optimize`'s variants."""
    if pipe.engine_name != "onnxruntime" or (providers and providers[0] != "CPUExecutionProvider"):
        return
    if pipe.folder.component_bytes("unet") <= _HINT_MIN_BYTES:
        return
    from edgediff.engines.ort_optimize import find_variant  # the engine's own test of a usable variant

    if find_variant(pipe.folder.component_path("unet"), "unet") is None:
        click.echo(f"tip: `edgediff optimize {pipe.folder.path}` (once) makes CPU runs of this model faster and "
                   "leaner: fused flash attention, memory-mapped weights", err=True)  # fmt: skip


def _memory_limit(ctx, param, value: str):
    """--memory-limit: 'auto', 'off' or GiB -> Pipeline.load's memory_limit."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return "auto" if text == "auto" else None
    try:
        gib = float(text)
    except ValueError:
        gib = float("nan")
    if not (gib > 0 and gib != float("inf")):
        raise InvalidArgumentError(f"--memory-limit must be 'auto', 'off' or a positive number of GiB, got {value!r}")
    return int(gib * 2**30)


ENGINE_NAMES = ("onnxruntime", "openvino", "tensorrt")


def _engine_options_of(engine: str, providers, device, precision, int8: bool) -> dict:
    """The engine keyword options for the CLI's --provider / --device / --precision / --int8, refusing the ones
    that belong to another engine (by name, with the engine they belong to)."""
    if engine not in ENGINE_NAMES:
        raise InvalidArgumentError(f"--engine must be one of {', '.join(ENGINE_NAMES)}, got {engine!r}")
    options: dict = {}
    if engine == "openvino":
        if providers:
            raise InvalidArgumentError("--provider is an ONNX Runtime option; with --engine openvino choose --device "
                                       "(CPU, GPU, NPU)")  # fmt: skip
        options["device"] = device or "CPU"
        options["precision"] = precision or "f32"
    else:
        for flag, value in (("--device", device), ("--precision", precision)):
            if value is not None and not (flag == "--precision" and value == "f32" and engine == "onnxruntime"):
                hint = (
                    "ONNX Runtime runs f32; --int8 for its int8 UNet"
                    if flag == "--precision"
                    else "ONNX Runtime: --provider"
                )
                raise InvalidArgumentError(f"{flag} is an OpenVINO option: add --engine openvino ({hint})")
    if int8:
        if engine == "tensorrt":
            raise InvalidArgumentError("--int8 runs on the CPU engines (onnxruntime, openvino), not tensorrt")
        options["cpu_variant"] = "int8"
    return options


def _lora_flags(f):
    """--lora FILE[:SCALE] (repeatable) and --lora-strict, for the commands that load a pipeline."""
    f = click.option(
        "--lora-strict", is_flag=True, help="Refuse a LoRA some of whose layers match nothing (default: a warning)."
    )(f)
    return click.option(
        "--lora",
        "loras",
        multiple=True,
        metavar="FILE[:SCALE]",
        help="Apply this LoRA (.safetensors: kohya/A1111, diffusers/PEFT, LoCon) at strength SCALE (default 1); "
        "repeatable, the LoRAs add up.",
    )(f)


def _lora_list(loras) -> list[tuple[str, float]] | None:
    from .lora_apply import parse_lora_argument

    return [parse_lora_argument(text) for text in loras] or None


def _engine_flags(f):
    """--engine, --device and --precision (generate and bench)."""
    f = click.option("--precision", default=None, type=click.Choice(["f32", "bf16", "f16"]),
                     help="OpenVINO's inference precision (default f32, image-equal to diffusers; bf16 is faster on "
                     "CPUs with AVX512_BF16/AMX and changes the image: README).")(f)  # fmt: skip
    f = click.option("--device", default=None, help="OpenVINO device: CPU (default), GPU, NPU.")(f)
    return click.option("--engine", default=None, type=click.Choice(ENGINE_NAMES),
                        help="Default: onnxruntime (or, with --from-png, the recorded one).")(f)  # fmt: skip


# generate and bench take the same --memory-limit
_MEMORY_LIMIT_OPTION = click.option(
    "--memory-limit",
    default="auto",
    show_default=True,
    callback=_memory_limit,
    help="GiB a call may use (estimated before it runs), 'auto' (what is available) or 'off'.",
)


def _numbers(option: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        problem = f"{option} must be comma-separated numbers such as 999,500,100, got {text!r}"
        raise InvalidArgumentError(problem) from None


def _scheduler_options(pairs: tuple[str, ...]) -> dict:
    """--scheduler-option KEY=VALUE: VALUE as JSON (3, true, null, [1,2]), else as a string (sde-dpmsolver++)."""
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise InvalidArgumentError(f"--scheduler-option takes KEY=VALUE, e.g. solver_order=3, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


# generate's options that map to a Pipeline call argument: with --from-png, those given override the record
_CALL_OPTIONS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "eta": "eta",
    "strength": "strength",
    "prompt_2": "prompt_2",
    "negative_prompt_2": "negative_prompt_2",
    "guidance_rescale": "guidance_rescale",
}


@main.command()
@click.argument("prompt", required=False)
@click.option(
    "--model",
    "model",
    default=None,
    type=click.Path(path_type=Path),
    help="Model folder. Default: the embedded shapes model.",
)
@click.option(
    "-o",
    "--output",
    default="out.png",
    show_default=True,
    metavar="FILE|PATTERN",
    help="The image file (.png, .jpg/.jpeg, .webp), or a pattern with {i}, {seed}, {prompt}, {line}, e.g. "
    "'out/{i:03d}-{seed}.png'. Several images and no field: -000, -001, ... before the extension.",
)
@click.option(
    "-n", "--num-images", "num_images", default=None, type=int, help="Images to make (seeds seed, seed+1, ...)."
)
@click.option("--seeds", "seeds_text", default=None, metavar="S1,S2,...", help="One seed per image.")
@click.option(
    "--from-file",
    "from_file",
    default=None,
    type=click.Path(path_type=Path),
    help="Prompts, one per line ('#' comments; A1111's --prompt/--steps/... form per line; .jsonl: JSON objects), "
    "all made with one model load.",
)
@click.option("--quality", default=95, show_default=True, type=int, help="JPEG / WebP quality, 1..100.")
@click.option(
    "--threads", default=None, type=int, help="Inference threads (ONNX Runtime, OpenVINO). Default: one per core."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result (files, seeds, parameters, timings) as JSON.")
@click.option("--negative-prompt", default=None)
@click.option("--prompt-2", default=None, help="SDXL: the second text encoder's prompt. Default: PROMPT.")
@click.option("--negative-prompt-2", default=None, help="SDXL: the second text encoder's negative prompt.")
@click.option(
    "--steps", default=None, type=int, help="Default: the model's (SD, SDXL: 50; a Turbo folder: 1; LCM: 4)."
)
@click.option(
    "--guidance",
    default=None,
    type=float,
    help="Default: the model's (SD: 7.5; SDXL: 5.0; Turbo: 0; LCM: 8). 1 or less turns guidance off.",
)
@click.option("--guidance-rescale", default=0.0, show_default=True, type=float, help="diffusers' rescale_noise_cfg.")
@click.option("--width", default=None, type=int, help="Default: the model's native size.")
@click.option("--height", default=None, type=int, help="Default: the model's native size.")
@click.option(
    "--seed",
    default=None,
    type=int,
    help="Same seed, same image as diffusers with a CPU generator. Default (or -1): a random one, printed and "
    "recorded.",
)
@click.option(
    "--scheduler", default=None, help=f"One of: {', '.join(schedulers.known_names())}. Default: the model's own."
)
@click.option(
    "--scheduler-option",
    "scheduler_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="A scheduler config option over the chosen scheduler, e.g. solver_order=3 (repeatable).",
)
@click.option("--eta", default=0.0, show_default=True, type=float, help="DDIM's eta (ignored by other schedulers).")
@click.option(
    "--timesteps",
    default=None,
    metavar="T1,T2,...",
    help="Custom timesteps, descending (schedulers that accept them; replaces --steps).",
)
@click.option(
    "--sigmas",
    default=None,
    metavar="S1,S2,...",
    help="Custom sigmas, descending, the last usually 0 (schedulers that accept them; replaces --steps).",
)
@click.option(
    "--from-png",
    "from_png",
    default=None,
    type=click.Path(path_type=Path),
    help="Regenerate the image this PNG records; options given here override the recorded ones.",
)
@click.option(
    "--params",
    "params_file",
    default=None,
    type=click.Path(path_type=Path),
    help="The same from a file: the JSON record (the PNG's edgediff chunk) or an A1111 infotext.",
)
@click.option(
    "--image",
    "init_image",
    default=None,
    type=click.Path(path_type=Path),
    help="Start from this picture (image-to-image); the output has its size unless --width/--height are given.",
)
@click.option(
    "--strength",
    default=None,
    type=float,
    help="With --image: the share of the schedule that runs, in (0, 1]. Default: 0.8, with --mask 1.0 (diffusers').",
)
@click.option(
    "--mask", default=None, type=click.Path(path_type=Path), help="With --image: repaint where this mask is white."
)
@click.option(
    "--keep-unmasked",
    is_flag=True,
    help="With --mask: paste the input's own pixels back outside the mask (diffusers leaves the VAE's rendering).",
)
@click.option("--tiny-vae", is_flag=True, help="Decode (and encode --image) with the folder's tiny autoencoder.")
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime execution provider (repeatable).")
@click.option("--low-memory", is_flag=True, help="Load one component at a time and release it after use.")
@click.option(
    "--int8", is_flag=True, help="Use the int8 UNet of `edgediff optimize --int8` (faster on CPUs; changes the image)."
)
@_engine_flags
@_lora_flags
@_MEMORY_LIMIT_OPTION
@click.pass_context
def generate(ctx, prompt, model, output, num_images, seeds_text, from_file, quality, threads, as_json,
             negative_prompt, prompt_2, negative_prompt_2, steps, guidance,
             guidance_rescale, width, height, seed, scheduler,
             scheduler_option, eta, timesteps, sigmas, from_png, params_file, init_image, strength, mask,
             keep_unmasked, tiny_vae, providers, low_memory, int8, engine, device, precision, loras, lora_strict,
             memory_limit):  # fmt: skip
    """Generate images from PROMPT (or each line of --from-file) and write them with their parameters (PNG, JPEG or
    WebP, by the extension of -o).

    Exit codes: 0 done; 1 bad input (named on stderr, nothing generated); 3 a failure while generating (the engine
    failed, non-finite output); 130 interrupted (the images already written are kept, and counted).

    With --image IN.png it starts from that picture (image-to-image), and with --mask MASK.png too it repaints where
    the mask is white (inpainting).

    With --from-png IMAGE (or --params FILE) it regenerates the image recorded there (same pixels with the
    same model, engine and provider, and the LoRAs it records when their files are still where they were);
    PROMPT and the options given override the recorded values. An image made from a picture needs that picture
    again: give --image (and --mask)."""
    from . import batch, parameters
    from .pipeline import Pipeline

    typed = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    given = {name for name in ctx.params if ctx.get_parameter_source(name) in typed}
    if from_png is not None and params_file is not None:
        raise InvalidArgumentError("give --from-png or --params, not both")
    if from_file is not None and (prompt is not None or from_png is not None or params_file is not None):
        raise InvalidArgumentError("--from-file gives the prompts: leave PROMPT and --from-png / --params out")
    if threads is not None and (threads < 1 or engine == "tensorrt"):
        raise InvalidArgumentError(f"--threads must be 1 or more (ONNX Runtime, OpenVINO), got {threads}"
                                   if threads < 1 else "--threads is for the CPU engines, not tensorrt")  # fmt: skip
    if not 1 <= quality <= 100:
        raise InvalidArgumentError(f"--quality must be an integer 1..100 (JPEG / WebP), got {quality}")
    seeds = batch.parse_seeds(seeds_text)
    if seeds and from_file is not None:
        raise InvalidArgumentError("--seeds is for one prompt; with --from-file set seeds per line (--seed N)")
    jobs = batch.read_prompt_file(from_file) if from_file is not None else None
    record, source = None, from_png or params_file
    if from_png is not None:
        record = parameters.read_png_parameters(from_png)
    elif params_file is not None:
        record = parameters.read_parameters_file(params_file)
    if record is None and prompt is None and jobs is None:
        raise InvalidArgumentError("give a PROMPT, --from-file PROMPTS, or --from-png IMAGE / --params FILE to "
                                   "regenerate a recorded image")  # fmt: skip
    options = _scheduler_options(scheduler_option)
    custom = {"timesteps": _numbers("--timesteps", timesteps), "sigmas": _numbers("--sigmas", sigmas)}

    if record is None:
        call = {arg: ctx.params[name] for name, arg in _CALL_OPTIONS.items()}
        call.update(scheduler=scheduler, **custom)
    else:
        overrides = {arg: ctx.params[name] for name, arg in _CALL_OPTIONS.items() if name in given}
        if "scheduler" in given:
            overrides["scheduler"] = scheduler
        new_schedule = custom if "steps" in given or given & {"timesteps", "sigmas"} else None
        if record.get("mask") and init_image is not None and mask is None:
            raise InvalidArgumentError(f"{source} records an inpainting: give its mask with --mask too")
        call = parameters.single_image_call(record, source, overrides, new_schedule, with_image=init_image is not None)
        keep_unmasked = keep_unmasked or bool(call.pop("keep_unmasked", False))
        recorded = record.get("engine_options") or {}
        # "optimized": the option's name in records written before it became cpu_variant
        int8 = int8 or recorded.get("cpu_variant", recorded.get("optimized")) == "int8"
        if engine is None and record.get("engine") in ENGINE_NAMES:  # same engine, same pixels
            engine = record["engine"]
            device = device or recorded.get("device")
            precision = precision or recorded.get("precision")
    if tiny_vae:
        call["decoder"] = "tiny"
    if init_image is not None:
        call.update(image=init_image, mask_image=mask, keep_unmasked=keep_unmasked)
    elif mask is not None or keep_unmasked or call.get("strength") is not None:
        flag = "--mask" if mask is not None else "--keep-unmasked" if keep_unmasked else "--strength"
        raise InvalidArgumentError(f"{flag} needs --image (the picture to start from)")
    else:
        call.pop("strength", None)
    if options:  # over the chosen (or recorded) scheduler's config
        spec = call.get("scheduler")
        spec = dict(spec) if isinstance(spec, dict) else parameters.name_spec(spec) if spec else {}
        call["scheduler"] = {**spec, **options}

    lora_list = _lora_list(loras)
    if record is not None and lora_list is None and record.get("loras"):
        lora_list = parameters.recorded_loras(record, source)
    # the run's images: their prompts, options, seeds and files, all checked before the model loads
    count = num_images  # None unless -n was given
    first_seed = call.pop("seed", None)
    if jobs is None:
        jobs = [batch.Job(call.get("prompt"), count=len(seeds) if seeds else (count or 1),
                          seeds=batch.seeds_for(first_seed, seeds, count))]  # fmt: skip
    else:
        for job in jobs:
            job.count = job.options.pop("num_images", None) or count or 1
            job.seeds = batch.seeds_for(job.options.pop("seed", seed), None, job.count)
    batch.assign_files(output, jobs)
    engine = engine or "onnxruntime"
    engine_options = _engine_options_of(engine, providers, device, precision, int8)
    if threads is not None:
        engine_options["threads"] = threads
    run = _Run(as_json, sum(job.count for job in jobs))
    t0 = time.perf_counter()
    with Pipeline.load(model, engine=engine, providers=list(providers) or None, low_memory=low_memory,
                       memory_limit=memory_limit, loras=lora_list, lora_strict=lora_strict,
                       **engine_options) as pipe:  # fmt: skip
        run.load_seconds = time.perf_counter() - t0
        if options:
            class_name = call["scheduler"].get("_class_name") or pipe.folder.scheduler_config.get("_class_name")
            known = schedulers.SCHEDULERS[class_name].defaults if class_name in schedulers.SCHEDULERS else {}
            unknown = sorted(set(options) - set(known))
            if known and unknown:
                raise InvalidArgumentError(
                    f"--scheduler-option {', '.join(unknown)}: {class_name} has no such option"
                    f"{' (use --eta)' if 'eta' in unknown else ''}; its options: {', '.join(known)}"
                )
        if record is not None:
            _check_recorded_model(record, source, pipe, model_given=model is not None)
        _optimize_hint(pipe, providers)
        run.model = str(pipe.folder.path)
        try:
            for job in jobs:
                job_call = {**call, **_line_call(job)}
                for k in range(job.count):
                    run.generate(pipe, job, k, job_call, quality)
        except KeyboardInterrupt:
            run.interrupted()
            raise
    run.finish()


def _line_call(job) -> dict:
    """A prompt file line's options as call arguments (over the command line's)."""
    out = {_CALL_OPTIONS.get(k, k): v for k, v in job.options.items() if k in _CALL_OPTIONS or k == "scheduler"}
    if job.prompt is not None:
        out["prompt"] = job.prompt
    if job.options.get("scheduler_options"):  # an A1111 sampler name with its schedule (e.g. "DPM++ 2M Karras")
        from . import parameters

        out["scheduler"] = {**parameters.name_spec(out["scheduler"]), **job.options["scheduler_options"]}
    return out


class _Run:
    """One generate run's images: the progress bars, each image written as it is made, the report."""

    def __init__(self, as_json: bool, total: int):
        from tqdm import tqdm

        self.as_json, self.total = as_json, total
        self.images: list[dict] = []
        self.records: list[dict] = []
        self.load_seconds = 0.0
        self.model = ""
        self.t0 = time.perf_counter()
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="images", unit="image", disable=not tty or total < 2, position=0)
        self._tqdm = tqdm

    def generate(self, pipe, job, k: int, call: dict, quality: int) -> None:
        from .image import save_image

        total_steps = pipe.planned_calls(**call)  # the calls that actually run (img2img: the schedule's tail)
        steps = self._tqdm(total=total_steps, desc="denoising", unit="step", disable=not sys.stderr.isatty(),
                           leave=False, position=1 if self.total > 1 else 0)  # fmt: skip
        try:
            result = pipe(**call, seed=job.seeds[k], callback=lambda *a: steps.update(1))
        finally:
            steps.close()
        path = save_image(result.images[0], job.files[k], result.parameters, quality=quality)
        self.images.append({"file": str(path), "seed": result.parameters["seed"], "prompt": job.prompt,
                            "line": job.line, "timings": result.timings})  # fmt: skip
        self.records.append(result.parameters)
        self.bar.update(1)
        if not self.as_json:
            click.echo(f"wrote {path} (seed {result.parameters['seed']}, {result.timings['total']:.2f} s)")

    def report(self, interrupted: bool = False) -> dict:
        return {"files": [x["file"] for x in self.images], "seeds": [x["seed"] for x in self.images],
                "images": self.images, "parameters": self.records, "model": self.model,
                "timings": {"model_load": self.load_seconds, "total": time.perf_counter() - self.t0},
                "interrupted": interrupted}  # fmt: skip

    def interrupted(self) -> None:
        self.bar.close()
        click.echo(f"interrupted: {len(self.images)} of {self.total} images written"
                   + (f" ({', '.join(x['file'] for x in self.images)})" if self.images else ""), err=True)  # fmt: skip
        if self.as_json:
            click.echo(json.dumps(self.report(interrupted=True), default=str))

    def finish(self) -> None:
        self.bar.close()
        if self.as_json:
            click.echo(json.dumps(self.report(), default=str))


def _check_recorded_model(record, source, pipe, model_given: bool) -> None:
    """A record names the model that made it: without --model it must be the embedded one; with --model
    another model is the user's choice (noted: the image will differ)."""
    from . import parameters

    recorded_hash, here = record.get("model_hash"), parameters.model_hash(pipe.folder)
    if recorded_hash and here:
        same = recorded_hash == here
    else:
        same = record.get("model") in (None, pipe.folder.path.name)
    if same:
        return
    what = f"the model {record.get('model')!r}" + (f" (hash {recorded_hash[:10]})" if recorded_hash else "")
    if not model_given:
        raise parameters.ParametersError(f"{source} was made with {what}, not the embedded model; pass its folder "
                                         "with --model")  # fmt: skip
    click.echo(f"note: {source} was made with {what}; {pipe.folder.path} is another model, so the image will "
               "differ", err=True)  # fmt: skip


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--verify/--no-verify", default=True, help="Recompute file hashes and load every component.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_engine_flags
def info(model: Path, verify: bool, as_json: bool, engine: str | None, device, precision) -> None:
    """Show what the model folder MODEL holds and whether it can generate.

    Opening validates every config file; --verify (default) also re-hashes every file, loads the
    tokenizer and the model's scheduler, and loads every component in the engine (default ONNX Runtime;
    --engine openvino [--device GPU] checks that OpenVINO can read and compile each one)."""
    from .engine import create_engine, engine_class
    from .model_folder import ModelFolder
    from .tokenizer import ClipTokenizer

    mf = ModelFolder.open(model)
    problems = mf.verify() if verify else []
    loaded = {}
    if verify:
        try:
            ClipTokenizer(mf.path / "tokenizer").encode(["a photo of a cat"])
            schedulers.resolve(None, mf.scheduler_config).schedule(20)
        except EdgediffError as e:
            problems.append(str(e))
        engine = engine or "onnxruntime"
        try:
            engine_class(engine)  # once: a missing library is one problem, not one per component
            options = _engine_options_of(engine, (), device, precision, False)
            if engine == "openvino":
                options["shapes"] = "dynamic"  # compiled once per component, for any shape
        except EdgediffError as e:
            problems.append(str(e))
        else:
            for name in mf.components:
                try:
                    eng = create_engine(engine, mf.component_path(name), component=name, **options)
                    loaded[name] = {
                        "inputs": {k: [v.dtype.name, list(v.shape)] for k, v in eng.inputs.items()},
                        "outputs": {k: [v.dtype.name, list(v.shape)] for k, v in eng.outputs.items()},
                    }
                    eng.close()
                except EdgediffError as e:
                    problems.append(str(e))
    m = mf.manifest
    # LoRAs need each target's weights map (new exports have them; older folders: `edgediff weights-map`)
    from .lora_apply import MAP_FILE, TARGETS

    lora_ready = all((mf.component_path(c).parent / MAP_FILE).is_file() for c in TARGETS if c in mf.components)
    report = {
        "folder": str(mf.path),
        "manifest": "inferred (optimum/diffusers folder)" if mf.inferred else "edgediff.json",
        "family": m["family"],
        "unet_kind": mf.unet_kind,  # standard (txt2img, img2img, inpainting by blending) or inpainting (9-ch)
        "prediction_type": m["prediction_type"],
        "native_size": m["native_size"],
        "latent_channels": m["latent_channels"],
        "vae_downscale": m["vae_downscale"],
        "vae_scaling_factor": m["vae_scaling_factor"],
        "scheduler": mf.scheduler_config.get("_class_name"),
        "few_step": mf.few_step.get("kind") or "none",  # turbo, lcm, lcm_lora: what the call defaults follow
        "defaults": mf.call_defaults("txt2img"),
        "tiny_vae": mf.has_tiny_vae,
        "lora_ready": lora_ready,
        "components": {k: v.get("precision") for k, v in m["components"].items()},
        "schedulers_available": schedulers.known_names(),
        "size_multiple": mf.size_multiple,
        "edited_since_export": list(mf.edited),
        "valid": not problems,
        "problems": problems,
    }
    if verify:
        report["engine"] = engine
        report["io"] = loaded
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            if k == "io":
                for comp, io in v.items():
                    click.echo(f"  {comp}: in {io['inputs']} out {io['outputs']}")
            elif k not in ("problems", "edited_since_export"):
                click.echo(f"{k}: {', '.join(v) if k == 'schedulers_available' else v}")
        for rel in mf.edited:
            click.echo(f"note: {rel} was edited since export (accepted: the folder validates)")
        if not report["lora_ready"]:
            click.echo(f"note: no LoRA weights maps; make them once with `edgediff weights-map {mf.path} SOURCE` "
                       "(the diffusers folder it was exported from) before --lora")  # fmt: skip
        for p in problems:
            click.echo(f"problem: {p}")
    if problems:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--component", "components", multiple=True, help="Only these components (repeatable).")
@click.option("--no-fuse", is_flag=True, help="Skip ONNX Runtime's transformer fusions (attention, LayerNorm).")
@click.option("--force", is_flag=True, help="Redo variants that are up to date.")
@click.option(
    "--int8",
    "int8",
    is_flag=False,
    flag_value="dynamic",
    default=None,
    type=click.Choice(["dynamic", "static"]),
    help="Make the opt-in int8 UNet instead: dynamic (--int8 alone: int8 MatMuls, no data) or static (calibrated "
    "int8 convolutions and MatMuls; faster, runs the fp32 model on --calibration-prompts first).",
)
@click.option(
    "--engine",
    "engines",
    multiple=True,
    type=click.Choice(["onnxruntime", "openvino"]),
    help="With --int8 static: the engine(s) to quantise for (repeatable; default: onnxruntime, and openvino "
    "where it is installed). ONNX Runtime: QDQ int8; OpenVINO: NNCF int8.",
)
@click.option(
    "--calibration-prompts",
    default=None,
    type=click.Path(path_type=Path),
    help="With --int8 static: a text file, one prompt per line (default: 8 varied built-in prompts).",
)
@click.option("--calibration-steps", default=10, show_default=True, type=int, help="Steps per calibration image.")
@click.option(
    "--calibration-size", default=None, type=int, help="Calibration image size in px. Default: the model's native."
)
def optimize(model, components, no_fuse, force, int8, engines, calibration_prompts, calibration_steps,
             calibration_size):  # fmt: skip
    """Make CPU variants of MODEL's components: ONNX Runtime's (fused attention, saved optimised graph) or, with
    --int8, the opt-in int8 UNet (static: for ONNX Runtime and OpenVINO, calibrated on real fp32 runs)."""
    from . import calibrate

    if int8 != "static":
        for flag, given in (("--engine", engines), ("--calibration-prompts", calibration_prompts)):
            if given:
                raise InvalidArgumentError(f"{flag} belongs to --int8 static")
    prompts = calibrate.read_prompts(calibration_prompts) if calibration_prompts else list(calibrate.DEFAULT_PROMPTS)
    try:
        from edgediff.engines.ort_optimize import optimize_folder
    except ImportError as e:
        raise click.ClickException(f"optimize needs onnx and sympy ({e}): pip install 'edgediff[optimize]'") from None
    if int8 != "static":
        _echo_reports(optimize_folder(model, components or None, fuse=not no_fuse, force=force, int8=int8 or False))
        return
    if not engines:
        import importlib.util

        engines = ("onnxruntime",) + (("openvino",) if importlib.util.find_spec("openvino") else ())
    if "openvino" in engines:
        from .engine import engine_class

        engine_class("openvino")  # a missing library is named before the calibration runs
    from .pipeline import Pipeline

    info = {"prompts": len(prompts), "steps": calibration_steps, "size": calibration_size, "source": "fp32 pipeline"}
    click.echo(f"calibrating: {len(prompts)} images x {calibration_steps} steps of the fp32 pipeline ...", err=True)
    with Pipeline.load(model, memory_limit=None) as pipe:
        samples = calibrate.collect(pipe, prompts, steps=calibration_steps, size=calibration_size)
        folder = pipe.folder
    if "onnxruntime" in engines:
        reports = optimize_folder(model, components or None, fuse=not no_fuse, force=force, int8="static",
                                  calibration=samples, calibration_info=info)  # fmt: skip
        _echo_reports(reports, "onnxruntime ")
    if "openvino" in engines:
        from edgediff.engines.ov_quantize import quantize_unet

        r = quantize_unet(folder, samples, info, force=force)
        click.echo(f"openvino unet: {r['skipped']}" if "skipped" in r else
                   f"openvino unet: NNCF int8; max relative difference {r['max_relative_difference']:.1e}; "
                   f"{r['seconds']:.0f} s")  # fmt: skip


def _echo_reports(reports: dict, prefix: str = "") -> None:
    for name, r in reports.items():
        if "skipped" in r:
            click.echo(f"{prefix}{name}: {r['skipped']}")
        else:
            fusions = ", ".join(f"{k} {v}" for k, v in r["fusions"].items()) or "none"
            kind = f"int8 {r['int8_mode']}; " if r.get("int8_mode") else ""
            click.echo(f"{prefix}{name}: {kind}fusions {fusions}; max relative difference "
                       f"{r['max_relative_difference']:.1e}; {r['seconds']:.0f} s")  # fmt: skip


@main.command()
@click.argument("model", required=False, default=None, type=click.Path(path_type=Path))
@click.option("--prompt", default="a red circle on a blue background", show_default=True)
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--width", default=None, type=int, help="Default: the model's native size.")
@click.option("--height", default=None, type=int, help="Default: the model's native size.")
@click.option(
    "--batch",
    default=1,
    show_default=True,
    type=int,
    help="Images per call (the UNet sees twice as many with guidance).",
)
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--scheduler", default=None, help="Default: the model's own.")
@_engine_flags
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime execution provider (repeatable).")
@click.option("--threads", default=None, type=int, help="Intra-op threads. Default: one per core.")
@click.option("--warmup", default=1, show_default=True, type=int, help="Untimed runs after the cold first run.")
@click.option("--runs", default=3, show_default=True, type=int, help="Timed runs.")
@click.option("--low-memory", is_flag=True, help="Load one component at a time and release it after use.")
@click.option(
    "--optimization",
    default="all",
    show_default=True,
    type=click.Choice(["disable", "basic", "extended", "all"]),
    help="ONNX Runtime graph optimisation level of the exported graph (an `edgediff optimize` CPU variant, "
    "loaded where one exists, is saved at level all).",
)
@click.option("--no-prepack", is_flag=True, help="ONNX Runtime: no pre-packed weight copies (less memory, slower).")
@click.option("--int8", is_flag=True, help="The int8 UNet of `edgediff optimize --int8` (ONNX Runtime, OpenVINO).")
@_lora_flags
@_MEMORY_LIMIT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("-o", "--output", default=None, type=click.Path(path_type=Path), help="Also write the JSON report here.")
def bench(model, prompt, steps, width, height, batch, guidance, scheduler, engine, device, precision, providers,
          threads, warmup, runs, low_memory, optimization, no_prepack, int8, loras, lora_strict, memory_limit,
          as_json, output):  # fmt: skip
    """Measure load, cold start and per-stage latency of MODEL (default: the embedded model)."""
    from tqdm import tqdm

    from .bench import format_table, run_bench
    from .files import check_output_path, write_atomic

    if output is not None:
        output = check_output_path(output)  # before the benchmark runs

    engine = engine or "onnxruntime"
    options = _engine_options_of(engine, providers, device, precision, int8)
    if engine == "onnxruntime":
        options.update(optimization=optimization, prepack=not no_prepack)
    if loras:
        options.update(loras=_lora_list(loras), lora_strict=lora_strict)
    bar = tqdm(desc="bench", unit="run", disable=not sys.stderr.isatty(), leave=False)

    def progress(i, n):
        bar.total = n
        bar.update(1 if i else 0)

    report = run_bench(
        model, prompt=prompt, steps=steps, width=width, height=height, batch=batch, guidance=guidance,
        scheduler=scheduler, engine=engine, providers=list(providers) or None, threads=threads, warmup=warmup,
        runs=runs, low_memory=low_memory, memory_limit=memory_limit, engine_options=options, progress=progress,
    )  # fmt: skip
    bar.close()
    text = json.dumps(report, indent=2)
    if output is not None:
        write_atomic(output, (text + "\n").encode())
    click.echo(text if as_json else format_table(report))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--component",
    "components",
    multiple=True,
    help="Build only this component (repeatable). Default: the ones the pipeline runs.",
)
@click.option("--batch", default=1, show_default=True, type=int, help="Images per call the plans are built for.")
@click.option("--width", default=None, type=int, help="Default: the model's native size.")
@click.option("--height", default=None, type=int, help="Default: the model's native size.")
@click.option(
    "--guidance/--no-guidance",
    default=None,
    help="Text encoder and UNet take twice the batch (classifier-free guidance, guidance_scale > 1). Default: the "
    "model's (off for LCM UNets and Turbo models).",
)
@click.option("--dynamic", is_flag=True, help="Add a profile for a range of sizes and batches to each plan.")
@click.option(
    "--min-size",
    default=None,
    type=int,
    help="--dynamic: smallest side in pixels. Default: 256 (or the native size if smaller).",
)
@click.option(
    "--max-size",
    default=None,
    type=int,
    help="--dynamic: largest side in pixels. Default: 1024 (or the native size if larger).",
)
@click.option("--max-batch", default=4, show_default=True, type=int, help="--dynamic: most images per call.")
@click.option(
    "--opt-level",
    default=3,
    show_default=True,
    type=click.IntRange(0, 5),
    help="TensorRT builder optimisation level (lower builds faster).",
)
@click.option("--workspace", default=None, type=int, help="Builder workspace limit in MiB (small GPUs, Jetson).")
@click.option(
    "--timing-cache/--no-timing-cache",
    default=True,
    show_default=True,
    help="Reuse and update MODEL/engines/timing-*.cache.",
)
@click.option("--force", is_flag=True, help="Rebuild plans that are already up to date.")
@click.option("--prune", is_flag=True, help="Also delete plans built for another TensorRT version or GPU.")
@click.option("--device", default=0, show_default=True, type=int, help="CUDA device index.")
@click.option(
    "--refit",
    is_flag=True,
    help="Build refittable plans, so --lora applies LoRAs at load time without a rebuild (can run slower).",
)
def build(model, components, batch, width, height, guidance, dynamic, min_size, max_size, max_batch, opt_level,
          workspace, timing_cache, force, prune, device, refit):  # fmt: skip
    """Build fp16 TensorRT plans for the model folder MODEL on this GPU (engine="tensorrt" runs them)."""
    from edgediff.engines.tensorrt_build import build_model
    from edgediff.engines.trt_plans import ProfileOptions

    options = ProfileOptions(batch=batch, height=height, width=width, guidance=guidance, dynamic=dynamic,
                             min_size=min_size, max_size=max_size, max_batch=max_batch)  # fmt: skip
    results = build_model(
        model, components=list(components) or None, options=options, opt_level=opt_level, workspace_mib=workspace,
        timing_cache=timing_cache, force=force, prune=prune, device=device, progress=sys.stderr.isatty(),
        verbose=logger.isEnabledFor(logging.DEBUG), announce=lambda line: click.echo(line, err=True), refit=refit,
    )  # fmt: skip
    for r in results:
        took = f" in {r.seconds:.0f} s" if r.status == "built" else ""
        click.echo(f"{r.component}: {r.status}{took} -> {r.path}")


@main.command()
@click.option("--model", "models", multiple=True, type=click.Path(path_type=Path),
              help="A model folder to serve (repeatable; clients switch with sd_model_checkpoint). Default: the "
              "embedded model.")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (see --listen).")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--listen", is_flag=True, help="Bind 0.0.0.0: reachable from other machines (use --api-auth).")
@click.option("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]", help="HTTP Basic auth on every route.")
@click.option("--cors-allow-origins", default="", metavar="ORIGIN[,ORIGIN]", help="Origins allowed to call it.")
@click.option("--max-queue", default=8, show_default=True, type=int, help="Jobs that may wait behind the running one.")
@click.option("--workers", default=1, show_default=True, type=int, help="Generations at a time (they share the CPU).")
@click.option(
    "--ray", "use_ray", is_flag=True, help="Run as a Ray Serve deployment (the ray extra; RAY_ADDRESS: a cluster)."
)
@click.option("--replicas", default=1, show_default=True, type=int, help="With --ray: replicas, one pipeline each.")
@_engine_flags
@click.option("--int8", is_flag=True, help="The int8 UNet of `edgediff optimize --int8` (changes the images).")
@_lora_flags
def serve(models, host, port, listen, api_auth, cors_allow_origins, max_queue, workers, use_ray, replicas, engine,
          device, precision, int8, loras, lora_strict) -> None:  # fmt: skip
    """Serve AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, progress, interrupt, ...) on this machine, for
    the desktop plugins and client libraries that speak it. Needs the serve extra (pip install 'edgediff[serve]')."""
    try:
        import uvicorn

        from .serve import create_app
    except ImportError as e:
        raise click.ClickException(f"serve needs the serve extra ({e.name or e} is missing): pip install "
                                   "'edgediff[serve]'") from None  # fmt: skip
    if listen:
        host = "0.0.0.0"
        if not api_auth:
            click.echo("warning: --listen without --api-auth: anyone who can reach this machine can use the server",
                       err=True)  # fmt: skip
    origins = [o.strip() for o in cors_allow_origins.split(",") if o.strip()]
    engine = engine or "onnxruntime"
    engine_options = {"engine": engine, **_engine_options_of(engine, (), device, precision, int8)}
    if loras:  # every served model gets them (a LoRA that does not fit one of them is refused at start)
        engine_options.update(loras=_lora_list(loras), lora_strict=lora_strict)
    if use_ray:
        try:
            from .serve.ray_app import deploy
        except ImportError as e:
            raise click.ClickException(f"--ray needs the ray extra ({e.name or e} is missing): pip install "
                                       "'edgediff[ray]'") from None  # fmt: skip
        deploy(list(models), replicas, host=host, port=port, api_auth=api_auth, cors_origins=origins,
               max_queue=max_queue, workers=workers, **engine_options)  # fmt: skip
        click.echo(f"serving {replicas} replica(s) through Ray Serve on http://{host}:{port} (Ctrl+C stops)", err=True)
        import time

        while True:
            time.sleep(3600)
    app = create_app(list(models), api_auth=api_auth, listen=listen, cors_origins=origins, max_queue=max_queue,
                     workers=workers, **engine_options)  # fmt: skip
    click.echo(f"serving {', '.join(app.state.server.folders)} on http://{host}:{port} (Ctrl+C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    main()
