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
from .base import Schedule, Scheduler
from .sigmas import spaced_int_timesteps


@dataclass(frozen=True)
class DDIMSchedule(Schedule):
    int_timesteps: np.ndarray  # int64 schedule timesteps
    step_ratio: int  # T // N: prev_t = t - step_ratio, whatever the spacing (as diffusers)


class DDIM(Scheduler[DDIMSchedule]):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction, sample};
    ``timestep_spacing`` in {leading, linspace, trailing}. Refused because diffusers returns NaN
    there: an epsilon prediction at a timestep with ᾱ_t = 0 (zero-SNR rescaling, without
    ``clip_sample``) and η = 1 where 1 − ᾱ_prev − σ_t² is within rounding of 0 (``_check_direction``)."""

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

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> DDIMSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        n, big_t = num_inference_steps, self.config["num_train_timesteps"]
        t = spaced_int_timesteps(self.config, n)
        self._check_timestep_range(n, t)
        schedule = DDIMSchedule(t.astype(np.float32), 1.0, t, big_t // n)
        self._check_x0_from_epsilon(t)
        self._check_direction(schedule)
        return schedule

    def _coefficients(self, schedule: DDIMSchedule, i: int):
        """(ᾱ_t, ᾱ_prev, 1 − ᾱ_t, σ_t, 1 − ᾱ_prev − σ_t²) of step i, in diffusers' float32 arithmetic."""
        t = int(schedule.int_timesteps[i])
        prev_t = t - schedule.step_ratio
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)  # σ_t² / η² (eq. 16)
        std = np.float32(self.eta) * variance**0.5
        return a_t, a_prev, b_t, std, 1 - a_prev - std**2

    def _check_direction(self, schedule: DDIMSchedule) -> None:
        """1 − ᾱ_prev − σ_t² = (1 − ᾱ_prev)·(1 − η²·(1 − ᾱ_t/ᾱ_prev)/(1 − ᾱ_t)) ≥ 0, but at η = 1 and ᾱ_t ≈ 0 (the
        zero-SNR last timestep, the cosine schedule's ᾱ_999 = 2.4e-9) it is within float32 rounding of 0, and
        diffusers takes the square root of whatever its rounding gives: NaN where that is negative (one ulp off in
        torch's scalar sqrt decides; swept: tests/tools/scheduler_nan_sweep.py), noise of ~2e-4·ε where not. Such
        steps cannot be reproduced, so they are refused: exact value (float64, from the float32 ᾱ) below 8 float32
        ulps of 1 − ᾱ_prev."""
        if self.eta == 0:
            return
        eta_sq = np.float64(self.eta) ** 2
        for i in range(len(schedule.int_timesteps)):
            a_t, a_prev = (np.float64(a) for a in self._coefficients(schedule, i)[:2])
            room = 1 - a_prev
            exact = room - eta_sq * room / (1 - a_t) * (1 - a_t / a_prev)
            if room > 0 and exact < 2.0**-21 * room:
                n, t = len(schedule.int_timesteps), int(schedule.int_timesteps[i])
                raise InvalidArgumentError(
                    f"{self.class_name}: eta={self.eta:g} with num_inference_steps={n} leaves 1 - alpha_prev - "
                    f"sigma_t^2 within float32 rounding of 0 at step {i} (timestep {t}, alphas_cumprod "
                    f"{float(a_t):.3g}): diffusers takes its square root, NaN or noise by one ulp of rounding; "
                    "use eta <= 0.99"
                )

    def step(self, schedule: DDIMSchedule, i, model_output, sample, state=None, generator=None):
        a_t, a_prev, b_t, std, direction_sq = self._coefficients(schedule, i)
        # 1. predicted x_0 and ε from the model output (eq. 12, "predicted x_0")
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            with np.errstate(divide="ignore"):  # ᾱ_t = 0 reaches here only with clip_sample, which clips ±inf
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
        # 2. direction pointing to x_t (σ_t from eq. 16 in _coefficients), then x_prev (eq. 12)
        prev = a_prev**0.5 * x0 + direction_sq**0.5 * eps
        if self.eta > 0:
            if generator is None:
                raise InvalidArgumentError("DDIM with eta > 0 needs a generator for its per-step noise")
            prev = prev + std * generator.randn(model_output.shape)
        return prev.astype(np.float32), None
