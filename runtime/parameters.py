"""Generation parameters: the record a call makes (``GenerationResult.parameters``), the two forms a
PNG carries it in, and the way back from either form to the call that made the image.

* ``edgediff`` text chunk: the record as JSON, in full (scheduler class and its whole effective
  config, custom timesteps/sigmas, model hash). ``--from-png`` reads this one.
* ``parameters`` text chunk: A1111's infotext (prompt line, ``Negative prompt:`` line, then
  ``Key: value`` pairs with A1111's sampler and schedule-type names), which other tools show and
  parse. It also carries edgediff's scheduler name and the options that differ from what that name
  gives over the model's own config, so the text alone regenerates the image with the same model.

``pipe(**call_arguments(record))`` repeats the call a record describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import schedulers
from .errors import ParametersError, UnknownSchedulerError
from .model_folder import CONFIG_SUFFIXES

TEXT_KEY = "parameters"  # A1111's chunk name
JSON_KEY = "edgediff"


# -- scheduler names -------------------------------------------------------------------------------------
# The name tables schedulers.resolve reads (not copies of them)
_short_names = schedulers._short_names


def _karras_capable(class_name: str) -> bool:
    return class_name in schedulers._KARRAS_CAPABLE


def name_spec(name: str) -> dict[str, Any]:
    """A scheduler name as ``scheduler=`` takes it -> the config dict it stands for (``_class_name`` plus the
    options the name implies), to be merged over a model's own config as ``schedulers.resolve`` does."""
    shorts, key = _short_names(), name.strip().lower()
    stem = key.removesuffix("_karras")
    if key.endswith("_karras") and stem in shorts and _karras_capable(shorts[stem][0]):
        class_name, options = shorts[stem]
        return {"_class_name": class_name, **options, "use_karras_sigmas": True}
    if key in shorts:
        class_name, options = shorts[key]
        return {"_class_name": class_name, **options}
    if name.strip() in schedulers.SCHEDULERS:
        return {"_class_name": name.strip()}
    raise UnknownSchedulerError(f"unknown scheduler {name!r}; known: {', '.join(schedulers.known_names())}")


def scheduler_name(sched: schedulers.Scheduler) -> str:
    """The short name that selects ``sched``'s class and as many of its options as a name can say
    (``dpmpp_2m_sde_karras``); the rest is ``scheduler_options``."""
    best, best_options = None, -1
    for name, (class_name, options) in _short_names().items():
        matches = class_name == sched.class_name and all(sched.config.get(k) == v for k, v in options.items())
        if matches and len(options) > best_options:
            best, best_options = name, len(options)
    if best is None:  # a Scheduler subclass that is not registered
        return sched.short_name
    return best + ("_karras" if sched.config.get("use_karras_sigmas") and _karras_capable(sched.class_name) else "")


def _effective_config(spec: dict[str, Any], base_config: dict[str, Any]) -> dict[str, Any]:
    """The config ``schedulers.resolve(spec, base_config)`` gives its scheduler, without building (or
    validating) one: the base without meta keys, the spec over it, the class's renames, its defaults."""
    cls = schedulers.SCHEDULERS[spec["_class_name"]]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config = cls.normalize_config({**config, **{k: v for k, v in spec.items() if k != "_class_name"}})
    return {k: config.get(k, v) for k, v in cls.defaults.items()}


def scheduler_options(sched: schedulers.Scheduler, base_config: dict[str, Any]) -> dict[str, Any]:
    """The options of ``sched`` that differ from what its name gives over the model's config ``base_config``:
    with the name, all that the ``parameters`` text needs to rebuild ``sched`` on the same model."""
    if sched.class_name not in schedulers.SCHEDULERS:
        return dict(sched.config)
    named = _effective_config(name_spec(scheduler_name(sched)), base_config)
    return {k: v for k, v in sched.config.items() if k not in named or named[k] != v}


