"""σ schedules and the timestep grids they are built on, shared by several schedulers.

Deliberate deviation from "copy helpers into each scheduler file" (STYLE E1), for the reason
base.py gives for the training schedule: diffusers repeats these formulas in several scheduler
classes (most marked "# Copied from ...EulerDiscreteScheduler._sigma_to_t" and the like), so each
is one formula that must stay identical in every class that uses it, and lives here once.
Per-algorithm maths stays in the algorithm's own file.

    σ_t          sqrt((1 − ᾱ_t)/ᾱ_t), the σ-space noise level of training timestep t
    Karras       σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,  ρ = 7
    exponential  σ_i = exp(log σ_max + i/(n−1)·(log σ_min − log σ_max))
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_RAMPS = ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas")


def sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t for every training timestep (float32, as the torch table diffusers builds in
    ``EulerDiscreteScheduler.__init__`` / ``set_timesteps``: ``((1 - alphas_cumprod) / alphas_cumprod) ** 0.5``)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of σ by linear interpolation in log σ over the training table, as diffusers'
    ``EulerDiscreteScheduler._sigma_to_t`` (copied unchanged into its LMS, Heun, DPM-Solver and UniPC classes)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5 (float64), as diffusers' ``EulerDiscreteScheduler._convert_to_karras``."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """σ evenly spaced in log σ from σ_max to σ_min (float64), as diffusers'
    ``EulerDiscreteScheduler._convert_to_exponential``."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def uses_sigma_ramp(config: dict) -> bool:
    """Whether σ's come from a Karras / exponential / Lu ramp rather than from the spaced timesteps (the
    ``use_*`` branches of diffusers' ``set_timesteps``)."""
    return any(config.get(k) for k in _RAMPS)


def one_sigma_schedule_problems(config: dict) -> list[str]:
    """At most one of the Karras / exponential / beta σ schedules, as the check in diffusers'
    ``EulerDiscreteScheduler.__init__`` ("Only one of `config.use_beta_sigmas`, ... can be used")."""
    chosen = [k for k in ("use_beta_sigmas", "use_exponential_sigmas", "use_karras_sigmas") if config.get(k) is True]
    return [f"only one of {chosen} can be true (as in diffusers)"] if len(chosen) > 1 else []


# -- timestep grids (timestep_spacing) ------------------------------------------------------------------------


def spaced_timesteps(config: dict, n: int) -> np.ndarray:
    """The σ-family schedulers' (Euler, Euler a, LMS, Heun) float32 timesteps for ``timestep_spacing``, as the
    ``timestep_spacing`` branch of diffusers' ``EulerDiscreteScheduler.set_timesteps``."""
    big_t, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.float32) + config["steps_offset"]
    return np.arange(big_t, 0, -big_t / n).round().astype(np.float32) - 1  # trailing


def spaced_int_timesteps(config: dict, n: int) -> np.ndarray:
    """DDIM's and DDPM's int64 timesteps (descending) for ``timestep_spacing``, as diffusers'
    ``DDIMScheduler.set_timesteps`` (and ``DDPMScheduler.set_timesteps``)."""
    big_t, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.int64) + config["steps_offset"]
    return np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1  # trailing


def multistep_timesteps(config: dict, n: int) -> np.ndarray:
    """DPM-Solver++'s and UniPC's int64 timesteps for ``timestep_spacing`` (n + 1 points, the last dropped), as
    diffusers' ``DPMSolverMultistepScheduler.set_timesteps`` (and ``UniPCMultistepScheduler.set_timesteps``)."""
    big_t = config["num_train_timesteps"]
    if config["timestep_spacing"] == "linspace":
        return np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config["timestep_spacing"] == "leading":
        ratio = big_t // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config["steps_offset"]
    return np.arange(big_t, 0, -big_t / n).round().astype(np.int64) - 1  # trailing


# -- step limits (edgediff's own: diffusers has no such check and returns NaN or noise past them) -------------
# Assigned as ``max_inference_steps`` methods: ``scheduler`` is the Scheduler instance.


def sigma_family_max_steps(scheduler: Any) -> int | None:
    """Euler, Euler a, LMS and Heun: ``linspace`` timesteps are fractional, so any number of steps gives
    distinct σ's (checked sane at 1500 steps in diffusers). ``leading`` and ``trailing`` ones are rounded
    to integers: past T steps they repeat (zero-length steps; LMS's Lagrange weights divide by zero).
    A Karras / exponential ramp only takes its ends from that schedule: fine for ``trailing``, but
    ``leading`` collapses to a single timestep past T steps (diffusers' Euler then fails on an index)."""
    cfg = scheduler.config
    if cfg["timestep_spacing"] == "linspace" or (cfg["timestep_spacing"] == "trailing" and uses_sigma_ramp(cfg)):
        return None
    return cfg["num_train_timesteps"]


def multistep_max_steps(scheduler: Any) -> int | None:
    """DPM-Solver++ and UniPC interpolate σ at integer timesteps: one repeated timestep is a step with
    h = 0, and the next multistep update divides by it (NaN in diffusers from num_inference_steps=1000 with
    linspace, an index error with leading). Their n + 1-point linspace / leading grids repeat from n = T,
    trailing from n = T + 1. Karras / Lu / exponential σ come from a ramp over the table's ends and stay
    distinct for any n (the rounded timesteps the UNet sees then repeat, as they already do in diffusers
    at 25 steps), so no limit there."""
    cfg, big_t = scheduler.config, scheduler.config["num_train_timesteps"]
    if uses_sigma_ramp(cfg):
        return None
    return big_t if cfg["timestep_spacing"] == "trailing" else big_t - 1
