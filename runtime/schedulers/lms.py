"""Linear multistep (Adams–Bashforth) on the probability-flow ODE in σ-space, as diffusers'
LMSDiscreteScheduler ("LMS"; Karras et al. 2022 / k-diffusion ``sample_lms``).

Notation:
    σ_i        noise level of step i (σ_N = 0)           x_i    sample in σ-space
    x̂_0        denoised estimate D(x_i; σ_i)               d_i    (x_i − x̂_0)/σ_i
    r          order of step i: min(i + 1, 4)
    ℓ_j(τ)     Lagrange basis over the nodes σ_i, σ_{i−1}, …, σ_{i−r+1}:
               ℓ_j(τ) = Π_{k≠j} (τ − σ_{i−k}) / (σ_{i−j} − σ_{i−k})
    c_j        ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ
    x_{i+1} = x_i + Σ_{j<r} c_j · d_{i−j}
The UNet sees x/sqrt(σ²+1) and the (fractional) timestep whose σ is σ_i.

The solver order is 4: diffusers' ``step(..., order=4)`` default, which its pipelines never
override, so it is a constant here (LMS_ORDER), not a config option.

The coefficients depend only on the schedule, so they are computed once in ``schedule``. diffusers
integrates ℓ_j numerically (scipy.integrate.quad, epsrel=1e-4); ℓ_j is a polynomial of degree
r − 1 ≤ 3, so here it is built and integrated exactly with numpy.polynomial. quad's Gauss–Kronrod
rule is itself exact on such a polynomial, so the two agree up to float rounding (diffusers
evaluates the integrand in float32; the coefficient is rounded to float32 when it multiplies d in
either case).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import Polynomial

from .base import Schedule, Scheduler
from .sigmas import karras_sigmas, sigma_family_max_steps, sigma_table, sigma_to_t, spaced_timesteps

LMS_ORDER = 4  # diffusers' LMSDiscreteScheduler.step(order=4) default


@dataclass(frozen=True)
class LMSSchedule(Schedule):
    sigmas: np.ndarray  # float32, N+1 values (last 0)
    coeffs: np.ndarray  # float32 (N, LMS_ORDER): c_j of step i, zero where j >= min(i+1, LMS_ORDER)


@dataclass(frozen=True)
class LMSState:
    derivatives: tuple = ()  # the last LMS_ORDER derivatives d, oldest first


def _lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ, exactly (ℓ_j is a polynomial; see the module docstring)."""
    s = sigmas.astype(np.float64)
    basis = Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(s[i + 1]) - antiderivative(s[i]))


class LMSDiscrete(Scheduler[LMSSchedule]):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction, sample};
    ``timestep_spacing`` in {linspace, leading, trailing}; ``use_karras_sigmas``.
    ``use_exponential_sigmas`` and ``use_beta_sigmas`` are not implemented (beta needs scipy)."""

    class_name = "LMSDiscreteScheduler"
    short_name = "lms"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0,
    )  # fmt: skip
    supported = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
    }

    # diffusers' LMSDiscreteScheduler.set_timesteps takes neither custom timesteps nor sigmas.
    accepts_timesteps = False
    accepts_sigmas = False
    max_inference_steps = sigma_family_max_steps

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> LMSSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        n, cfg = num_inference_steps, self.config
        ac = self.alphas_cumprod
        table = sigma_table(ac)
        log_table = np.log(table)
        timesteps = spaced_timesteps(cfg, n)
        if not cfg["use_karras_sigmas"]:
            self._check_timestep_range(n, timesteps)
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        if cfg["use_karras_sigmas"]:  # LMS takes σ_min/σ_max from the schedule ends, never from config
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = np.array([sigma_to_t(s, log_table) for s in sigmas])
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        coeffs = np.zeros((n, LMS_ORDER), dtype=np.float32)
        for i in range(n):
            order = min(i + 1, LMS_ORDER)
            coeffs[i, :order] = [_lms_coefficient(sigmas, i, order, j) for j in range(order)]
        s_max = sigmas.max()
        init = s_max if cfg["timestep_spacing"] in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
        return LMSSchedule(timesteps.astype(np.float32), float(init), sigmas, coeffs)

    def initial_state(self, schedule: LMSSchedule) -> LMSState:
        return LMSState()

    def scale_model_input(self, schedule: LMSSchedule, i, sample):
        sigma = schedule.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def add_noise(self, schedule, original, noise, index):
        """x0 + σ·ε with σ taken by index (diffusers' begin_index rule), not by timestep value."""
        return (original + noise * schedule.sigmas[index]).astype(np.float32)

    def step(self, schedule: LMSSchedule, i, model_output, sample, state: LMSState, generator=None):
        sigma = schedule.sigmas[i]
        # 1. denoised estimate x̂_0
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:  # sample
            x0 = model_output
        # 2. ODE derivative, appended to the history (newest last, at most LMS_ORDER kept)
        derivatives = (*state.derivatives, (sample - x0) / sigma)[-LMS_ORDER:]
        # 3. x_{i+1} = x_i + Σ_j c_j·d_{i−j}, summed newest first as diffusers does
        update = 0
        for coeff, derivative in zip(schedule.coeffs[i, : min(i + 1, LMS_ORDER)], reversed(derivatives)):
            update = update + coeff * derivative
        return (sample + update).astype(np.float32), LMSState(derivatives)
