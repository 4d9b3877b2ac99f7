"""Heun's method (2nd-order, trapezoidal predictor–corrector) on the probability-flow ODE in
σ-space (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Algorithm 1 with γ = 0), as diffusers' HeunDiscreteScheduler.

Notation:
    σ_0 … σ_{N−1}, σ_N = 0   noise levels of the N steps      x_i   sample in σ-space
    x̂_0 = D(x; σ)            denoised estimate                 d     (x − x̂_0)/σ
    predictor (Euler):   d_i = (x_i − D(x_i; σ_i))/σ_i,  x' = x_i + d_i·(σ_{i+1} − σ_i)
    corrector (Heun):    d'  = (x' − D(x'; σ_{i+1}))/σ_{i+1}
                         x_{i+1} = x_i + ½(d_i + d')·(σ_{i+1} − σ_i)
The last step (σ_N = 0) is the predictor alone, so N steps take 2N − 1 UNet calls. As in diffusers
the schedule repeats every σ and timestep but the first:
    timesteps  t_0, t_1, t_1, t_2, t_2, …, t_{N−1}, t_{N−1}          (2N − 1, one per call)
    sigmas     σ_0, σ_1, σ_1, σ_2, σ_2, …, σ_{N−1}, σ_{N−1}, 0       (2N)
Call k is a predictor when the state holds no pending step (k even for a fresh schedule) and
uses σ = sigmas[k], σ_next = sigmas[k+1]; a corrector uses σ = sigmas[k−1], σ_next = sigmas[k].
The UNet at call k sees x/sqrt(sigmas[k]²+1) and timesteps[k].

(diffusers finds the first step index by searching ``timesteps`` and takes the second match of a
duplicated value; that only matters when a pipeline starts mid-schedule without
``set_begin_index``. Here call k is simply index k.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Schedule, Scheduler
from .sigmas import karras_sigmas, sigma_family_max_steps, sigma_table, sigma_to_t, spaced_timesteps


@dataclass(frozen=True)
class HeunSchedule(Schedule):
    sigmas: np.ndarray  # float32, 2N values: σ_0, then σ_1..σ_{N−1} each twice, then 0


@dataclass(frozen=True)
class HeunState:
    """The predictor's results, held until the corrector; all None between steps."""

    prev_derivative: np.ndarray | None = None  # d_i
    dt: np.float32 | None = None  # σ_{i+1} − σ_i
    sample: np.ndarray | None = None  # x_i


class HeunDiscrete(Scheduler[HeunSchedule]):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction, sample};
    ``timestep_spacing`` in {linspace, leading, trailing}; ``use_karras_sigmas``; ``clip_sample``
    with ``clip_sample_range``; custom ``timesteps`` (not with Karras σ, as in diffusers).
    ``use_exponential_sigmas`` and ``use_beta_sigmas`` are not implemented (beta needs scipy),
    nor ``beta_schedule="exp"``. diffusers' Karras ramp also reads ``sigma_min``/``sigma_max``
    when a config happens to carry them (they are not HeunDiscreteScheduler arguments, and
    diffusers drops them when they come from a compatible class such as Euler); here the ramp
    always spans the schedule's ends, as with every config diffusers itself writes for Heun."""

    class_name = "HeunDiscreteScheduler"
    short_name = "heun"
    order = 2  # diffusers' HeunDiscreteScheduler.order
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    )  # fmt: skip
    supported = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
    }

    # diffusers' HeunDiscreteScheduler.set_timesteps takes custom timesteps, not custom sigmas.
    accepts_timesteps = True
    accepts_sigmas = False
    max_inference_steps = sigma_family_max_steps

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> HeunSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        cfg = self.config
        if timesteps is not None and cfg["use_karras_sigmas"]:
            raise InvalidArgumentError("custom timesteps cannot be combined with use_karras_sigmas (as in diffusers)")
        ac = self.alphas_cumprod
        table = sigma_table(ac)
        log_table = np.log(table)
        n = num_inference_steps if timesteps is None else len(timesteps)
        if timesteps is not None:
            timesteps = np.asarray(timesteps, dtype=np.float32)
        else:
            timesteps = spaced_timesteps(cfg, n)
            if not cfg["use_karras_sigmas"]:
                self._check_timestep_range(n, timesteps)
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = np.array([sigma_to_t(s, log_table) for s in sigmas])
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        # one entry per UNet call: every σ and t but the first (and the final 0) repeated
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]).astype(np.float32)
        s_max = sigmas.max()
        init = s_max if cfg["timestep_spacing"] in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
        return HeunSchedule(timesteps, float(init), sigmas)

    def initial_state(self, schedule: HeunSchedule) -> HeunState:
        return HeunState()

    def scale_model_input(self, schedule: HeunSchedule, i, sample):
        sigma = schedule.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def add_noise(self, schedule, original, noise, index):
        """x0 + σ·ε with σ taken by index (diffusers' begin_index rule), not by timestep value."""
        return (original + noise * schedule.sigmas[index]).astype(np.float32)

    def step(self, schedule: HeunSchedule, i, model_output, sample, state: HeunState, generator=None):
        first_order = state.dt is None
        if first_order:  # predictor
            sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        else:  # corrector
            sigma, sigma_next = schedule.sigmas[i - 1], schedule.sigmas[i]
        sigma_hat = sigma  # γ = 0 (the only value diffusers supports)
        # 1. denoised estimate x̂_0 at the σ this call's model output belongs to
        sigma_input = sigma_hat if first_order else sigma_next
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = sample - sigma_input * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma_input / (sigma_input**2 + 1) ** 0.5) + (sample / (sigma_input**2 + 1))
        else:  # sample
            x0 = model_output
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        if first_order:
            # 2. ODE derivative d_i and step σ_{i+1} − σ_i; keep them (and x_i) for the corrector
            derivative = (sample - x0) / sigma_hat
            dt = sigma_next - sigma_hat
            new_state = HeunState(derivative, dt, sample)
        else:
            # 2. average of the predictor's and the corrector's derivatives, applied from x_i
            derivative = (sample - x0) / sigma_next
            derivative = (state.prev_derivative + derivative) / 2
            dt, sample = state.dt, state.sample
            new_state = HeunState()
        return (sample + derivative * dt).astype(np.float32), new_state
