"""PNDM's pseudo linear multistep (PLMS) method (Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds"), as diffusers' PNDMScheduler with ``skip_prk_steps=True``: the
Stable Diffusion 1.x/2.x default.

Notation (paper eq. 9 and 12):
    ᾱ_t          alphas_cumprod[t]
    e_1..e_4     the last four model outputs (newest first)
    e'           the linear multistep combination of them
    x_prev = sqrt(ᾱ_prev/ᾱ_t)·x − (ᾱ_prev − ᾱ_t)·e' / (ᾱ_t·sqrt(1−ᾱ_prev) + sqrt(ᾱ_t(1−ᾱ_t)ᾱ_prev))
The schedule repeats its second timestep: N steps take N+1 UNet calls; the second call re-does
the first interval (a 2nd-order correction, eq. 12 with e' = (e_1 + e_0)/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Plan, Scheduler


@dataclass(frozen=True)
class PNDMPlan(Plan):
    int_timesteps: np.ndarray
    step_ratio: int


@dataclass(frozen=True)
class PNDMState:
    ets: tuple = ()  # up to 4 past model outputs, oldest first
    cur_sample: np.ndarray | None = None  # x at the first call, reused by the second
    counter: int = 0


class PNDM(Scheduler):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction};
    ``timestep_spacing`` in {leading, linspace, trailing}; ``skip_prk_steps`` must be true
    (the Runge-Kutta warm-up is not implemented; every Stable Diffusion config sets it)."""

    class_name = "PNDMScheduler"
    short_name = "pndm"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=0,
    )  # fmt: skip
    supported = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": ("leading", "linspace", "trailing"),
        "skip_prk_steps": (True,),
    }

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def plan(self, num_inference_steps=None, timesteps=None, sigmas=None) -> PNDMPlan:
        self._check_plan_args(num_inference_steps, timesteps, sigmas)
        n, big_t = num_inference_steps, self.config["num_train_timesteps"]
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            t = np.linspace(0, big_t - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n) * (big_t // n)).round().astype(np.int64) + self.config["steps_offset"]
        else:  # trailing
            t = np.round(np.arange(big_t, 0, -big_t / n))[::-1].astype(np.int64) - 1
        plms = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].astype(np.int64)
        return PNDMPlan(plms.astype(np.float32), 1.0, plms, big_t // n)

    def initial_state(self, plan):
        return PNDMState()

    def step(self, plan: PNDMPlan, i, model_output, sample, state: PNDMState, generator=None):
        t = int(plan.int_timesteps[i])
        prev_t = t - plan.step_ratio
        ets = state.ets
        if state.counter != 1:
            ets = (*ets[-3:], model_output)
        else:  # second call: redo the first interval
            prev_t, t = t, t + plan.step_ratio
        cur_sample = state.cur_sample
        if len(ets) == 1 and state.counter == 0:
            e = model_output
            cur_sample = sample
        elif len(ets) == 1 and state.counter == 1:
            e = (model_output + ets[-1]) / 2
            sample, cur_sample = cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        prev = self._prev_sample(sample, t, prev_t, e)
        return prev, PNDMState(ets, cur_sample, state.counter + 1)

    def _prev_sample(self, sample, t, prev_t, e):
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config["prediction_type"] == "v_prediction":
            e = a_t**0.5 * e + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (sample_coeff * sample - (a_prev - a_t) * e / denom).astype(np.float32)
