"""DPM-Solver++ multistep, orders 1-2 (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", Algorithm 2), as diffusers'
DPMSolverMultistepScheduler with ``algorithm_type="dpmsolver++"``: "DPM++ 2M" (Karras with
``use_karras_sigmas=True``).

Notation (VP space; σ here is the σ-space noise level of the step):
    α_t = 1/sqrt(σ²+1)   σ_t = σ·α_t   λ_t = log α_t − log σ_t   h = λ_t − λ_s
    D_0 = x̂_0 at s0 (newest)     D_1 = (D_0 − x̂_0(s1))/r_0,  r_0 = h_0/h
    order 1:  x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·D_0
    order 2 (midpoint): x_t = (σ_t/σ_s0)·x − α_t(e^{−h} − 1)·D_0 − ½α_t(e^{−h} − 1)·D_1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Plan, Scheduler
from .euler import _karras_sigmas, _sigma_to_t


@dataclass(frozen=True)
class DPMPlan(Plan):
    sigmas: np.ndarray  # float32, N+1 values (last 0 or σ_min)


@dataclass(frozen=True)
class DPMState:
    x0_history: tuple = ()  # last `solver_order` converted model outputs, oldest first
    lower_order_nums: int = 0


def _alpha_sigma(sigma):
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


class DPMSolverMultistep(Scheduler):
    """Allowed values: ``algorithm_type`` dpmsolver++; ``solver_order`` in {1, 2};
    ``solver_type`` in {midpoint, heun}; ``prediction_type`` in {epsilon, v_prediction, sample};
    ``timestep_spacing`` in {linspace, leading, trailing}; ``use_karras_sigmas``;
    ``final_sigmas_type`` in {zero, sigma_min}; ``lower_order_final``; ``euler_at_final``."""

    class_name = "DPMSolverMultistepScheduler"
    short_name = "dpmpp_2m"
    zero_snr_floor = True
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    )  # fmt: skip
    supported = {
        "algorithm_type": ("dpmsolver++",),
        "solver_order": (1, 2),
        "solver_type": ("midpoint", "heun"),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "thresholding": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "lambda_min_clipped": (-float("inf"),),
        "variance_type": (None,),
    }

    accepts_timesteps = True

    def plan(self, num_inference_steps=None, timesteps=None, sigmas=None) -> DPMPlan:
        self._check_plan_args(num_inference_steps, timesteps, sigmas)
        big_t, cfg = self.config["num_train_timesteps"], self.config
        if timesteps is not None and cfg["use_karras_sigmas"]:
            raise InvalidArgumentError("custom timesteps cannot be combined with use_karras_sigmas (as in diffusers)")
        n = num_inference_steps
        if timesteps is not None:
            t = np.asarray(timesteps).astype(np.int64)
        elif cfg["timestep_spacing"] == "linspace":
            t = np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            ratio = big_t // (n + 1)
            t = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
        else:  # trailing
            t = np.arange(big_t, 0, -big_t / n).round().astype(np.int64) - 1
        ac = self.alphas_cumprod
        table = ((1 - ac) / ac) ** 0.5
        log_table = np.log(table)
        if cfg["use_karras_sigmas"]:
            flipped = table[::-1]
            sigmas = _karras_sigmas(float(flipped[-1]), float(flipped[0]), n)
            t = np.array([_sigma_to_t(s, log_table) for s in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                t = t.round()
        else:
            sigmas = np.interp(t, np.arange(0, len(table)), table)
        last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        # diffusers feeds the UNet int64 timesteps here (Karras ones rounded)
        return DPMPlan(t.astype(np.int64).astype(np.float32), 1.0, sigmas)

    def initial_state(self, plan):
        return DPMState()

    def _to_x0(self, plan, i, model_output, sample):
        kind = self.config["prediction_type"]
        if kind == "sample":
            return model_output
        alpha_t, sigma_t = _alpha_sigma(plan.sigmas[i])
        if kind == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    def step(self, plan: DPMPlan, i, model_output, sample, state: DPMState, generator=None):
        cfg, n = self.config, len(plan.timesteps)
        lower_order_final = (i == n - 1) and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        lower_order_second = (i == n - 2) and cfg["lower_order_final"] and n < 15
        x0 = self._to_x0(plan, i, model_output, sample)
        history = (*state.x0_history, x0)[-cfg["solver_order"] :]
        with np.errstate(divide="ignore"):  # σ_t = 0 at the end: λ_t = +inf, e^{-h} = 0, exact
            if cfg["solver_order"] == 1 or state.lower_order_nums < 1 or lower_order_final:
                prev = self._first_order(plan, i, x0, sample)
            else:
                prev = self._second_order(plan, i, history, sample)
        nums = min(state.lower_order_nums + 1, cfg["solver_order"])
        return prev.astype(np.float32), DPMState(history, nums)

    def _first_order(self, plan, i, d0, sample):
        sigma_t, sigma_s = plan.sigmas[i + 1], plan.sigmas[i]
        alpha_t, sigma_t = _alpha_sigma(sigma_t)
        alpha_s, sigma_s = _alpha_sigma(sigma_s)
        h = (np.log(alpha_t) - np.log(sigma_t)) - (np.log(alpha_s) - np.log(sigma_s))
        return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * d0

    def _second_order(self, plan, i, history, sample):
        sigma_t, sigma_s0, sigma_s1 = plan.sigmas[i + 1], plan.sigmas[i], plan.sigmas[i - 1]
        alpha_t, sigma_t = _alpha_sigma(sigma_t)
        alpha_s0, sigma_s0 = _alpha_sigma(sigma_s0)
        alpha_s1, sigma_s1 = _alpha_sigma(sigma_s1)
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
        lambda_s0 = np.log(alpha_s0) - np.log(sigma_s0)
        lambda_s1 = np.log(alpha_s1) - np.log(sigma_s1)
        m0, m1 = history[-1], history[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        coeff = alpha_t * (np.exp(-h) - 1.0)
        if self.config["solver_type"] == "midpoint":
            return (sigma_t / sigma_s0) * sample - coeff * d0 - 0.5 * coeff * d1
        return (sigma_t / sigma_s0) * sample - coeff * d0 + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
