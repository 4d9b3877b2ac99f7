"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), as
diffusers' DDPMScheduler, on any sub-sequence of the training timesteps.

Notation (paper eq. 6-7 and 15; t_prev is the next timestep of the schedule, -1 after the last):
    ᾱ_t        alphas_cumprod[t]               ᾱ_prev   ᾱ[t_prev] (1 when t_prev < 0)
    α_t        ᾱ_t/ᾱ_prev                      β_t      1 − α_t   (the step's own β)
    x̂_0        predicted clean sample (eq. 15, or from v / the model output directly)
    μ̃_t       sqrt(ᾱ_prev)·β_t/(1−ᾱ_t)·x̂_0 + sqrt(α_t)·(1−ᾱ_prev)/(1−ᾱ_t)·x_t      (eq. 7)
    β̃_t       (1−ᾱ_prev)/(1−ᾱ_t)·β_t, floored at 1e-20                              (eq. 7)
    x_prev = μ̃_t + s_t·z  for t > 0, x_prev = μ̃_t at t = 0;  z ~ N(0, I)
    s_t = sqrt(β̃_t) (fixed_small), exp(½·log β̃_t) (fixed_small_log), sqrt(β_t) (fixed_large)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Schedule, Scheduler
from .sigmas import spaced_int_timesteps


@dataclass(frozen=True)
class DDPMSchedule(Schedule):
    int_timesteps: np.ndarray  # int64 schedule timesteps
    prev_timesteps: np.ndarray  # int64 t_prev of each step (-1 after the last), diffusers' previous_timestep


def _previous_timesteps(t: np.ndarray) -> np.ndarray:
    """diffusers' ``previous_timestep`` once a schedule is set: the entry after the *first*
    occurrence of t in the schedule, -1 when that occurrence is the last entry."""
    prev = np.empty_like(t)
    for i, ti in enumerate(t):
        first = int(np.flatnonzero(t == ti)[0])
        prev[i] = t[first + 1] if first + 1 < len(t) else -1
    return prev


class DDPM(Scheduler[DDPMSchedule]):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction, sample};
    ``variance_type`` in {fixed_small, fixed_small_log, fixed_large} (None acts as fixed_small, as in
    diffusers); ``timestep_spacing`` in {leading, linspace, trailing}; ``thresholding`` false.

    Not supported: ``learned`` / ``learned_range`` (need a UNet that also predicts the variance,
    2×C output channels; Stable Diffusion UNets do not), ``fixed_large_log`` (diffusers takes the
    square root of log β_t < 0 and returns NaN for every step with t > 0), ``thresholding``
    (dynamic thresholding is meant for pixel-space models). Refused because diffusers returns NaN:
    an epsilon prediction at a timestep with ᾱ_t = 0 (zero-SNR rescaling, without ``clip_sample``)."""

    class_name = "DDPMScheduler"
    short_name = "ddpm"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
        timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False,
    )  # fmt: skip
    supported = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        # None: a DPM-Solver config's value (diffusers writes it); diffusers' DDPM then falls through to fixed_small
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", None),
        "timestep_spacing": ("leading", "linspace", "trailing"),
        "thresholding": (False,),
    }

    accepts_timesteps = True
    int_timesteps = True

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> DDPMSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        if timesteps is not None:
            t = np.array(timesteps, dtype=np.float64).astype(np.int64)  # diffusers truncates fractional values
        else:
            t = spaced_int_timesteps(self.config, num_inference_steps)
            self._check_timestep_range(num_inference_steps, t)
        self._check_x0_from_epsilon(t)
        return DDPMSchedule(t.astype(np.float32), 1.0, t, _previous_timesteps(t))

    def step(self, schedule: DDPMSchedule, i, model_output, sample, state=None, generator=None):
        t, prev_t = int(schedule.int_timesteps[i]), int(schedule.prev_timesteps[i])
        # 1. ᾱ_t, ᾱ_prev and the step's own α_t, β_t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        b_t = 1 - a_t
        b_prev = 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        # 2. predicted x̂_0 (eq. 15)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            with np.errstate(divide="ignore"):  # ᾱ_t = 0 reaches here only with clip_sample, which clips ±inf
                x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
        elif kind == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        # 3. posterior mean μ̃_t (eq. 7)
        x0_coeff = (a_prev**0.5 * cur_beta) / b_t
        x_coeff = cur_alpha**0.5 * b_prev / b_t
        prev = x0_coeff * x0 + x_coeff * sample
        # 4. posterior noise, drawn only for t > 0 (as diffusers, so the noise stream matches)
        if t > 0:
            if generator is None:
                raise InvalidArgumentError("DDPM needs a generator for its per-step noise")
            noise = generator.randn(model_output.shape)
            variance = np.maximum((1 - a_prev) / (1 - a_t) * cur_beta, np.float32(1e-20))
            kind = self.config["variance_type"]
            if kind == "fixed_small_log":
                std = np.exp(0.5 * np.log(variance))
            elif kind == "fixed_large":
                std = cur_beta**0.5
            else:  # fixed_small
                std = variance**0.5
            prev = prev + std * noise
        return np.asarray(prev, dtype=np.float32), None
