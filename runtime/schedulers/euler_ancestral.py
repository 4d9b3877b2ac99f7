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
from .base import Schedule, Scheduler
from .sigmas import sigma_family_max_steps, sigma_table, spaced_timesteps


@dataclass(frozen=True)
class EulerAncestralSchedule(Schedule):
    sigmas: np.ndarray  # float32, N+1 values (last 0)


def _split(sigma_from: np.float32, sigma_to: np.float32) -> tuple[np.float32, np.float32]:
    """(σ_up, σ_down²) in diffusers' float32 arithmetic (σ_down² can round below 0: see ``_check_splits``)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    return sigma_up, sigma_to**2 - sigma_up**2


class EulerAncestralDiscrete(Scheduler[EulerAncestralSchedule]):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction} (diffusers raises
    NotImplementedError for ``sample``); ``timestep_spacing`` in {linspace, leading, trailing}.
    Refused because diffusers returns NaN there: a schedule with a step too steep for float32's
    σ_down (``_check_splits``; the cosine schedule at some step counts)."""

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

    max_inference_steps = sigma_family_max_steps

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> EulerAncestralSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        cfg, n = self.config, num_inference_steps
        timesteps = spaced_timesteps(cfg, n)
        self._check_timestep_range(n, timesteps)
        ac = self.alphas_cumprod
        table = sigma_table(ac)
        sigmas = np.concatenate([np.interp(timesteps, np.arange(0, len(table)), table), [0.0]]).astype(np.float32)
        self._check_splits(sigmas, n)
        s_max = sigmas.max()
        init = s_max if cfg["timestep_spacing"] in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
        return EulerAncestralSchedule(timesteps.astype(np.float32), float(init), sigmas)

    def _check_splits(self, sigmas: np.ndarray, n: int) -> None:
        """σ_down² = σ_to² − σ_up² is σ_to⁴/σ_from² in exact arithmetic, but in float32 it is a difference of two
        nearly equal numbers: once σ_to/σ_from falls below about 2^-12 (the cosine schedule's σ_max ≈ 2e4 before a
        small σ) it rounds below 0 and diffusers' sqrt returns NaN. Checked with the step's own arithmetic."""
        for i in range(n):
            _, down_sq = _split(sigmas[i], sigmas[i + 1])
            if down_sq < 0:
                cfg = self.config
                raise InvalidArgumentError(
                    f"{self.class_name}: num_inference_steps={n} with timestep_spacing={cfg['timestep_spacing']!r} "
                    f"and beta_schedule={cfg['beta_schedule']!r} steps from sigma={float(sigmas[i]):.6g} to "
                    f"{float(sigmas[i + 1]):.6g} (step {i}), too steep for float32: sigma_to^2 - sigma_up^2 rounds "
                    "below 0 and diffusers' sigma_down = sqrt(...) is NaN; use another num_inference_steps or "
                    "timestep_spacing"
                )

    def scale_model_input(self, schedule: EulerAncestralSchedule, i, sample):
        sigma = schedule.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def add_noise(self, schedule, original, noise, index):
        """x0 + σ·ε with σ taken by index (diffusers' begin_index rule), not by timestep value."""
        return (original + noise * schedule.sigmas[index]).astype(np.float32)

    def step(self, schedule: EulerAncestralSchedule, i, model_output, sample, state=None, generator=None):
        if generator is None:
            raise InvalidArgumentError(
                f"{self.class_name} draws fresh noise every step: pass a generator (e.g. a seed)"
            )
        sigma = schedule.sigmas[i]
        sample = sample.astype(np.float32, copy=False)
        # 1. denoised estimate x̂_0 = D(x; σ)
        if self.config["prediction_type"] == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        # 2. split σ_{i+1}² into the deterministic part σ_down² and the fresh noise σ_up²
        sigma_up, down_sq = _split(schedule.sigmas[i], schedule.sigmas[i + 1])
        sigma_down = down_sq**0.5
        # 3. Euler step to σ_down on the ODE derivative, then add noise (drawn even when σ_up = 0)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        noise = np.asarray(generator.randn(np.shape(model_output)), dtype=np.float32)
        return (prev + noise * sigma_up).astype(np.float32), None
