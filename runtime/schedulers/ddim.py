"""DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models"), as diffusers' DDIMScheduler.

Notation (paper eq. 12):
    ᾱ_t        alphas_cumprod[t]            x_t    the current sample
    ε_θ        the model's noise estimate     x̂_0    predicted clean sample
    σ_t        η·sqrt((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev))
    x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1-ᾱ_prev-σ_t²)·ε_θ + σ_t·z
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Plan, Scheduler


def _spaced_int_timesteps(config: dict, n: int) -> np.ndarray:
    """DDIM's and DDPM's int64 schedule timesteps (descending) for ``timestep_spacing``."""
    big_t, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.int64) + config["steps_offset"]
    return np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1  # trailing


@dataclass(frozen=True)
class DDIMPlan(Plan):
    int_timesteps: np.ndarray  # int64 schedule timesteps
    step_ratio: int  # T // N: prev_t = t - step_ratio, whatever the spacing (as diffusers)


class DDIM(Scheduler):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction, sample};
    ``timestep_spacing`` in {leading, linspace, trailing}."""

    class_name = "DDIMScheduler"
    short_name = "ddim"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False,
    )  # fmt: skip
    supported = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("leading", "linspace", "trailing"),
        "thresholding": (False,),
    }

    step_options = ("eta",)

    def __init__(self, eta: float = 0.0, **config):
        super().__init__(eta=eta, **config)  # the base checks eta with the config (config_problems)
        self.eta = float(eta)
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def plan(self, num_inference_steps=None, timesteps=None, sigmas=None) -> DDIMPlan:
        self._check_plan_args(num_inference_steps, timesteps, sigmas)
        n, big_t = num_inference_steps, self.config["num_train_timesteps"]
        t = _spaced_int_timesteps(self.config, n)
        self._check_timestep_range(n, t)
        return DDIMPlan(t.astype(np.float32), 1.0, t, big_t // n)

    def step(self, plan: DDIMPlan, i, model_output, sample, state=None, generator=None):
        t = int(plan.int_timesteps[i])
        prev_t = t - plan.step_ratio
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        # 1. predicted x_0 and ε from the model output (eq. 12, "predicted x_0")
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        # 2. σ_t (eq. 16)
        variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
        std = np.float32(self.eta) * variance**0.5
        # 3. direction pointing to x_t, then x_prev (eq. 12)
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            if generator is None:
                raise InvalidArgumentError("DDIM with eta > 0 needs a generator for its per-step noise")
            prev = prev + std * generator.randn(model_output.shape)
        return prev.astype(np.float32), None
