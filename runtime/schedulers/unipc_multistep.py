"""UniPC: a unified predictor-corrector framework (Zhao et al. 2023, "UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models", Algorithms 1-3 with the
B(h) variants), as diffusers' UniPCMultistepScheduler: UniP-p predicts x_{i+1} from the last p
converted model outputs; UniC-p corrects x_i with the model output at x_i before the next
prediction (no extra UNet call).

Notation (VP space; σ here is the σ-space noise level of the step, as in DPM-Solver++):
    α_t = 1/sqrt(σ²+1)   σ_t = σ·α_t   λ_t = log α_t − log σ_t   h = λ_t − λ_s0
    m_0 (newest), m_k     converted model outputs: x̂_0 (predict_x0) or ε̂ (predict_x0=False)
    r_k = (λ_{s_k} − λ_s0)/h      D_k = (m_k − m_0)/r_k
    hh = −h (predict_x0) or h     B(h) = hh (bh1) or e^{hh} − 1 (bh2)
    φ-recursion: hφ_1 = e^{hh} − 1,  g_1 = hφ_1/hh − 1,  g_{k+1} = g_k/hh − 1/(k+1)!
    R = [r^0; r^1; …; r^{p−1}] (rows),   b_k = g_k·k!/B(h)
    UniP-p:  ρ = R[:-1,:-1]⁻¹·b[:-1]   (p = 2: ρ = ½)
             x_t = (σ_t/σ_s0)·x − α_t·hφ_1·m_0 − α_t·B(h)·Σ ρ_k D_k                (predict_x0)
             x_t = (α_t/α_s0)·x − σ_t·hφ_1·m_0 − σ_t·B(h)·Σ ρ_k D_k                (ε form)
    UniC-p:  ρ = R⁻¹·b   (p = 1: ρ = ½);  same base with x = the previous step's (corrected)
             sample, plus − α_t·B(h)·(Σ ρ_k D_k + ρ_p·(m_t − m_0))   (σ_t for the ε form)
Order p = min(solver_order, lower_order_nums + 1), and with ``lower_order_final`` also at most
the number of steps left. The corrector at step i uses the predictor order of step i − 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Schedule, Scheduler
from .sigmas import karras_sigmas, multistep_max_steps, multistep_timesteps, sigma_to_t

_F32 = np.float32


@dataclass(frozen=True)
class UniPCSchedule(Schedule):
    sigmas: np.ndarray  # float32, N+1 values (last 0 or σ_min)


@dataclass(frozen=True)
class UniPCState:
    model_outputs: tuple = ()  # last `solver_order` converted model outputs, oldest first
    last_sample: np.ndarray | None = None  # the (corrected) x the last predictor started from
    this_order: int = 0  # the last predictor's order, reused by the next corrector
    lower_order_nums: int = 0


def _alpha_sigma(sigma):
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lambda(sigma):
    alpha, sigma_t = _alpha_sigma(sigma)
    return alpha, sigma_t, np.log(alpha) - np.log(sigma_t)


class UniPCMultistep(Scheduler[UniPCSchedule]):
    """Allowed values: ``solver_order`` in {1, 2, 3}; ``solver_type`` in {bh1, bh2} (diffusers'
    DPM names midpoint/heun/logrho become bh2, as diffusers does); ``predict_x0``;
    ``prediction_type`` in {epsilon, v_prediction, sample}; ``timestep_spacing`` in {linspace,
    leading, trailing}; ``use_karras_sigmas`` (with optional ``sigma_min``/``sigma_max``);
    ``final_sigmas_type`` in {zero, sigma_min}; ``lower_order_final``; ``disable_corrector``.

    Refused because diffusers' last step returns NaN/inf or fails on a singular solve there:
    ``final_sigmas_type="zero"`` with ``solver_type="bh1"`` or ``predict_x0=False``; with
    ``lower_order_final=False`` also ``final_sigmas_type="zero"`` (``solver_order`` > 1, > 1 step)
    and Karras σ with ``final_sigmas_type="sigma_min"`` at ``solver_order=3`` (> 2 steps).
    Not supported: thresholding, flow / exponential / beta sigmas, dynamic shifting, ``solver_p``."""

    class_name = "UniPCMultistepScheduler"
    short_name = "unipc"
    zero_snr_floor = True
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None,
        sigma_max=None, shift_terminal=None,
    )  # fmt: skip
    supported = {
        "solver_order": (1, 2, 3),
        "solver_type": ("bh1", "bh2"),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "thresholding": (False,),
        "solver_p": (None,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
        "shift_terminal": (None,),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    max_inference_steps = multistep_max_steps

    @classmethod
    def normalize_config(cls, config):
        # diffusers' constructor renames DPM-Solver solver types (a DPM config switched to UniPC)
        if config.get("solver_type") in ("midpoint", "heun", "logrho"):
            config = dict(config, solver_type="bh2")
        return config

    @classmethod
    def class_problems(cls, cfg):
        if cfg["final_sigmas_type"] == "zero" and (cfg["solver_type"] != "bh2" or not cfg["predict_x0"]):
            return ["final_sigmas_type='zero' needs solver_type='bh2' and predict_x0=true (diffusers' last step "
                    "returns NaN otherwise); use final_sigmas_type='sigma_min'"]  # fmt: skip
        return []

    def _check_last_step(self, n: int) -> None:
        """Refuse the schedules whose last predictor step diffusers turns into NaN or a singular
        solve: an order >= 2 step onto σ = 0, or an order-3 step of length h = 0 (Karras with
        final σ = σ_min repeats the last σ)."""
        cfg = self.config
        if cfg["lower_order_final"]:
            return  # the last step is first order
        if cfg["final_sigmas_type"] == "zero" and cfg["solver_order"] > 1 and n > 1:
            raise InvalidArgumentError(
                f"{self.class_name}: final_sigmas_type='zero' with lower_order_final=False fails at the last step "
                "in diffusers (singular solve / NaN); use lower_order_final=True or final_sigmas_type='sigma_min'"
            )
        if cfg["use_karras_sigmas"] and cfg["final_sigmas_type"] == "sigma_min" and cfg["solver_order"] > 2 and n > 2:
            raise InvalidArgumentError(
                f"{self.class_name}: use_karras_sigmas with final_sigmas_type='sigma_min', solver_order=3 and "
                "lower_order_final=False ends on a zero-length third-order step (NaN in diffusers); "
                "use lower_order_final=True"
            )

    def schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> UniPCSchedule:
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        cfg, n = self.config, num_inference_steps
        self._check_last_step(n)
        t = multistep_timesteps(cfg, n)
        if not cfg["use_karras_sigmas"]:
            self._check_timestep_range(n, t)
        ac = self.alphas_cumprod
        table = ((1 - ac) / ac) ** 0.5  # float32, as diffusers' torch table
        if cfg["use_karras_sigmas"]:
            s_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(table[0])
            s_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(table[-1])
            sigmas = karras_sigmas(s_min, s_max, n)
            log_table = np.log(table)
            t = np.array([sigma_to_t(s, log_table) for s in sigmas]).round()
            last = sigmas[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        else:
            sigmas = np.interp(t, np.arange(0, len(table)), table)
            last = ((1 - ac[0]) / ac[0]) ** 0.5 if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        # diffusers feeds the UNet int64 timesteps (Karras ones rounded)
        return UniPCSchedule(t.astype(np.int64).astype(np.float32), 1.0, sigmas)

    def initial_state(self, schedule):
        return UniPCState()

    def _convert(self, schedule, i, model_output, sample):
        kind = self.config["prediction_type"]
        alpha_t, sigma_t = _alpha_sigma(schedule.sigmas[i])
        if self.config["predict_x0"]:
            if kind == "epsilon":
                return (sample - sigma_t * model_output) / alpha_t
            if kind == "sample":
                return model_output
            return alpha_t * sample - sigma_t * model_output  # v_prediction
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample  # v_prediction

    def add_noise(self, schedule, original, noise, index):
        """α·x0 + σ_t·ε of the schedule's σ at ``index`` (diffusers' begin_index rule; Karras σ included)."""
        alpha_t, sigma_t = _alpha_sigma(schedule.sigmas[index])
        return (alpha_t * original + sigma_t * noise).astype(np.float32)

    def step(self, schedule: UniPCSchedule, i, model_output, sample, state: UniPCState, generator=None):
        cfg, n, order = self.config, len(schedule.timesteps), self.config["solver_order"]
        use_corrector = i > 0 and (i - 1) not in cfg["disable_corrector"] and state.last_sample is not None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            converted = self._convert(schedule, i, model_output, sample)
            if use_corrector:
                sample = self._corrector(
                    schedule, i, converted, state.last_sample, state.model_outputs, state.this_order
                )
            outputs = (*state.model_outputs, converted)[-order:]
            this_order = min(order, n - i) if cfg["lower_order_final"] else order
            this_order = min(this_order, state.lower_order_nums + 1)  # warm-up
            prev = self._predictor(schedule, i, outputs, sample, this_order)
        nums = min(state.lower_order_nums + 1, order)
        return prev.astype(np.float32), UniPCState(outputs, np.asarray(sample, dtype=np.float32), this_order, nums)

    # -- the B(h) solvers, in diffusers' arithmetic order (float32 scalars) -------------------
    def _coefficients(self, lambda_s0, lambda_t, past_lambdas, order):
        """(h·φ_1, B(h), r_k, R, b) for UniP/UniC of ``order`` with the given past λ's."""
        h = lambda_t - lambda_s0
        ratios = [(lam - lambda_s0) / h for lam in past_lambdas]
        rks = np.array([*ratios, _F32(1.0)], dtype=np.float32)
        hh = -h if self.config["predict_x0"] else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        b_h = hh if self.config["solver_type"] == "bh1" else np.expm1(hh)
        big_r, b = [], []
        for k in range(1, order + 1):
            big_r.append(rks ** (k - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return h_phi_1, b_h, rks, np.stack(big_r).astype(np.float32), np.array(b, dtype=np.float32)

    def _base(self, alpha_t, sigma_t, alpha_s0, sigma_s0, x, h_phi_1, m0):
        if self.config["predict_x0"]:
            return sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t
        return alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t

    def _predictor(self, schedule, i, outputs, x, order):
        alpha_t, sigma_t, lambda_t = _lambda(schedule.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = _lambda(schedule.sigmas[i])
        past = [_lambda(schedule.sigmas[i - k])[2] for k in range(1, order)]
        h_phi_1, b_h, rks, big_r, b = self._coefficients(lambda_s0, lambda_t, past, order)
        m0 = outputs[-1]
        d1s = [(outputs[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
        x_t_, scale = self._base(alpha_t, sigma_t, alpha_s0, sigma_s0, x, h_phi_1, m0)
        if not d1s:
            return x_t_ - scale * b_h * 0
        rhos_p = np.array([0.5], dtype=np.float32) if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
        pred_res = _weighted_sum(rhos_p.astype(np.float32), d1s)
        return x_t_ - scale * b_h * pred_res

    def _corrector(self, schedule, i, model_t, last_sample, outputs, order):
        alpha_t, sigma_t, lambda_t = _lambda(schedule.sigmas[i])
        alpha_s0, sigma_s0, lambda_s0 = _lambda(schedule.sigmas[i - 1])
        past = [_lambda(schedule.sigmas[i - (k + 1)])[2] for k in range(1, order)]
        h_phi_1, b_h, rks, big_r, b = self._coefficients(lambda_s0, lambda_t, past, order)
        m0 = outputs[-1]
        d1s = [(outputs[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
        x_t_, scale = self._base(alpha_t, sigma_t, alpha_s0, sigma_s0, last_sample, h_phi_1, m0)
        rhos_c = np.array([0.5], dtype=np.float32) if order == 1 else np.linalg.solve(big_r, b).astype(np.float32)
        corr_res = _weighted_sum(rhos_c[:-1], d1s) if d1s else 0
        d1_t = model_t - m0
        return x_t_ - scale * b_h * (corr_res + rhos_c[-1] * d1_t)


def _weighted_sum(weights, arrays):
    """Σ_k w_k·a_k (diffusers' einsum "k,bkc...->bc..."), accumulated in float32 in k order."""
    total = weights[0] * arrays[0]
    for w, a in zip(weights[1:], arrays[1:]):
        total = total + w * a
    return total