# A1111's sampler names (modules/sd_samplers*.py) for each diffusers class, as diffusers' scheduler overview
# maps them; DPM-Solver++ is named from its order and variant ("DPM++ 2M SDE Heun", "DPM++ 3M SDE").
_A1111_SAMPLERS = {
    "EulerAncestralDiscreteScheduler": "Euler a", "EulerDiscreteScheduler": "Euler", "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun", "DDIMScheduler": "DDIM", "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM", "DDPMScheduler": "DDPM",
}  # fmt: skip
# The A1111 sampler names edgediff runs, in A1111's list order (what a server lists at /sdapi/v1/samplers)
A1111_SAMPLER_NAMES = ("DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "Euler a", "Euler", "LMS",
                       "Heun", "DDIM", "PLMS", "UniPC", "LCM", "DDPM")  # fmt: skip
# Samplers A1111 runs on a σ schedule (k-diffusion), where a plain spaced schedule is "Uniform".
_SIGMA_CLASSES = {"EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "LMSDiscreteScheduler",
                  "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"}  # fmt: skip
# A1111 schedule type -> diffusers option (diffusers' overview; Uniform is the plain spaced schedule)
_A1111_SCHEDULES: dict[str, dict[str, Any]] = {
    "Karras": {"use_karras_sigmas": True}, "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True}, "SGM Uniform": {"timestep_spacing": "trailing"}, "Uniform": {},
}  # fmt: skip
# What A1111's "Automatic" schedule type means for the samplers whose default is not the model's
_A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential",
                    "DPM++ 3M SDE": "Exponential"}  # fmt: skip
_DPM_NAME = re.compile(r"^DPM\+\+ ([123])M( SDE)?( Heun)?$")


def a1111_sampler(class_name: str, config: dict[str, Any]) -> str:
    """A1111's name for the sampler (``DPM++ 2M SDE``); the class name where A1111 has none."""
    if class_name == "DPMSolverMultistepScheduler":
        sde = " SDE" if config.get("algorithm_type") == "sde-dpmsolver++" else ""
        heun = " Heun" if config.get("solver_type") == "heun" else ""
        return f"DPM++ {config.get('solver_order', 2)}M{sde}{heun}"
    if class_name == "PNDMScheduler":
        return "PLMS" if config.get("skip_prk_steps") else "PNDM"
    return _A1111_SAMPLERS.get(class_name, class_name)


def a1111_schedule_type(class_name: str, config: dict[str, Any]) -> str | None:
    """A1111's schedule type (``Karras``, ``Exponential``, ``Beta``, ``SGM Uniform``, ``Uniform``), or None
    where A1111 has no name for it (Lu lambdas, or a timestep sampler's own spacing)."""
    for label, options in _A1111_SCHEDULES.items():
        if options and all(config.get(k) == v for k, v in options.items()):
            return label
    if config.get("use_lu_lambdas") or class_name not in _SIGMA_CLASSES:
        return None
    return "Uniform"


