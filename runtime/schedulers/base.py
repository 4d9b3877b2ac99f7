"""What every scheduler shares: configuration from a diffusers ``scheduler_config.json`` and the
training noise schedule (betas -> cumulative alphas).

Deliberate deviation from "copy helpers into each scheduler file" (STYLE E1): the training
schedule is one formula that must be identical in every scheduler, so it lives here once; all
per-algorithm maths stays in the algorithm's own file.

Numerics follow diffusers' torch code bit for bit: betas from torch's float32 linspace (emulated
exactly), cumulative product accumulated in float64 and stored as float32, as torch's CPU cumprod
does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from ..errors import InvalidArgumentError
from .validation import config_problems, sigmas_problem, timesteps_problem

logger = logging.getLogger(__name__)

# Keys every diffusers scheduler config may carry that are not constructor arguments.
_META_KEYS = {"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"}


@dataclass(frozen=True)
class Schedule:
    """The immutable result of ``Scheduler.schedule(num_inference_steps)``.

    ``timesteps`` holds one value per UNet call (float32, what the UNet is fed); subclasses add
    the arrays their ``step`` needs. Nothing in a schedule changes during sampling, so one
    schedule may be shared by concurrent calls.
    """

    timesteps: np.ndarray
    init_noise_sigma: float


S = TypeVar("S", bound=Schedule)


class Scheduler(Generic[S]):
    """Base class. Subclasses set ``class_name``, ``defaults`` (diffusers' constructor defaults)
    and implement ``schedule``, ``scale_model_input``, ``initial_state`` and ``step``.

    ``step(schedule, i, model_output, sample, state, generator) -> (prev_sample, state)`` is a
    function of its arguments: multistep history lives in ``state``, which the sampling loop
    owns and passes back in, never on the scheduler object.
    """

    class_name: ClassVar[str]
    short_name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    order: ClassVar[int] = 1
    # Euler/DPM/UniPC in diffusers floor ᾱ_T at 2^-24 under zero-SNR rescaling (σ_max finite);
    # DDIM/PNDM keep ᾱ_T = 0.
    zero_snr_floor: ClassVar[bool] = False
    # Options whose values this implementation does not support: {key: allowed values}.
    supported: ClassVar[dict[str, tuple]] = {}

    def __init__(self, **config: Any):
        config = self.normalize_config(config)
        unknown = sorted(k for k in config if k not in self.defaults and k not in _META_KEYS)
        # Keys of other schedulers are normal when switching classes (diffusers ignores them too);
        # only keys no scheduler knows deserve a warning.
        from . import known_config_keys

        strange = [k for k in unknown if k not in known_config_keys()]
        if strange:
            logger.warning("%s: ignoring unknown scheduler config keys %s", self.class_name, strange)
        self.config = {k: config.get(k, v) for k, v in self.defaults.items()}
        options = {k: config[k] for k in self.step_options if k in config}
        problems = config_problems({**self.config, **options}, self.class_name)
        if problems:
            raise InvalidArgumentError(f"{self.class_name} config: {'; '.join(problems)}")
        self.alphas_cumprod = alphas_cumprod_from_config(self.config, self.zero_snr_floor)

    @classmethod
    def normalize_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The renames diffusers' constructor makes before anything reads the config (none by default)."""
        return config

    @classmethod
    def class_problems(cls, config: dict[str, Any]) -> list[str]:
        """Problems of this class's option combinations, for ``config_problems`` (the config has every
        key of ``defaults``; single keys are already checked)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # Per-call options that diffusers passes to ``step`` and we take as constructor arguments
    # (DDIM's ``eta``); the pipeline forwards them only to classes that list them, as diffusers does.
    step_options: ClassVar[tuple[str, ...]] = ()
    # Which custom schedules ``schedule`` accepts, as diffusers' ``set_timesteps`` does for this class.
    accepts_timesteps: ClassVar[bool] = False
    accepts_sigmas: ClassVar[bool] = False

    # -- interface -------------------------------------------------------------------------
    def schedule(self, num_inference_steps: int | None = None, timesteps=None, sigmas=None) -> Schedule:
        """The immutable schedule for one call: ``num_inference_steps``, or a custom list of
        ``timesteps`` / ``sigmas`` where the diffusers class accepts one."""
        raise NotImplementedError

    # Whether custom timesteps are truncated to integers (as diffusers does for this class).
    int_timesteps: ClassVar[bool] = False

    def max_inference_steps(self) -> int | None:
        """The most steps whose schedule repeats no timestep (a repeat is a zero-length step: wasted UNet
        calls at best, NaN or noise at worst); None when any number works. Default: one per training
        timestep, as diffusers' DDIM enforces."""
        return self.config["num_train_timesteps"]

    def _check_schedule_args(self, num_inference_steps, timesteps=None, sigmas=None) -> None:
        """diffusers' rules: exactly one of the three; custom lists only where the class takes them;
        plus what diffusers lets through into NaN or noise: too many steps, bad custom values."""
        given = [n for n, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                ("sigmas", sigmas)) if v is not None]  # fmt: skip
        if len(given) != 1:
            raise InvalidArgumentError(
                f"{self.class_name}: pass exactly one of num_inference_steps, timesteps or sigmas "
                f"(got {given or 'none'})"
            )
        if timesteps is not None and not self.accepts_timesteps:
            raise InvalidArgumentError(f"{self.class_name} does not accept custom timesteps (as in diffusers)")
        if sigmas is not None and not self.accepts_sigmas:
            raise InvalidArgumentError(f"{self.class_name} does not accept custom sigmas (as in diffusers)")
        big_t = self.config["num_train_timesteps"]
        if num_inference_steps is not None:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise InvalidArgumentError(f"num_inference_steps must be an integer >= 1, got {n!r}")
            limit = self.max_inference_steps()
            if limit is not None and n > limit:
                spacing = self.config.get("timestep_spacing")
                head = (f"num_inference_steps={n} exceeds the model's {big_t} training timesteps" if n > big_t
                        else f"num_inference_steps={n} repeats a timestep (a zero-length step)")  # fmt: skip
                where = "" if limit == big_t else f" with timestep_spacing={spacing!r}"
                raise InvalidArgumentError(f"{head}; {self.class_name}{where} needs num_inference_steps <= {limit}")
        problem = None
        if timesteps is not None:
            problem = timesteps_problem(timesteps, big_t, self.int_timesteps)
        elif sigmas is not None:
            problem = sigmas_problem(sigmas)
        if problem:
            raise InvalidArgumentError(f"{self.class_name}: {problem}")

    def _check_timestep_range(self, n: int, t: np.ndarray) -> None:
        """A spaced schedule inside the training timesteps: a ``leading`` one's steps_offset can push the
        first timestep past T − 1 (diffusers then indexes past its tables, or clamps σ silently)."""
        big_t = self.config["num_train_timesteps"]
        if t.max() > big_t - 1 or t.min() < 0:
            cfg = self.config
            raise InvalidArgumentError(
                f"{self.class_name}: num_inference_steps={n} with timestep_spacing={cfg['timestep_spacing']!r} and "
                f"steps_offset={cfg['steps_offset']} puts a timestep at {t.max():g}, past the model's last training "
                f"timestep {big_t - 1}; use fewer steps or a smaller steps_offset"
            )

    def _check_x0_from_epsilon(self, timesteps: np.ndarray) -> None:
        """DDIM, DDPM and LCM keep ᾱ_T = 0 under ``rescale_betas_zero_snr`` (no 2^-24 floor), and at a timestep with
        ᾱ_t = 0 an epsilon prediction gives x̂_0 = (x − sqrt(1 − ᾱ_t)·ε)/sqrt(ᾱ_t) = ±inf: diffusers' sample is inf/NaN
        from there on unless ``clip_sample`` clips x̂_0 (swept: tests/tools/scheduler_nan_sweep.py)."""
        cfg = self.config
        if cfg["prediction_type"] != "epsilon" or cfg["clip_sample"]:
            return
        zero = [int(t) for t in timesteps if self.alphas_cumprod[int(t)] == 0]
        if zero:
            raise InvalidArgumentError(
                f"{self.class_name}: rescale_betas_zero_snr=True makes alphas_cumprod 0 at timestep {zero[0]}, where "
                "prediction_type='epsilon' gives no x0 (a division by 0, inf/NaN in diffusers); use "
                "prediction_type='v_prediction' (what zero-SNR models are trained with) or clip_sample=True"
            )

    def scale_model_input(self, schedule: S, i: int, sample: np.ndarray) -> np.ndarray:
        return sample

    def add_noise(self, schedule: S, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        """``original`` noised to the level of call ``index`` of ``schedule`` (img2img's start), as diffusers'
        ``add_noise``. Default (DDIM, DDPM, PNDM, LCM): √ᾱ_t·x0 + √(1−ᾱ_t)·ε at the integer timestep t."""
        a = self.alphas_cumprod[int(schedule.timesteps[index])]
        return (a**0.5 * original + (1 - a) ** 0.5 * noise).astype(np.float32)

    def denoised(self, schedule: S, i: int, sample: np.ndarray, model_output: np.ndarray) -> np.ndarray:
        """The current estimate of the clean latents x0 from call ``i``'s (guided) prediction, for previews. Every
        scheduler's scaled UNet input is √ᾱ·x0 + √(1−ᾱ)·ε: σ-space schedulers scale by 1/√(σ²+1) = √ᾱ (so ᾱ is
        the scale squared), the others feed the sample as it is (ᾱ of the call's integer timestep)."""
        scale = float(self.scale_model_input(schedule, i, np.ones((1,), np.float32))[0])
        if scale != 1.0:
            a = scale * scale
        else:
            t = min(max(round(float(schedule.timesteps[i])), 0), len(self.alphas_cumprod) - 1)
            a = float(self.alphas_cumprod[t])
        x = sample * np.float32(scale)
        kind = self.config.get("prediction_type", "epsilon")
        if kind == "sample":
            return model_output.astype(np.float32)
        if kind == "v_prediction":
            return (np.float32(a**0.5) * x - np.float32((1 - a) ** 0.5) * model_output).astype(np.float32)
        return ((x - np.float32((1 - a) ** 0.5) * model_output) / np.float32(max(a, 1e-12) ** 0.5)).astype(np.float32)

    def initial_state(self, schedule: S) -> Any:
        return None

    def step(self, schedule: S, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any, generator=None):
        raise NotImplementedError


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """torch.linspace(start, stop, num, dtype=float32), bit for bit: float32 ends and step, each
    value ``start + step·i`` (first half) or ``stop − step·(num−1−i)`` (second half) rounded once,
    as torch's CPU kernel computes it (checked against torch for many sizes and ranges)."""
    s32, e32 = np.float32(start), np.float32(stop)
    if num == 1:
        return np.array([s32], dtype=np.float32)
    step = float((e32 - s32) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    values = np.where(i < num // 2, float(s32) + step * i, float(e32) - step * (num - 1 - i))
    return values.astype(np.float32)


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """The squaredcos_cap_v2 (cosine) schedule of Nichol & Dhariwal, as diffusers builds it."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift sqrt(alpha_bar) so the last step has zero SNR."""
    alphas_bar_sqrt = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    a0, a_t = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - a_t) * (a0 / (a0 - a_t))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def betas_from_config(config: dict) -> np.ndarray:
    """β_t for t = 0..T-1 (float32, as diffusers' torch tensor) from the training-schedule keys."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    if trained is not None:
        return np.asarray(trained, dtype=np.float32)
    if schedule == "linear":
        return _linspace_f32(config["beta_start"], config["beta_end"], n)
    if schedule == "scaled_linear":
        return _linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    if schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(n)
    raise InvalidArgumentError(
        f"beta_schedule={schedule!r} is not supported (supported: linear, scaled_linear, squaredcos_cap_v2)"
    )


def alphas_cumprod_from_config(config: dict, zero_snr_floor: bool = False) -> np.ndarray:
    """ᾱ_t for t = 0..T-1 (float32) from the training-schedule keys of a scheduler config."""
    betas = betas_from_config(config)
    if config.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
    if config.get("rescale_betas_zero_snr") and zero_snr_floor:
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod
