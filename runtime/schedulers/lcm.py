"""Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models",
Algorithm 3), as diffusers' LCMScheduler.

Notation (consistency-model boundary condition, Song et al. 2023 with σ_data = 0.5):
    ᾱ_t        alphas_cumprod[t]                    ᾱ_prev   ᾱ at the next schedule timestep
    s          timestep_scaling; τ = s·t            x̂_0      predicted clean sample (as DDIM)
    c_skip = σ_data²/(τ² + σ_data²)                  c_out = τ/sqrt(τ² + σ_data²)
    f_θ(x_t, t) = c_skip·x_t + c_out·x̂_0            (the "denoised" sample)
    x_prev = sqrt(ᾱ_prev)·f_θ + sqrt(1−ᾱ_prev)·z  (z ~ N(0, I)), except x_prev = f_θ at the last step
Schedule: k = T // original_inference_steps; the distillation grid is k−1, 2k−1, …, T−1
(reversed) and N of its entries are taken at evenly spaced indices (N=4, orig 50: 999, 759, 499, 259).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import Schedule, Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LCMSchedule(Schedule):
    int_timesteps: np.ndarray  # int64 schedule timesteps


def _scalings(t: int, timestep_scaling: float) -> tuple[np.float32, np.float32]:
    """(c_skip, c_out) of the boundary condition, in float32 as diffusers computes them."""
    sigma_data_sq = 0.5**2
    tau = np.float32(t) * np.float32(timestep_scaling)
    c_skip = sigma_data_sq / (tau**2 + sigma_data_sq)
    c_out = tau / (tau**2 + sigma_data_sq) ** 0.5
    return np.float32(c_skip), np.float32(c_out)


class LCM(Scheduler[LCMSchedule]):
    """Allowed values: ``prediction_type`` in {epsilon, v_prediction, sample}; ``thresholding``
    false (dynamic thresholding is meant for pixel-space models). ``timestep_spacing`` and
    ``steps_offset`` are accepted and, as in diffusers, do not affect the LCM schedule.
    ``set_alpha_to_one`` only matters for a negative next timestep, which no valid schedule has.
    diffusers' img2img ``strength`` argument of ``set_timesteps`` is not taken (always 1.0).
    Refused because diffusers returns NaN: an epsilon prediction at a timestep with ᾱ_t = 0
    (zero-SNR rescaling, without ``clip_sample``; LCM's schedule always starts at T − 1)."""

    class_name = "LCMScheduler"
    short_name = "lcm"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
        timestep_scaling=10.0, rescale_betas_zero_snr=False,
    )  # fmt: skip
    supported = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "thresholding": (False,),
    }

    accepts_timesteps = True
    int_timesteps = True

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def schedule(
        self, num_inference_steps=None, timesteps=None, sigmas=None, original_inference_steps=None
    ) -> LCMSchedule:
        """``original_inference_steps`` overrides the config value for this schedule, as the argument
        of the same name of diffusers' ``set_timesteps``."""
        self._check_schedule_args(num_inference_steps, timesteps, sigmas)
        big_t = self.config["num_train_timesteps"]
        orig = original_inference_steps
        if orig is None:
            orig = self.config["original_inference_steps"]
        if isinstance(orig, bool) or not isinstance(orig, (int, np.integer)) or not 1 <= orig <= big_t:
            raise InvalidArgumentError(f"original_inference_steps must be an integer in [1, {big_t}], got {orig!r}")
        k = big_t // orig
        origin = np.arange(1, orig + 1, dtype=np.int64) * k - 1  # the distillation timestep grid
        if timesteps is not None:
            t = self._custom(timesteps, origin, big_t)
        else:
            n = num_inference_steps
            if n > orig:
                raise InvalidArgumentError(
                    f"num_inference_steps={n} cannot exceed original_inference_steps={orig}: LCM's schedule is a "
                    "subset of the original one (as in diffusers)"
                )
            origin = origin[::-1]
            indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
            t = origin[indices]
        self._check_x0_from_epsilon(t)
        return LCMSchedule(t.astype(np.float32), 1.0, t)

    @staticmethod
    def _custom(timesteps, origin: np.ndarray, big_t: int) -> np.ndarray:
        """diffusers' warnings when a custom schedule (checked in ``_check_schedule_args``) leaves the
        distillation grid."""
        t = np.array(timesteps, dtype=np.float64).astype(np.int64)  # diffusers truncates fractional values
        if t[0] != big_t - 1:
            logger.warning("LCM: the custom schedule starts at %d, not %d; results may be unexpected", t[0], big_t - 1)
        off_grid = [int(v) for v in t[1:] if v not in set(origin.tolist())]
        if off_grid:
            logger.warning("LCM: custom timesteps %s are not on the distillation schedule; results may be unexpected",
                           off_grid)  # fmt: skip
        if len(t) > len(origin):
            logger.warning("LCM: %d custom timesteps exceed original_inference_steps=%d", len(t), len(origin))
        return t

    def step(self, schedule: LCMSchedule, i, model_output, sample, state=None, generator=None):
        ts = schedule.int_timesteps
        t = int(ts[i])
        last = i == len(ts) - 1
        prev_t = t if last else int(ts[i + 1])
        # 1. ᾱ_t and ᾱ at the next schedule timestep
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        b_prev = 1 - a_prev
        # 2. boundary-condition scalings
        c_skip, c_out = _scalings(t, self.config["timestep_scaling"])
        # 3. predicted x̂_0 (as DDIM), optional clipping
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            with np.errstate(divide="ignore"):  # ᾱ_t = 0 reaches here only with clip_sample, which clips ±inf
                x0 = (sample - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
        elif kind == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = np.sqrt(a_t) * sample - np.sqrt(b_t) * model_output
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        # 4. consistency function f_θ, then re-noise to the next timestep (not after the last step)
        denoised = c_out * x0 + c_skip * sample
        if last:
            return np.asarray(denoised, dtype=np.float32), None
        if generator is None:
            raise InvalidArgumentError("LCM with more than one step needs a generator for its per-step noise")
        noise = generator.randn(model_output.shape)
        prev = np.sqrt(a_prev) * denoised + np.sqrt(b_prev) * noise
        return np.asarray(prev, dtype=np.float32), None