def from_a1111(sampler: str, schedule: str | None) -> tuple[str, dict[str, Any]]:
    """A1111's sampler (old combined names such as ``DPM++ 2M Karras`` too) and schedule type -> an edgediff
    name and the options it does not say. Also takes edgediff's own names (older edgediff PNGs)."""
    if sampler in schedulers.known_names():
        return sampler, {}
    base, options = sampler, dict[str, Any]()
    for label in _A1111_SCHEDULES:
        if sampler.endswith(" " + label) and schedule in (None, "Automatic"):
            base, schedule = sampler[: -len(label) - 1], label
    dpm = _DPM_NAME.match(base)
    if dpm:
        name = "dpmpp_2m_sde" if dpm.group(2) else "dpmpp_2m"
        if dpm.group(1) != "2":
            options["solver_order"] = int(dpm.group(1))
        if dpm.group(3):
            options["solver_type"] = "heun"
    elif base in ("PLMS", "PNDM"):
        name, options = "pndm", {"skip_prk_steps": base == "PLMS"}
    else:
        names = {v: k for k, v in _A1111_SAMPLERS.items()}
        if base not in names:
            raise ParametersError(f"the sampler {sampler!r} has no edgediff scheduler; known: "
                                  f"{', '.join(sorted(names) + ['DPM++ 2M', 'DPM++ 2M SDE', 'PLMS'])}")  # fmt: skip
        name = schedulers.SCHEDULERS[names[base]].short_name
    if schedule in (None, "Automatic"):
        schedule = _A1111_AUTOMATIC.get(base)
    if schedule is not None and schedule not in _A1111_SCHEDULES:
        raise ParametersError(f"the schedule type {schedule!r} has no edgediff equivalent; known: "
                              f"{', '.join(['Automatic', *_A1111_SCHEDULES])}")  # fmt: skip
    options.update(_A1111_SCHEDULES[schedule] if schedule is not None else {})
    cls = schedulers.SCHEDULERS[name_spec(name)["_class_name"]]
    unknown = [k for k in options if k not in cls.defaults]
    if unknown:
        raise ParametersError(f"the schedule type {schedule!r} has no equivalent for {base} in edgediff "
                              f"({cls.class_name} has no {', '.join(unknown)})")  # fmt: skip
    if options.pop("use_karras_sigmas", False):
        name += "_karras"
    return name, options


# -- the record ------------------------------------------------------------------------------------------
def model_hash(folder) -> str | None:
    """sha256 over the weight files' sha256 that the manifest recorded at export (cheap: nothing is re-read);
    None for a folder without recorded hashes (an optimum folder)."""
    files = folder.manifest.get("files") or {}
    lines = [f"{rel} {info.get('sha256')}\n" for rel, info in sorted(files.items())
             if not rel.endswith(CONFIG_SUFFIXES) and isinstance(info, dict)]  # fmt: skip
    return hashlib.sha256("".join(lines).encode()).hexdigest() if lines else None


def _jsonable(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(p: dict[str, Any]) -> str:
    """The record as the ``edgediff`` chunk holds it. Infinite config values (``lambda_min_clipped``) are
    written ``-Infinity``, as diffusers writes them in ``scheduler_config.json``."""
    return json.dumps(p, default=_jsonable)


# SDXL's own call arguments, recorded as given (None when not)
SDXL_KEYS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
             "negative_original_size", "negative_crops_coords_top_left", "negative_target_size")  # fmt: skip


def call_arguments(record: dict[str, Any], with_image: bool = False) -> dict[str, Any]:
    """Pipeline call arguments that repeat the call ``record`` describes: ``pipe(**call_arguments(r))``. An
    image-to-image or inpainting record needs its starting image (and mask) back: ``with_image=True`` says the
    caller adds them (``image=``, ``mask_image=``); the record's strength and keep_unmasked are then included."""
    made_from_image = record.get("init_image") or record.get("strength") is not None
    if made_from_image and not with_image:
        what = (
            "inpainting from a starting image and a mask"
            if record.get("mask")
            else "image-to-image from a starting image"
        )
        raise ParametersError(
            f"this image was made by {what} that its parameters do not hold, so it cannot be regenerated from them "
            "alone; give them again (CLI: --image, and --mask for inpainting)"
        )
    if record.get("custom_latents"):
        raise ParametersError(
            "this image was made from starting latents the caller passed in (latents=), which its parameters do not "
            "hold; it cannot be regenerated from them"
        )
    if record.get("scheduler_class") and isinstance(record.get("scheduler_config"), dict):
        scheduler = {"_class_name": record["scheduler_class"], **record["scheduler_config"]}
    elif record.get("scheduler"):
        scheduler = {**name_spec(record["scheduler"]), **(record.get("scheduler_options") or {})}
    else:
        scheduler = None
    keys = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "seed",
            "timesteps", "sigmas", "guidance_rescale", *SDXL_KEYS)  # fmt: skip
    args = {k: record[k] for k in keys if record.get(k) is not None}
    if made_from_image:
        args["strength"] = record.get("strength")
        if record.get("keep_unmasked"):
            args["keep_unmasked"] = True
    if record.get("seeds") and len(record["seeds"]) > 1:  # one seed per image: seed is only the first of them
        args.pop("seed", None)
        args["seeds"] = list(record["seeds"])
    return {**args, "scheduler": scheduler, "eta": record.get("eta") or 0.0,
            "num_images_per_prompt": record.get("num_images_per_prompt") or 1}  # fmt: skip


