"""Euler's method on the probability-flow ODE in σ-space (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", Algorithm 1 with γ = 0 by default), as
diffusers' EulerDiscreteScheduler.

Notation:
    σ_i        noise level of step i (σ_N = 0 or σ_min)   x_i    sample in σ-space
    D(x; σ)    denoised estimate x̂_0                       d_i    (x_i − x̂_0)/σ̂_i
    x_{i+1} = x_i + d_i·(σ_{i+1} − σ̂_i)
The UNet sees x/sqrt(σ²+1) and the (fractional) timestep whose σ is σ_i.

σ schedules (N steps, σ_max/σ_min from the config or the ends of the interpolated schedule):
    default      σ_i = interp(t_i) over the training table (linear in σ)
    Karras       σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,  ρ = 7
    exponential  σ_i = exp(log σ_max + i/(N−1)·(log σ_min − log σ_max))   (k-diffusion)
Karras and exponential timesteps are log-σ interpolations over the table (fractional).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Plan, Scheduler


@dataclass(frozen=True)
class EulerPlan(Plan):
    sigmas: np.ndarray  # float32, N+1 values


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of σ by linear interpolation in log σ over the training table."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def _spaced_timesteps(config: dict, n: int) -> np.ndarray:
    """The σ-family schedules' (Euler, Euler a, LMS, Heun) float32 timesteps for ``timestep_spacing``."""
    big_t, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.float32) + config["steps_offset"]
    return np.arange(big_t, 0, -big_t / n).round().astype(np.float32) - 1  # trailing


def _sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) for every training timestep (float32, as diffusers' torch table)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """σ evenly spaced in log σ from σ_max to σ_min (float64, as diffusers' ``_convert_to_exponential``)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _one_sigma_schedule_problems(config: dict) -> list[str]:
    """diffusers allows at most one of the Karras / exponential / beta σ schedules."""
    chosen = [k for k in ("use_beta_sigmas", "use_exponential_sigmas", "use_karras_sigmas") if config.get(k) is True]
    return [f"only one of {chosen} can be true (as in diffusers)"] if len(chosen) > 1 else []


def _sigma_family_max_steps(self) -> int | None:
    """Euler, Euler a, LMS and Heun: ``linspace`` timesteps are fractional, so any number of steps gives
    distinct σ's (checked sane at 1500 steps in diffusers). ``leading`` and ``trailing`` ones are rounded
    to integers: past T steps they repeat (zero-length steps; LMS's Lagrange weights divide by zero).
    A Karras / exponential ramp only takes its ends from that schedule: fine for ``trailing``, but
    ``leading`` collapses to a single timestep past T steps (diffusers' Euler then fails on an index)."""
    cfg = self.config
    if cfg["timestep_spacing"] == "linspace" or (cfg["timestep_spacing"] == "trailing" and _uses_sigma_ramp(cfg)):
        return None
    return cfg["num_train_timesteps"]


def _uses_sigma_ramp(config: dict) -> bool:
    """Whether σ's come from a Karras / exponential / Lu ramp rather than from the spaced timesteps."""
    return any(config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas"))


class EulerDiscrete(Scheduler):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction, sample};
    ``timestep_spacing`` in {linspace, leading, trailing}; ``interpolation_type`` linear;
    ``use_karras_sigmas``; ``use_exponential_sigmas``; ``final_sigmas_type`` in {zero, sigma_min};
    ``timestep_type`` discrete. ``use_beta_sigmas`` needs scipy's beta quantile: not supported."""

    class_name = "EulerDiscreteScheduler"
    short_name = "euler"
    zero_snr_floor = True
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_spacing="linspace", timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )  # fmt: skip
    supported = {
        "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "interpolation_type": ("linear",),
        "use_beta_sigmas": (False,),
        "timestep_type": ("discrete",),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    accepts_timesteps = True
    accepts_sigmas = True
    max_inference_steps = _sigma_family_max_steps

    @classmethod
    def class_problems(cls, config):
        return _one_sigma_schedule_problems(config)

    def plan(self, num_inference_steps=None, timesteps=None, sigmas=None) -> EulerPlan:
        self._check_plan_args(num_inference_steps, timesteps, sigmas)
        cfg = self.config
        for key in ("use_karras_sigmas", "use_exponential_sigmas"):
            if timesteps is not None and cfg[key]:
                raise InvalidArgumentError(f"custom timesteps cannot be combined with {key} (as in diffusers)")
        ac = self.alphas_cumprod
        table = _sigma_table(ac)
        log_table = np.log(table)
        if sigmas is not None:  # custom σ list (its last value is the final σ)
            sigmas = np.asarray(sigmas, dtype=np.float32)
            timesteps = np.array([_sigma_to_t(s, log_table) for s in sigmas[:-1]])
            return self._finish(timesteps, sigmas)
        n = num_inference_steps if timesteps is None else len(timesteps)
        if timesteps is not None:
            timesteps = np.asarray(timesteps, dtype=np.float32)
        else:
            timesteps = _spaced_timesteps(cfg, n)
            if not _uses_sigma_ramp(cfg):
                self._check_timestep_range(n, timesteps)
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            s_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            s_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            ramp = _karras_sigmas if cfg["use_karras_sigmas"] else _exponential_sigmas
            sigmas = ramp(s_min, s_max, n)
            timesteps = np.array([_sigma_to_t(s, log_table) for s in sigmas])
        last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        return self._finish(timesteps, np.concatenate([sigmas, [last]]).astype(np.float32))

    def _finish(self, timesteps, sigmas) -> EulerPlan:
        s_max = sigmas.max()
        init = s_max if self.config["timestep_spacing"] in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
        return EulerPlan(timesteps.astype(np.float32), float(init), sigmas)

    def scale_model_input(self, plan: EulerPlan, i, sample):
        sigma = plan.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def step(self, plan: EulerPlan, i, model_output, sample, state=None, generator=None):
        sigma = plan.sigmas[i]
        sigma_hat = sigma  # γ = 0 (s_churn = 0, diffusers' default)
        # 1. denoised estimate x̂_0 = D(x; σ)
        kind = self.config["prediction_type"]
        if kind in ("sample", "original_sample"):
            x0 = model_output
        elif kind == "epsilon":
            x0 = sample - sigma_hat * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        # 2. ODE derivative and Euler step (Algorithm 1, lines 7-8)
        d = (sample - x0) / sigma_hat
        dt = plan.sigmas[i + 1] - sigma_hat
        return (sample + d * dt).astype(np.float32), None
