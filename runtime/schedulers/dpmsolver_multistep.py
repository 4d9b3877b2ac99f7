"""DPM-Solver++ multistep, orders 1-3 (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", Algorithm 2 and the multistep third-order update of
DPM-Solver, arXiv 2206.00927 / 2211.01095), and its SDE variant, as diffusers'
DPMSolverMultistepScheduler with ``algorithm_type`` "dpmsolver++" ("DPM++ 2M", Karras with
``use_karras_sigmas=True``) or "sde-dpmsolver++" ("DPM++ 2M SDE").

Notation (VP space; σ here is the σ-space noise level of the step):
    α_t = 1/sqrt(σ²+1)   σ_t = σ·α_t   λ_t = log α_t − log σ_t   h = λ_t − λ_s0
    m_k = x̂_0 at s_k (s0 newest)      h_k = λ_{s_k} − λ_{s_{k+1}},  r_k = h_k/h
    D_0 = m_0   D_1 = (m_0 − m_1)/r_0 (order 2)
    order 3:  D1_0 = (m_0 − m_1)/r_0,  D1_1 = (m_1 − m_2)/r_1,
              D_1 = D1_0 + r_0/(r_0 + r_1)·(D1_0 − D1_1),  D_2 = (D1_0 − D1_1)/(r_0 + r_1)
    ODE ("dpmsolver++"), φ = e^{−h} − 1:
      order 1:  x_t = (σ_t/σ_s)·x − α_t·φ·D_0
      order 2:  midpoint  x_t = (σ_t/σ_s0)·x − α_t·φ·D_0 − ½α_t·φ·D_1
                heun      x_t = (σ_t/σ_s0)·x − α_t·φ·D_0 + α_t(φ/h + 1)·D_1
      order 3:  x_t = (σ_t/σ_s0)·x − α_t·φ·D_0 + α_t(φ/h + 1)·D_1 − α_t((φ + h)/h² − ½)·D_2
    SDE ("sde-dpmsolver++"), ψ = 1 − e^{−2h}, z ~ N(0, I) drawn from the generator every step:
      order 1:  x_t = (σ_t/σ_s·e^{−h})·x + α_t·ψ·D_0 + σ_t·sqrt(ψ)·z
      order 2:  midpoint  ... + ½α_t·ψ·D_1 + σ_t·sqrt(ψ)·z
                heun      ... + α_t(ψ/(−2h) + 1)·D_1 + σ_t·sqrt(ψ)·z
      order 3:  ... + α_t(ψ/(−2h) + 1)·D_1 + α_t((ψ − 2h)/(2h)² − ½)·D_2 + σ_t·sqrt(ψ)·z

σ schedules: interp over the training table at the spaced timesteps (default), Karras (ρ = 7),
exponential (evenly spaced log σ) or Lu's (evenly spaced λ = −log σ), the last three over the
table's ends; their timesteps are log-σ interpolations, rounded for Karras/Lu (except with the
cosine schedule) and truncated to int64 for the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Schedule, Scheduler
from .sigmas import (
    exponential_sigmas,
    karras_sigmas,
    multistep_max_steps,
    multistep_timesteps,
    one_sigma_schedule_problems,
    sigma_to_t,
    uses_sigma_ramp,
)


@dataclass(frozen=True)
class DPMSchedule(Schedule):
    sigmas: np.ndarray  # float32, N+1 values (last 0 or σ_min)


@dataclass(frozen=True)
class DPMState:
    x0_history: tuple = ()  # last `solver_order` converted model outputs, oldest first
    lower_order_nums: int = 0


def _alpha_sigma(sigma):
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _exp(x):
    """e^x of a float32 scalar, correctly rounded. torch's CPU scalar exp is (measured: 99% of
    float32 inputs); numpy's float32 exp is one ulp off in ~40% of them, and the third-order
    coefficients ((e^{-h} − 1 + h)/h²) amplify that for small h."""
    return np.float32(np.exp(np.float64(x)))


def _log(x):
    """log of a float32 scalar, correctly rounded (closer to torch's scalar log than numpy's float32 log)."""
    return np.float32(np.log(np.float64(x)))


class DPMSolverMultistep(Scheduler[DPMSchedule]):
    """Allowed values: ``algorithm_type`` in {dpmsolver++, sde-dpmsolver++}; ``solver_order`` in
    {1, 2, 3}; ``solver_type`` in {midpoint, heun}; ``prediction_type`` in {epsilon, v_prediction,
    sample}; ``timestep_spacing`` in {linspace, leading, trailing}; ``use_karras_sigmas``;
    ``use_exponential_sigmas``; ``use_lu_lambdas``; ``final_sigmas_type`` in {zero, sigma_min};
    ``lower_order_final``; ``euler_at_final``. Not supported: the deprecated noise-prediction
    algorithms (dpmsolver, sde-dpmsolver), thresholding, beta sigmas (scipy), flow sigmas,
    ``lambda_min_clipped`` and learned variance. Refused because diffusers returns NaN there:
    ``final_sigmas_type="sigma_min"`` after a schedule already ending on σ_min (the σ ramps, a last
    timestep of 0) when the last step is heun or third order (``_check_last_step``)."""

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
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "solver_order": (1, 2, 3),
        "solver_type": ("midpoint", "heun"),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "thresholding": (False,),
        "use_beta_sigmas": (False,),
        "use_flow_sigmas": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "lambda_min_clipped": (-float("inf"),),
        # diffusers acts on learned / learned_range only (a 2×C UNet output); a DDPM config's others are no-ops
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    }

    accepts_timesteps = True
    int_timesteps = True
    max_inference_steps = multistep_max_steps

    @classmethod
    def normalize_config(cls, config):
        # diffusers' constructor renames a UniPC config's solver types and the DEIS algorithm
        if config.get("solver_type") in ("logrho", "bh1", "bh2"):
            config = dict(config, solver_type="midpoint")
        if config.get("algorithm_type") == "deis":
            config = dict(config, algorithm_type="dpmsolver++")
        return config

    @classmethod
    def class_problems(cls, config):
        return one_sigma_schedule_problems(config)

    @property
    def stochastic(self) -> bool:
        return self.config["algorithm_type"] == "sde-dpmsolver++"

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> DPMSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        cfg = self.config
        for key in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas"):
            if timesteps is not None and cfg[key]:
                raise InvalidArgumentError(f"custom timesteps cannot be combined with {key} (as in diffusers)")
        n = num_inference_steps
        if timesteps is not None:
            t = np.asarray(timesteps, dtype=np.float64).astype(np.int64)
        else:
            t = multistep_timesteps(cfg, n)
            if not uses_sigma_ramp(cfg):
                self._check_timestep_range(n, t)
        ac = self.alphas_cumprod
        table = ((1 - ac) / ac) ** 0.5  # float32
        log_table = np.log(table)  # float32, as diffusers' np.log of the torch table
        rounded = cfg["beta_schedule"] != "squaredcos_cap_v2"
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
        elif cfg["use_lu_lambdas"]:
            # diffusers' "lambdas" here are log σ (= −λ): a linear ramp from log σ_max to log σ_min
            lam_min, lam_max = float(log_table[0]), float(log_table[-1])
            sigmas = np.exp(lam_max + np.linspace(0, 1, n) * (lam_min - lam_max))  # ρ = 1
        elif cfg["use_exponential_sigmas"]:
            sigmas, rounded = exponential_sigmas(float(table[0]), float(table[-1]), n), False
        else:
            sigmas = np.interp(t, np.arange(0, len(table)), table)
        if cfg["use_karras_sigmas"] or cfg["use_lu_lambdas"] or cfg["use_exponential_sigmas"]:
            t = np.array([sigma_to_t(s, log_table) for s in sigmas])
            if rounded:
                t = t.round()
        last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self._check_last_step(len(t), int(t[-1]), timesteps is not None)
        # diffusers feeds the UNet int64 timesteps (Karras/Lu ones rounded, exponential ones truncated)
        return DPMSchedule(t.astype(np.int64).astype(np.float32), 1.0, sigmas)

    def _last_order(self, n: int) -> int:
        """The solver order ``step`` uses at the last of ``n`` steps (diffusers' rules)."""
        cfg = self.config
        lowered = cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        if cfg["solver_order"] == 1 or n == 1 or lowered:
            return 1
        return 2 if cfg["solver_order"] == 2 or n == 2 else 3

    def _check_last_step(self, n: int, last_t: int, custom: bool) -> None:
        """With final_sigmas_type="sigma_min" the schedule ends on σ_min, where the Karras / exponential / Lu ramps
        (and an interpolated schedule whose last timestep is 0) already are: the last step has length h = 0 in exact
        arithmetic (in float32 the two σ's are equal or an ulp apart, as rounding falls). First order it is exact
        (x stays), but the heun and third-order coefficients are 0/0 (φ/h, (φ + h)/h², r_0/(r_0 + r_1)): diffusers
        returns NaN there at every step count swept (tests/tools/scheduler_nan_sweep.py), rounding noise at best.
        Midpoint's D_1 = (1/r_0)·(m_0 − m_1) with r_0 = h_0/h = inf stays finite (0)."""
        cfg = self.config
        ramp = next((k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas") if cfg[k]), None)
        if cfg["final_sigmas_type"] != "sigma_min" or not (ramp or last_t == 0):
            return
        order = self._last_order(n)
        if order == 1 or (order == 2 and cfg["solver_type"] == "midpoint"):
            return
        why = f"{ramp}=True" if ramp else ("custom timesteps ending at 0" if custom else "a last timestep of 0")
        update = "third-order" if order == 3 else "solver_type='heun'"
        fixes = "final_sigmas_type='zero' or euler_at_final=True" + (" or lower_order_final=True" if n < 15 else "")
        raise InvalidArgumentError(
            f"{self.class_name}: final_sigmas_type='sigma_min' with {why} ends on a repeated sigma (a zero-length "
            f"last step; {n} steps), whose {update} update diffusers turns into NaN; use {fixes}"
        )

    def initial_state(self, schedule):
        return DPMState()

    def _to_x0(self, schedule, i, model_output, sample):
        kind = self.config["prediction_type"]
        if kind == "sample":
            return model_output
        alpha_t, sigma_t = _alpha_sigma(schedule.sigmas[i])
        if kind == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    def add_noise(self, schedule, original, noise, index):
        """α·x0 + σ_t·ε of the schedule's σ at ``index`` (diffusers' begin_index rule; Karras σ included)."""
        alpha_t, sigma_t = _alpha_sigma(schedule.sigmas[index])
        return (alpha_t * original + sigma_t * noise).astype(np.float32)

    def step(self, schedule: DPMSchedule, i, model_output, sample, state: DPMState, generator=None):
        cfg, n = self.config, len(schedule.timesteps)
        lower_order_final = (i == n - 1) and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        lower_order_second = (i == n - 2) and cfg["lower_order_final"] and n < 15
        x0 = self._to_x0(schedule, i, model_output, sample)
        history = (*state.x0_history, x0)[-cfg["solver_order"] :]
        sample = sample.astype(np.float32, copy=False)
        noise = None
        if self.stochastic:  # diffusers draws the noise of every step, first- or higher-order
            if generator is None:
                raise InvalidArgumentError(
                    f"{self.class_name} with algorithm_type='sde-dpmsolver++' draws fresh noise every step: "
                    "pass a generator (e.g. a seed)"
                )
            noise = np.asarray(generator.randn(np.shape(model_output)), dtype=np.float32)
        with np.errstate(divide="ignore"):  # σ_t = 0 at the end: λ_t = +inf, e^{-h} = 0, exact
            if cfg["solver_order"] == 1 or state.lower_order_nums < 1 or lower_order_final:
                prev = self._first_order(schedule, i, x0, sample, noise)
            elif cfg["solver_order"] == 2 or state.lower_order_nums < 2 or lower_order_second:
                prev = self._second_order(schedule, i, history, sample, noise)
            else:
                prev = self._third_order(schedule, i, history, sample, noise)
        nums = min(state.lower_order_nums + 1, cfg["solver_order"])
        return prev.astype(np.float32), DPMState(history, nums)

    @staticmethod
    def _lambdas(schedule, i, k):
        """(α_t, σ_t, λ_t) at σ_{i+1}, then (α, σ, λ) at s0 = σ_i, s1 = σ_{i−1}, … (k of them)."""
        out = []
        for j in (i + 1, *range(i, i - k, -1)):
            alpha, sigma = _alpha_sigma(schedule.sigmas[j])
            out.append((alpha, sigma, _log(alpha) - _log(sigma)))
        return out

    def _first_order(self, schedule, i, d0, sample, noise):
        (alpha_t, sigma_t, lambda_t), (_, sigma_s, lambda_s) = self._lambdas(schedule, i, 1)
        h = lambda_t - lambda_s
        if noise is None:
            return (sigma_t / sigma_s) * sample - (alpha_t * (_exp(-h) - 1.0)) * d0
        return (
            (sigma_t / sigma_s * _exp(-h)) * sample
            + (alpha_t * (1 - _exp(-2.0 * h))) * d0
            + sigma_t * np.sqrt(1.0 - _exp(-2 * h)) * noise
        )

    def _second_order(self, schedule, i, history, sample, noise):
        (alpha_t, sigma_t, lambda_t), (_, sigma_s0, lambda_s0), (_, _, lambda_s1) = self._lambdas(schedule, i, 2)
        m0, m1 = history[-1], history[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        midpoint = self.config["solver_type"] == "midpoint"
        if noise is None:
            coeff = alpha_t * (_exp(-h) - 1.0)
            if midpoint:
                return (sigma_t / sigma_s0) * sample - coeff * d0 - 0.5 * coeff * d1
            return (sigma_t / sigma_s0) * sample - coeff * d0 + (alpha_t * ((_exp(-h) - 1.0) / h + 1.0)) * d1
        psi = 1 - _exp(-2.0 * h)
        if midpoint:
            d1_term = 0.5 * (alpha_t * psi) * d1
        else:
            d1_term = (alpha_t * ((1.0 - _exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
        return (
            (sigma_t / sigma_s0 * _exp(-h)) * sample
            + (alpha_t * psi) * d0
            + d1_term
            + sigma_t * np.sqrt(1.0 - _exp(-2 * h)) * noise
        )

    def _third_order(self, schedule, i, history, sample, noise):
        lam = self._lambdas(schedule, i, 3)
        (alpha_t, sigma_t, lambda_t), (_, sigma_s0, lambda_s0) = lam[0], lam[1]
        lambda_s1, lambda_s2 = lam[2][2], lam[3][2]
        m0, m1, m2 = history[-1], history[-2], history[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d0 = m0
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if noise is None:
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (_exp(-h) - 1.0)) * d0
                + (alpha_t * ((_exp(-h) - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((_exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
            )
        return (
            (sigma_t / sigma_s0 * _exp(-h)) * sample
            + (alpha_t * (1.0 - _exp(-2.0 * h))) * d0
            + (alpha_t * ((1.0 - _exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            + (alpha_t * ((1.0 - _exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
            + sigma_t * np.sqrt(1.0 - _exp(-2 * h)) * noise
        )