def recorded_loras(record: dict[str, Any], source) -> list[tuple[str, float]]:
    """The LoRAs a record was made with, as ``loras=`` takes them: each recorded file, which must still be there
    with the same contents (its hash); a record without the files (an A1111 text) names what to pass."""
    from .lora_apply import short_hash

    out = []
    for lora in record.get("loras") or []:
        name, scale, path = lora.get("name"), lora.get("scale", 1.0), lora.get("file")
        give = f"give it with --lora FILE:{_scale_text(scale)}"
        if not path or not Path(path).is_file():
            where = f" (recorded at {path}, which is gone)" if path else ""
            raise ParametersError(f"{source} was made with the LoRA {name!r} at {_scale_text(scale)}{where}; {give}")
        if lora.get("hash") and short_hash(path) != lora["hash"]:
            raise ParametersError(f"{source} was made with the LoRA {name!r} of hash {lora['hash']}; {path} now "
                                  f"holds another file (hash {short_hash(path)}); {give}")  # fmt: skip
        out.append((path, float(scale)))
    return out


def single_image_call(record: dict[str, Any], source, overrides: dict[str, Any], new_schedule: dict | None = None,
                      with_image: bool = False):  # fmt: skip
    """The call that regenerates the one image ``record`` describes, with ``overrides`` (call
    arguments the user typed) over it; ``new_schedule`` (timesteps/sigmas, possibly None) replaces
    a recorded custom schedule when the user asked for another one; ``with_image``: the user gives the starting
    image (and mask) of an image-to-image or inpainting record. Raises ParametersError for a
    batch record or one that lacks what a call needs."""
    call = call_arguments(record, with_image=with_image)
    if call.get("num_images_per_prompt", 1) != 1 or not isinstance(call.get("prompt", ""), str):
        raise ParametersError(
            f"{source} records a batch (several prompts or num_images_per_prompt > 1); generate writes one "
            "image: regenerate the batch in Python with pipe(**edgediff.runtime.parameters.call_arguments(r))"
        )
    call.update(overrides)
    if new_schedule is not None:
        call.update(new_schedule)
    missing = [k for k in ("prompt", "seed", "guidance_scale", "width", "height") if call.get(k) is None]
    if call.get("num_inference_steps") is None and call.get("timesteps") is None and call.get("sigmas") is None:
        missing.append("num_inference_steps")
    if missing:
        raise ParametersError(
            f"{source} does not record {', '.join(missing)}; give them on the command line "
            "(PROMPT, --seed, --guidance, --width, --height, --steps)"
        )
    return call


