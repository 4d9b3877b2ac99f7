"""Ancestral Euler sampling (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", the ancestral sampler of their Table 1 / k-diffusion's ``sample_euler_ancestral``
with η = 1), as diffusers' EulerAncestralDiscreteScheduler ("Euler a").

Each step splits the move from σ_i to σ_{i+1} into a deterministic Euler step down to σ_down and
fresh noise of standard deviation σ_up, so that σ_down² + σ_up² = σ_{i+1}² (the DDPM ancestral
variance expressed in σ-space).

Notation:
    σ_i        noise level of step i (σ_N = 0)           x_i    sample in σ-space
    D(x; σ)    denoised estimate x̂_0                      d_i    (x_i − x̂_0)/σ_i
    σ_up   = sqrt(σ_{i+1}²·(σ_i² − σ_{i+1}²)/σ_i²)
    σ_down = sqrt(σ_{i+1}² − σ_up²)
    x_{i+1} = x_i + d_i·(σ_down − σ_i) + z·σ_up,   z ~ N(0, I) from the generator, every step
The UNet sees x/sqrt(σ²+1) and the (fractional) timestep whose σ is σ_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Plan, Scheduler
from .euler import _sigma_family_max_steps, _sigma_table, _spaced_timesteps


@dataclass(frozen=True)
class EulerAncestralPlan(Plan):
    sigmas: np.ndarray  # float32, N+1 values (last 0)


class EulerAncestralDiscrete(Scheduler):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction} (diffusers raises
    NotImplementedError for ``sample``); ``timestep_spacing`` in {linspace, leading, trailing}."""

    class_name = "EulerAncestralDiscreteScheduler"
    short_name = "euler_a"
    zero_snr_floor = True
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    )  # fmt: skip
    supported = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
    }

    max_inference_steps = _sigma_family_max_steps

    def plan(self, num_inference_steps=None, timesteps=None, sigmas=None) -> EulerAncestralPlan:
        self._check_plan_args(num_inference_steps, timesteps, sigmas)
        cfg, n = self.config, num_inference_steps
        timesteps = _spaced_timesteps(cfg, n)
        self._check_timestep_range(n, timesteps)
        ac = self.alphas_cumprod
        table = _sigma_table(ac)
        sigmas = np.concatenate([np.interp(timesteps, np.arange(0, len(table)), table), [0.0]]).astype(np.float32)
        s_max = sigmas.max()
        init = s_max if cfg["timestep_spacing"] in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
        return EulerAncestralPlan(timesteps.astype(np.float32), float(init), sigmas)

    def scale_model_input(self, plan: EulerAncestralPlan, i, sample):
        sigma = plan.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def step(self, plan: EulerAncestralPlan, i, model_output, sample, state=None, generator=None):
        if generator is None:
            raise InvalidArgumentError(
                f"{self.class_name} draws fresh noise every step: pass a generator (e.g. a seed)"
            )
        sigma = plan.sigmas[i]
        sample = sample.astype(np.float32, copy=False)
        # 1. denoised estimate x̂_0 = D(x; σ)
        if self.config["prediction_type"] == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        # 2. split σ_{i+1}² into the deterministic part σ_down² and the fresh noise σ_up²
        sigma_from, sigma_to = plan.sigmas[i], plan.sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        # 3. Euler step to σ_down on the ODE derivative, then add noise (drawn even when σ_up = 0)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        noise = np.asarray(generator.randn(np.shape(model_output)), dtype=np.float32)
        return (prev + noise * sigma_up).astype(np.float32), None
