"""What a scheduler config and a custom schedule may hold. One set of rules for every scheduler, so a
model folder's ``scheduler_config.json``, a user's ``scheduler={...}`` dict and ``Scheduler(...)``
refuse the same values in the same words.

diffusers checks almost none of these: a string ``steps_offset`` or a NaN ``beta_end`` gives a torch
traceback or, worse, NaN latents (an all-black image) with exit 0. The rules refuse what breaks the
maths, and nothing that a real model's config ships (every diffusers default passes; tests check it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeGuard

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
# Enum keys whose allowed values do not depend on the class (per-class ones live in ``Scheduler.supported``).
_ENUMS = {"timestep_spacing": TIMESTEP_SPACINGS}
# Keys checked by _schedule_problems (only when the schedule uses them) instead of a per-key rule.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
# diffusers' defaults for the training schedule, for a config whose class edgediff does not know.
_GENERIC_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         trained_betas=None)  # fmt: skip


def is_real(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def show(v: Any) -> str:
    """repr, shortened for long lists (a 1000-entry trained_betas)."""
    text = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return text if len(text) <= 60 else text[:57] + "..."


# -- per-key rules: value -> None (fine) or what is allowed ---------------------------------------
Rule = Callable[[Any], "str | None"]


def _bool(v):
    return None if isinstance(v, (bool, np.bool_)) else "true or false (a JSON boolean)"


def _int(lo: int) -> Rule:
    return lambda v: None if is_int(v) and v >= lo else f"an integer >= {lo}"


def _number(positive: bool = False, optional: bool = False, infinite: bool = False) -> Rule:
    what = f"a {'positive ' if positive else ''}{'' if infinite else 'finite '}number{' or null' if optional else ''}"

    def check(v):
        if v is None and optional:
            return None
        ok = is_real(v) and not math.isnan(v) and (infinite or math.isfinite(v)) and (not positive or v > 0)
        return None if ok else what

    return check


def _str(optional: bool = False) -> Rule:
    return lambda v: None if isinstance(v, str) or (optional and v is None) else "a string" + (" or null" * optional)


def _index_list(v):
    ok = isinstance(v, (list, tuple)) and all(is_int(i) and i >= 0 for i in v)
    return None if ok else "a list of step indices (integers >= 0)"


def _eta(v):
    # η > 1 makes σ_t² exceed 1 − ᾱ_prev: diffusers' step takes the square root of a negative number
    # (NaN) at some step of every schedule tried; η < 0 drops the noise but keeps its variance term.
    ok = is_real(v) and 0 <= v <= 1
    return None if ok else "a number in [0, 1] (DDIM's eta; above 1 its step returns NaN, as in diffusers)"


_BOOL_KEYS = (
    "clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr", "skip_prk_steps", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "lower_order_final",
    "euler_at_final", "predict_x0", "use_dynamic_shifting",
)  # fmt: skip
_STR_KEYS = (
    "timestep_spacing", "prediction_type", "algorithm_type", "solver_type", "final_sigmas_type", "interpolation_type",
    "timestep_type", "time_shift_type",
)  # fmt: skip
RULES: dict[str, Rule] = {
    **{k: _bool for k in _BOOL_KEYS},
    **{k: _str() for k in _STR_KEYS},
    "variance_type": _str(optional=True),
    "steps_offset": _int(0),
    "original_inference_steps": _int(1),
    "solver_order": _int(1),
    "clip_sample_range": _number(positive=True),
    "timestep_scaling": _number(positive=True),
    "dynamic_thresholding_ratio": _number(),
    "sample_max_value": _number(),
    "flow_shift": _number(),
    "lambda_min_clipped": _number(infinite=True),
    "sigma_min": _number(positive=True, optional=True),
    "sigma_max": _number(positive=True, optional=True),
    "shift_terminal": _number(optional=True),
    "disable_corrector": _index_list,
    "eta": _eta,
}
# Keys no rule covers on purpose: values only ``Scheduler.supported`` decides (solver_p: None only).
UNCHECKED_KEYS = ("solver_p",)


def _schedule_problems(cfg: dict) -> list[str]:
    """The training schedule: T, the betas it implies (finite, in (0, 1)) and ᾱ > 0 throughout."""
    from .base import alphas_cumprod_from_config, betas_from_config

    big_t = cfg.get("num_train_timesteps")
    if not is_int(big_t) or big_t < 2:
        return [f"num_train_timesteps={show(big_t)} must be an integer >= 2 (the model's training timesteps)"]
    trained = cfg.get("trained_betas")
    problems = []
    if trained is not None:
        what = f"a list of {big_t} numbers in (0, 1), one per training timestep (num_train_timesteps), or null"
        if not isinstance(trained, (list, tuple, np.ndarray)):
            return [f"trained_betas={show(trained)} must be {what}"]
        values = list(np.asarray(trained).ravel()) if isinstance(trained, np.ndarray) else list(trained)
        if len(values) != big_t:
            problems.append(f"trained_betas has {len(values)} values, must be {what}")
        bad = next(((i, v) for i, v in enumerate(values) if not (is_real(v) and 0 < v < 1)), None)
        if bad is not None:
            problems.append(f"trained_betas[{bad[0]}]={show(bad[1])} must be a number in (0, 1)")
        if problems:
            return problems
    else:
        schedule = cfg.get("beta_schedule")
        if schedule not in BETA_SCHEDULES:
            allowed = ", ".join(map(repr, BETA_SCHEDULES))
            return [f"beta_schedule={show(schedule)} is not supported by edgediff (supported: {allowed})"]
        if schedule != "squaredcos_cap_v2":  # the cosine schedule ignores beta_start/beta_end, as in diffusers
            start, end = cfg.get("beta_start"), cfg.get("beta_end")
            for key, v in (("beta_start", start), ("beta_end", end)):
                if not (is_real(v) and 0 < v < 1):
                    problems.append(f"{key}={show(v)} must be a number in (0, 1)")
            if not problems and is_real(start) and is_real(end) and end < start:
                problems.append(f"beta_end={end!r} is below beta_start={start!r}: betas must not decrease (swapped?)")
            if problems:
                return problems
    # the arithmetic as the schedulers do it, in float32: rounding can still reach 1 or underflow ᾱ
    betas = betas_from_config(cfg)
    bad_idx = np.flatnonzero(~((betas > 0) & (betas < 1)))
    if bad_idx.size:
        i = int(bad_idx[0])
        return [f"the training schedule gives beta[{i}]={float(betas[i])!r} (betas must be in (0, 1)); "
                "check beta_start, beta_end and trained_betas"]  # fmt: skip
    zero = np.flatnonzero(alphas_cumprod_from_config(dict(cfg, rescale_betas_zero_snr=False)) <= 0)
    if zero.size:
        return [f"the betas drive alphas_cumprod to 0 at timestep {int(zero[0])} (float32 underflow); "
                "use smaller betas or fewer num_train_timesteps"]  # fmt: skip
    return []


def _cross_problems(cfg: dict, bad: set) -> list[str]:
    """Rules between keys, once each key alone is fine."""
    problems = []
    big_t = cfg.get("num_train_timesteps")
    t_ok = is_int(big_t) and big_t >= 2
    if t_ok and "steps_offset" in cfg and "steps_offset" not in bad and cfg["steps_offset"] >= big_t:
        problems.append(f"steps_offset={cfg['steps_offset']!r} must be below num_train_timesteps={big_t}")
    orig = cfg.get("original_inference_steps")
    if t_ok and orig is not None and "original_inference_steps" not in bad and orig > big_t:
        problems.append(f"original_inference_steps={orig!r} must be at most num_train_timesteps={big_t}")
    lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
    if lo is not None and hi is not None and not {"sigma_min", "sigma_max"} & bad and lo >= hi:
        problems.append(f"sigma_min={lo!r} must be below sigma_max={hi!r}")
    return problems


def config_problems(config: dict, class_name: str | None = None) -> list[str]:
    """Every value in a scheduler config that cannot work, each naming the key, the value and what is
    allowed; empty when the config is fine.

    ``class_name`` (default: the config's ``_class_name``) selects the class whose keys are checked in
    full, its defaults filling missing keys as ``from_config`` does; keys of other classes (normal in a
    config switched between classes) get the type rules only. A class edgediff does not implement gets
    the class-independent rules. Unknown keys are not problems (the scheduler warns about them)."""
    from . import SCHEDULERS  # the registry imports every scheduler module, which import base

    if not isinstance(config, dict):
        return [f"the scheduler config must be a JSON object, got {type(config).__name__}"]
    name = config.get("_class_name") if class_name is None else class_name
    cls = SCHEDULERS.get(name) if isinstance(name, str) else None
    if cls is not None:
        config = cls.normalize_config(config)
        own = {**cls.defaults, **{k: v for k, v in config.items() if k in cls.defaults}}
        if "eta" in config and "eta" in cls.step_options:
            own["eta"] = config["eta"]
        supported = cls.supported
    else:
        own = {**_GENERIC_SCHEDULE, **{k: v for k, v in config.items() if k in RULES or k in SCHEDULE_KEYS}}
        supported = {}
    others = {k: v for k, v in config.items() if k not in own and k in RULES}
    problems, bad = _schedule_problems(own), set()
    for key, value in (*own.items(), *others.items()):
        rule = RULES.get(key)
        allowed = rule(value) if rule is not None else None
        if allowed is not None:
            problems.append(f"{key}={show(value)} must be {allowed}")
            bad.add(key)
    for key, value in own.items():
        choices = supported.get(key, _ENUMS.get(key))
        if choices is not None and key not in bad and value not in choices:
            problems.append(
                f"{key}={show(value)} is not supported by edgediff{' ' + cls.class_name if cls else ''} "
                f"(supported: {', '.join(map(repr, choices))})"
            )
            bad.add(key)
    problems += _cross_problems(own, bad)
    if cls is not None:
        problems += cls.class_problems(own)
    return problems


# -- custom schedules (``schedule(timesteps=...)`` / ``schedule(sigmas=...)``) --------------------------------
def _numbers(name: str, values) -> list[float]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise ValueError(f"custom {name} must be a list of numbers, got {show(values)}")
    values = list(np.asarray(values).ravel()) if isinstance(values, np.ndarray) else list(values)
    for i, v in enumerate(values):
        if not is_real(v) or not math.isfinite(v):
            raise ValueError(f"custom {name} must be finite numbers: {name}[{i}]={show(v)}")
    return [float(v) for v in values]


def timesteps_problem(timesteps, num_train_timesteps: int, truncated: bool) -> str | None:
    """diffusers' rules for custom timesteps (strictly descending, starting below T) plus the ones it
    misses: finite, not negative, and, where the class truncates them to integers, no repeat after that."""
    try:
        values = _numbers("timesteps", timesteps)
    except ValueError as e:
        return str(e)
    if not values:
        return "custom timesteps must not be empty"
    for i, v in enumerate(values):
        if v >= num_train_timesteps:
            return (f"custom timesteps must start below num_train_timesteps={num_train_timesteps} (as in diffusers): "
                    f"timesteps[{i}]={v:g}")  # fmt: skip
        if v < 0:
            return f"custom timesteps must not be negative: timesteps[{i}]={v:g}"
    for i in range(1, len(values)):
        if values[i] >= values[i - 1]:
            return (f"custom timesteps must be in strictly descending order (as in diffusers): "
                    f"timesteps[{i}]={values[i]:g} follows timesteps[{i - 1}]={values[i - 1]:g}")  # fmt: skip
        if truncated and int(values[i]) == int(values[i - 1]):
            a, b = values[i - 1], values[i]
            return (f"custom timesteps repeat a value once truncated to integers (as diffusers does): "
                    f"timesteps[{i - 1}]={a:g} and timesteps[{i}]={b:g} both give {int(b)}")  # fmt: skip
    return None


def sigmas_problem(sigmas) -> str | None:
    """A custom σ list: finite, >= 0 and strictly decreasing, so only the last (the final σ) may be 0;
    diffusers checks none of it (a repeated σ is a zero-length step, σ = 0 before the end divides by 0)."""
    try:
        values = _numbers("sigmas", sigmas)
    except ValueError as e:
        return str(e)
    if len(values) < 2:
        return "custom sigmas must hold at least two values (the last one is the final sigma, usually 0)"
    for i, v in enumerate(values):
        if v < 0:
            return f"custom sigmas must not be negative: sigmas[{i}]={v:g}"
    for i in range(1, len(values)):
        if values[i] >= values[i - 1]:
            return (f"custom sigmas must be strictly decreasing (only the last may be 0): "
                    f"sigmas[{i}]={values[i]:g} follows sigmas[{i - 1}]={values[i - 1]:g}")  # fmt: skip
    return None