# -- the A1111 text --------------------------------------------------------------------------------------
def _quote(value) -> str:
    """A1111's infotext quoting: values holding a comma, colon or newline go in JSON quotes."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), default=_jsonable)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _scale_text(scale: float) -> str:
    return f"{scale:g}"


def format_parameters(p: dict[str, Any]) -> str:
    """The ``parameters`` text chunk other Stable Diffusion tools read (A1111's infotext): prompt line,
    optional ``Negative prompt:`` line, then ``Key: value`` pairs. For a batch, the first prompt. LoRAs are written
    as A1111 writes them: a ``<lora:name:scale>`` tag per LoRA after the prompt, and ``Lora hashes``."""
    loras = p.get("loras") or []
    tags = " ".join(f"<lora:{lora['name']}:{_scale_text(lora['scale'])}>" for lora in loras)
    lines = [" ".join(x for x in (_first(p.get("prompt")) or "", tags) if x)]
    if _first(p.get("negative_prompt")):
        lines.append(f"Negative prompt: {_first(p['negative_prompt'])}")
    class_name, config = p.get("scheduler_class"), p.get("scheduler_config")
    if p.get("scheduler") and not (class_name and isinstance(config, dict)):
        try:
            config = name_spec(p["scheduler"])
            class_name = config.pop("_class_name")
        except UnknownSchedulerError:
            class_name = None
    options = p.get("scheduler_options") or {}
    seed = p.get("seed")
    pairs = [
        ("Steps", p.get("num_inference_steps")),
        ("Sampler", a1111_sampler(class_name, config or {}) if class_name else p.get("scheduler")),
        ("Schedule type", a1111_schedule_type(class_name, config or {}) if class_name else None),
        ("CFG scale", p.get("guidance_scale")),
        ("Seed", seed),
        ("Denoising strength", p.get("strength")),  # img2img and inpainting only, as A1111 writes it
        ("Mask blur", 0 if p.get("mask") else None),  # A1111's inpainting key (edgediff does not blur the mask)
        ("Size", f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else None),
        ("Model hash", (p.get("model_hash") or "")[:10] or None),
        ("Model", p.get("model")),
        ("Eta DDIM", p.get("eta") or None),  # A1111 writes it only when not 0
        ("RNG", "CPU" if seed is not None else None),  # the seed draws as torch's CPU generator
        ("Scheduler", p.get("scheduler")),
        ("Scheduler options", " ".join(f"{k}={_compact(v)}" for k, v in options.items()) or None),
        ("Timesteps", _compact(p["timesteps"]) if p.get("timesteps") is not None else None),
        ("Sigmas", _compact(p["sigmas"]) if p.get("sigmas") is not None else None),
        ("Lora hashes", ", ".join(f"{lora['name']}: {lora['hash']}" for lora in loras) or None),
        ("Version", f"edgediff {p.get('edgediff_version', '')}".strip()),
    ]
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs if v is not None))
    return "\n".join(lines)


LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")  # A1111's <lora:name:te_scale[:unet_scale]>
INFOTEXT_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's infotext_utils
_OPTION_KEY = re.compile(r"\s*([A-Za-z_]\w*)=")


def _parse_options(text: str) -> dict[str, Any]:
    """``solver_order=3 algorithm_type="sde-dpmsolver++"``: names, each with a JSON value."""
    options, i, decoder = {}, 0, json.JSONDecoder()
    while text[i:].strip():
        m = _OPTION_KEY.match(text, i)
        if m is None:
            raise ValueError(f"expected key=value at {text[i:]!r}")
        options[m.group(1)], i = decoder.raw_decode(text, m.end())
    return options


def parse_parameters_text(text: str, where: str = "the parameters text") -> dict[str, Any]:
    """A1111's infotext -> a record (the keys edgediff writes; A1111's own sampler and schedule names map to
    edgediff's where one exists). Parsed as A1111 parses it: lines stripped, the last line of 3+ pairs."""
    *lines, last = text.strip().split("\n")
    if len(INFOTEXT_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in INFOTEXT_PAIR.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        fields[key] = value.strip()
    if not fields:
        raise ParametersError(f"{where} holds no generation parameters (no line of 'Key: value' pairs such as "
                              "'Steps: 20, Seed: 1, Size: 512x512')")  # fmt: skip
    prompt_text = "\n".join(prompt)
    tags = LORA_TAG.findall(prompt_text)
    record: dict[str, Any] = {"prompt": LORA_TAG.sub("", prompt_text).strip() if tags else prompt_text}
    if tags:  # A1111's prompt tags; the hashes, when written, by name
        hashes = dict(h.split(": ", 1) for h in fields.get("Lora hashes", "").split(", ") if ": " in h)
        try:
            record["loras"] = [{"name": name, "scale": float(scale) if scale else 1.0, "hash": hashes.get(name)}
                               for name, scale in tags]  # fmt: skip
        except ValueError:
            raise ParametersError(f"{where}: a LoRA tag's strength is not a number ({tags})") from None
    if in_negative:
        record["negative_prompt"] = "\n".join(negative)
    convert: dict[str, tuple[str, Callable[[str], Any]]] = {
        "Steps": ("num_inference_steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
        "Eta DDIM": ("eta", float), "Denoising strength": ("strength", float),
        "Scheduler options": ("scheduler_options", _parse_options),
        "Timesteps": ("timesteps", json.loads), "Sigmas": ("sigmas", json.loads), "Model": ("model", str),
        "Size": ("size", lambda v: [int(x) for x in v.split("x")]),
    }  # fmt: skip
    for key, (name, parse) in convert.items():
        if key in fields:
            try:
                record[name] = parse(fields[key])
            except (ValueError, TypeError) as e:
                raise ParametersError(f"{where}: cannot read {key}: {fields[key]!r} ({e})") from None
    if "size" in record:
        size = record.pop("size")
        if len(size) != 2:
            raise ParametersError(f"{where}: Size must be WIDTHxHEIGHT, got {fields['Size']!r}")
        record["width"], record["height"] = size
    if "Scheduler" in fields:
        record["scheduler"] = fields["Scheduler"]
    elif "Sampler" in fields:
        name, options = from_a1111(fields["Sampler"], fields.get("Schedule type"))
        record["scheduler"], record["scheduler_options"] = name, {**options, **record.get("scheduler_options", {})}
    if "Version" in fields and fields["Version"].startswith("edgediff "):
        record["edgediff_version"] = fields["Version"].removeprefix("edgediff ")
    return record


# -- reading PNGs and parameters files -------------------------------------------------------------------
def parse_record_json(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except ValueError as e:
        raise ParametersError(f"{where} is not valid JSON ({e}); regenerate the image or fix the file") from None
    if not isinstance(record, dict):
        raise ParametersError(f"{where} must hold a JSON object of generation parameters, got {type(record).__name__}")
    return record


def read_png_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The record an image carries: its ``edgediff`` JSON chunk, else its ``parameters`` text (A1111's)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            chunks = dict(getattr(im, "text", {}) or {})
            comment = im.getexif().get_ifd(0x8769).get(0x9286)  # JPEG / WebP: A1111's EXIF UserComment
    except FileNotFoundError:
        raise ParametersError(f"{path} does not exist; pass an image (PNG, JPEG, WebP) that edgediff generate "
                              "wrote") from None  # fmt: skip
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        what = f"cannot read {path} as an image ({e})"
        raise ParametersError(f"{what}; pass an image (PNG, JPEG, WebP) that edgediff generate wrote") from None
    if JSON_KEY in chunks:
        return parse_record_json(chunks[JSON_KEY], f"the {JSON_KEY!r} chunk of {path}")
    if chunks.get(TEXT_KEY, "").strip():
        return parse_parameters_text(chunks[TEXT_KEY], f"the {TEXT_KEY!r} chunk of {path}")
    if comment:
        from .image import read_user_comment

        return parse_parameters_text(read_user_comment(comment), f"the EXIF UserComment of {path}")
    raise ParametersError(
        f"{path} holds no generation parameters (no {JSON_KEY!r} or {TEXT_KEY!r} PNG text chunk, no EXIF "
        "UserComment); pass an image that edgediff generate (or another tool that records its parameters) wrote, "
        "unaltered"
    )


def read_parameters_file(path: str | os.PathLike) -> dict[str, Any]:
    """A parameters file: the JSON record (what the ``edgediff`` chunk holds) or A1111's infotext."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParametersError(f"{path} does not exist; pass a JSON parameters file or an A1111 infotext") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParametersError(f"cannot read {path} ({e}); pass a JSON parameters file or an A1111 infotext") from None
    if not text.strip():
        raise ParametersError(f"{path} is empty; pass a JSON parameters file or an A1111 infotext")
    try:
        json.loads(text)
    except ValueError:
        return parse_parameters_text(text, str(path))
    return parse_record_json(text, str(path))
