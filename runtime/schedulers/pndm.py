"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), as
diffusers' PNDMScheduler: the pseudo Runge-Kutta warm-up (PRK, ``skip_prk_steps=False``, the
class default) followed by the pseudo linear multistep method (PLMS); or, with
``skip_prk_steps=True`` (the Stable Diffusion 1.x/2.x configs), PLMS alone with a 2nd-order start.

Notation (paper eq. 9, 12 and 13):
    ᾱ_t          alphas_cumprod[t]                  r = T // N (step ratio), δ = r // 2
    e_1..e_4     the last four model outputs (newest first)
    e'           the combination of model outputs a step uses
    φ(x, e', t → t') = sqrt(ᾱ_t'/ᾱ_t)·x − (ᾱ_t' − ᾱ_t)·e' / (ᾱ_t·sqrt(1−ᾱ_t') + sqrt(ᾱ_t(1−ᾱ_t)ᾱ_t'))
PRK (eq. 13): three steps of four UNet calls, over the last four schedule timesteps; the step
from t to the next schedule timestep t' calls the UNet at t, t'+δ, t'+δ, t' and every call
restarts from the x it had at t (x_t):
    k=0: x ← φ(x_t, e_a, t → t−δ)      k=1: x ← φ(x_t, e_b, t → t'+δ)
    k=2: x ← φ(x_t, e_c, t → t')       k=3: x ← φ(x_t, e', t → t'),  e' = e_a/6 + e_b/3 + e_c/3 + e_d/6
    (e_a is kept for PLMS; diffusers' t−δ and t'+δ coincide for uniform, even step ratios)
PLMS (eq. 12): e' = (55e_1 − 59e_2 + 37e_3 − 9e_4)/24 (fewer terms while fewer are known),
x ← φ(x, e', t → t−r). Without PRK the schedule repeats its second timestep: N steps take N+1
UNet calls; the second call re-does the first interval (e' = (e_1 + e_0)/2). With PRK, N steps
(N ≥ 4) take N + 9 UNet calls. The "timesteps" t − δ of the PRK midpoints follow diffusers,
which uses r and δ whatever the spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Schedule, Scheduler


@dataclass(frozen=True)
class PNDMSchedule(Schedule):
    int_timesteps: np.ndarray
    step_ratio: int


@dataclass(frozen=True)
class PNDMState:
    ets: tuple = ()  # up to 4 past model outputs, oldest first
    cur_sample: np.ndarray | None = None  # x at the first call of a 2-call (PLMS) or 4-call (PRK) step
    counter: int = 0
    cur_model_output: np.ndarray | None = None  # PRK: running e_a/6 + e_b/3 + e_c/3


_PRK_CALLS = 12  # diffusers: pndm_order 4 → 3 Runge-Kutta steps of 4 calls


class PNDM(Scheduler[PNDMSchedule]):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction};
    ``timestep_spacing`` in {leading, linspace, trailing}; ``skip_prk_steps`` true (PLMS only,
    every Stable Diffusion config) or false (Runge-Kutta warm-up, needs num_inference_steps >= 4
    as in diffusers)."""

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
        "skip_prk_steps": (True, False),
    }

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> PNDMSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        n, big_t = num_inference_steps, self.config["num_train_timesteps"]
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            t = np.linspace(0, big_t - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n) * (big_t // n)).round().astype(np.int64) + self.config["steps_offset"]
        else:  # trailing
            t = np.round(np.arange(big_t, 0, -big_t / n))[::-1].astype(np.int64) - 1
        self._check_timestep_range(n, t)
        if self.config["skip_prk_steps"]:
            calls = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].astype(np.int64)
        else:
            if n < 4:  # diffusers fails to broadcast its PRK schedule below 4 steps
                raise InvalidArgumentError(
                    f"{self.class_name} with skip_prk_steps=False needs num_inference_steps >= 4 (got {n}), "
                    "as in diffusers; set skip_prk_steps=True for fewer steps"
                )
            half = big_t // n // 2
            prk = np.asarray(t[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1]  # per step: t, t'+δ, t'+δ, t' (3 steps, t' = next)
            calls = np.concatenate([prk, t[:-3][::-1]]).astype(np.int64)
        return PNDMSchedule(calls.astype(np.float32), 1.0, calls, big_t // n)

    def initial_state(self, schedule):
        return PNDMState()

    def step(self, schedule: PNDMSchedule, i, model_output, sample, state: PNDMState, generator=None):
        if not self.config["skip_prk_steps"] and state.counter < _PRK_CALLS:
            return self._step_prk(schedule, i, model_output, sample, state)
        t = int(schedule.int_timesteps[i])
        prev_t = t - schedule.step_ratio
        ets = state.ets
        if state.counter != 1:
            ets = (*ets[-3:], model_output)
        else:  # second call: redo the first interval
            prev_t, t = t, t + schedule.step_ratio
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

    def _step_prk(self, schedule: PNDMSchedule, i, model_output, sample, state: PNDMState):
        """Call ``counter`` of the Runge-Kutta warm-up (diffusers' ``step_prk``)."""
        counter = state.counter
        diff_to_prev = 0 if counter % 2 else schedule.step_ratio // 2
        prev_t = int(schedule.int_timesteps[i]) - diff_to_prev
        t = int(schedule.int_timesteps[counter // 4 * 4])
        ets, cur_sample, acc = state.ets, state.cur_sample, state.cur_model_output
        phase = counter % 4
        if phase == 0:
            acc = 1 / 6 * model_output
            ets = (*ets, model_output)
            cur_sample = sample
        elif phase in (1, 2):
            acc = acc + 1 / 3 * model_output
        else:
            model_output = acc + 1 / 6 * model_output
            acc = None
        prev = self._prev_sample(cur_sample, t, prev_t, model_output)
        return prev, PNDMState(ets, cur_sample, counter + 1, acc)

    def _prev_sample(self, sample, t, prev_t, e):
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config["prediction_type"] == "v_prediction":
            e = a_t**0.5 * e + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (sample_coeff * sample - (a_prev - a_t) * e / denom).astype(np.float32)
