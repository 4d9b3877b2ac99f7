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

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Schedule, Scheduler
from .sigmas import (
    exponential_sigmas,
    karras_sigmas,
    one_sigma_schedule_problems,
    sigma_family_max_steps,
    sigma_table,
    sigma_to_t,
    spaced_timesteps,
    uses_sigma_ramp,
)


@dataclass(frozen=True)
class EulerSchedule(Schedule):
    sigmas: np.ndarray  # float32, N+1 values


class EulerDiscrete(Scheduler[EulerSchedule]):
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
    max_inference_steps = sigma_family_max_steps

    @classmethod
    def class_problems(cls, config):
        return one_sigma_schedule_problems(config)

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> EulerSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        cfg = self.config
        for key in ("use_karras_sigmas", "use_exponential_sigmas"):
            if timesteps is not None and cfg[key]:
                raise InvalidArgumentError(f"custom timesteps cannot be combined with {key} (as in diffusers)")
        ac = self.alphas_cumprod
        table = sigma_table(ac)
        log_table = np.log(table)
        if sigmas is not None:  # custom σ list (its last value is the final σ)
            sigmas = np.asarray(sigmas, dtype=np.float32)
            timesteps = np.array([sigma_to_t(s, log_table) for s in sigmas[:-1]])
            return self._finish(timesteps, sigmas)
        n = num_inference_steps if timesteps is None else len(timesteps)
        if timesteps is not None:
            timesteps = np.asarray(timesteps, dtype=np.float32)
        else:
            timesteps = spaced_timesteps(cfg, n)
            if not uses_sigma_ramp(cfg):
                self._check_timestep_range(n, timesteps)
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            s_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            s_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            ramp = karras_sigmas if cfg["use_karras_sigmas"] else exponential_sigmas
            sigmas = ramp(s_min, s_max, n)
            timesteps = np.array([sigma_to_t(s, log_table) for s in sigmas])
        last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        return self._finish(timesteps, np.concatenate([sigmas, [last]]).astype(np.float32))

    def _finish(self, timesteps, sigmas) -> EulerSchedule:
        s_max = sigmas.max()
        init = s_max if self.config["timestep_spacing"] in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
        return EulerSchedule(timesteps.astype(np.float32), float(init), sigmas)

    def scale_model_input(self, schedule: EulerSchedule, i, sample):
        sigma = schedule.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def add_noise(self, schedule, original, noise, index):
        """x0 + σ·ε with σ taken by index (diffusers' begin_index rule), not by timestep value."""
        return (original + noise * schedule.sigmas[index]).astype(np.float32)

    def step(self, schedule: EulerSchedule, i, model_output, sample, state=None, generator=None):
        sigma = schedule.sigmas[i]
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
        dt = schedule.sigmas[i + 1] - sigma_hat
        return (sample + d * dt).astype(np.float32), None
