"""numpy ports of diffusers' schedulers, one algorithm per file, and the name resolution that
lets ``scheduler=`` take a short name, a diffusers class name, a config dict or an instance.

Configuration follows diffusers exactly: the model's own ``scheduler_config.json`` is the base;
the chosen class fills its own defaults for keys the base does not set (so
``EulerDiscreteScheduler.from_config(sd15_pndm_config)`` gets ``timestep_spacing="linspace"``).
"""

from __future__ import annotations

from typing import Any

from ..errors import UnknownSchedulerError
from .base import Schedule, Scheduler
from .ddim import DDIM
from .ddpm import DDPM
from .dpmsolver_multistep import DPMSolverMultistep
from .euler import EulerDiscrete
from .euler_ancestral import EulerAncestralDiscrete
from .heun import HeunDiscrete
from .lcm import LCM
from .lms import LMSDiscrete
from .pndm import PNDM
from .unipc_multistep import UniPCMultistep
from .validation import config_problems

# diffusers class name -> implementation (explicit, STYLE E2)
SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.class_name: cls
    for cls in (
        PNDM,
        DDIM,
        DDPM,
        LMSDiscrete,
        EulerDiscrete,
        EulerAncestralDiscrete,
        HeunDiscrete,
        DPMSolverMultistep,
        UniPCMultistep,
        LCM,
    )
}
SHORT_NAMES: dict[str, str] = {cls.short_name: name for name, cls in SCHEDULERS.items()}
# Short names that are a class plus options (the names users know from other tools).
SHORT_NAME_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}
# Short names that accept the "_karras" suffix (the classes with `use_karras_sigmas`).
_KARRAS_CAPABLE = {name for name, cls in SCHEDULERS.items() if "use_karras_sigmas" in cls.defaults}


def known_config_keys() -> set[str]:
    keys = {"eta"}
    for cls in SCHEDULERS.values():
        keys.update(cls.defaults)
    return keys


def _short_names() -> dict[str, tuple[str, dict[str, Any]]]:
    return {**{s: (c, {}) for s, c in SHORT_NAMES.items()}, **SHORT_NAME_OPTIONS}


def known_names() -> list[str]:
    """Every name ``scheduler=`` accepts, for help texts and error messages."""
    names = list(_short_names())
    names += [f"{s}_karras" for s, (c, _) in _short_names().items() if c in _KARRAS_CAPABLE]
    return names + list(SCHEDULERS)


def _unknown(what: str) -> UnknownSchedulerError:
    return UnknownSchedulerError(f"unknown scheduler {what}; known: {', '.join(known_names())}")


def apply_pipeline_corrections(config: dict[str, Any]) -> dict[str, Any]:
    """The corrections StableDiffusionPipeline makes to a model's scheduler config at load:
    ``steps_offset`` forced to 1 and ``clip_sample`` forced off (diffusers warns about both)."""
    config = dict(config)
    if config.get("steps_offset", 0) != 1:
        config["steps_offset"] = 1
    if config.get("clip_sample") is True:
        config["clip_sample"] = False
    return config


def resolve(spec: str | dict | Scheduler | None, base_config: dict[str, Any], **step_options: Any) -> Scheduler:
    """Build the scheduler a user asked for, over the model's own (corrected) config.

    ``step_options`` (e.g. ``eta``) reach only classes that take them, as diffusers' pipeline
    passes ``eta`` only to schedulers whose ``step`` accepts it."""
    if isinstance(spec, Scheduler):
        if any(k in spec.step_options for k in step_options):
            return type(spec)(**spec.config, **{k: v for k, v in step_options.items() if k in spec.step_options})
        return spec
    overrides: dict[str, Any] = {}
    if spec is None:
        class_name = base_config.get("_class_name")
    elif isinstance(spec, dict):
        overrides = {k: v for k, v in spec.items() if k != "_class_name"}
        class_name = spec.get("_class_name", base_config.get("_class_name"))
    elif isinstance(spec, str):
        name, shorts = spec.strip(), _short_names()
        stem = name.lower().removesuffix("_karras")
        if name.lower().endswith("_karras") and stem in shorts and shorts[stem][0] in _KARRAS_CAPABLE:
            class_name, options = shorts[stem]
            overrides.update(options, use_karras_sigmas=True)
        elif name.lower() in shorts:
            class_name, options = shorts[name.lower()]
            overrides.update(options)
        else:
            class_name = name
    else:
        raise UnknownSchedulerError(
            f"scheduler must be a name, a config dict or a Scheduler, got {type(spec).__name__}"
        )
    if class_name not in SCHEDULERS:
        raise _unknown(repr(class_name))
    cls = SCHEDULERS[class_name]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(overrides)
    config.update({k: v for k, v in step_options.items() if k in cls.step_options and v is not None})
    return cls(**config)


__all__ = [
    "SCHEDULERS", "SHORT_NAMES", "Schedule", "Scheduler", "apply_pipeline_corrections", "config_problems",
    "known_names", "resolve",
]  # fmt: skip
