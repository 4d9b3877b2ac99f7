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
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgumentError

logger = logging.getLogger(__name__)

# Keys every diffusers scheduler config may carry that are not constructor arguments.
_META_KEYS = {"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"}


@dataclass(frozen=True)
class Plan:
    """The immutable result of ``Scheduler.plan(num_inference_steps)``.

    ``timesteps`` holds one value per UNet call (float32, what the UNet is fed); subclasses add
    the arrays their ``step`` needs. Nothing in a plan changes during sampling, so one plan may
    be shared by concurrent calls.
    """

    timesteps: np.ndarray
    init_noise_sigma: float


class Scheduler:
    """Base class. Subclasses set ``class_name``, ``defaults`` (diffusers' constructor defaults)
    and implement ``plan``, ``scale_model_input``, ``initial_state`` and ``step``.

    ``step(plan, i, model_output, sample, state, generator) -> (prev_sample, state)`` is a
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
        unknown = sorted(k for k in config if k not in self.defaults and k not in _META_KEYS)
        # Keys of other schedulers are normal when switching classes (diffusers ignores them too);
        # only keys no scheduler knows deserve a warning.
        from . import known_config_keys

        strange = [k for k in unknown if k not in known_config_keys()]
        if strange:
            logger.warning("%s: ignoring unknown scheduler config keys %s", self.class_name, strange)
        self.config = {k: config.get(k, v) for k, v in self.defaults.items()}
        for key, allowed in self.supported.items():
            if self.config.get(key) not in allowed:
                raise InvalidArgumentError(
                    f"{self.class_name}: {key}={self.config.get(key)!r} is not supported by edgediff "
                    f"(supported: {list(allowed)})"
                )
        self.alphas_cumprod = alphas_cumprod_from_config(self.config, self.zero_snr_floor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # Per-call options that diffusers passes to ``step`` and we take as constructor arguments
    # (DDIM's ``eta``); the pipeline forwards them only to classes that list them, as diffusers does.
    step_options: ClassVar[tuple[str, ...]] = ()
    # Which custom schedules ``plan`` accepts, as diffusers' ``set_timesteps`` does for this class.
    accepts_timesteps: ClassVar[bool] = False
    accepts_sigmas: ClassVar[bool] = False

    # -- interface -------------------------------------------------------------------------
    def plan(self, num_inference_steps: int | None = None, timesteps=None, sigmas=None) -> Plan:
        """The immutable schedule for one call: ``num_inference_steps``, or a custom list of
        ``timesteps`` / ``sigmas`` where the diffusers class accepts one."""
        raise NotImplementedError

    def _check_plan_args(self, num_inference_steps, timesteps=None, sigmas=None) -> None:
        """diffusers' rules: exactly one of the three; custom lists only where the class takes them."""
        given = [n for n, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                ("sigmas", sigmas)) if v is not None]  # fmt: skip
        if len(given) != 1:
            raise InvalidArgumentError(
                f"{self.class_name}: pass exactly one of num_inference_steps, timesteps or sigmas (got {given or 'none'})"
            )
        if timesteps is not None and not self.accepts_timesteps:
            raise InvalidArgumentError(f"{self.class_name} does not accept custom timesteps (as in diffusers)")
        if sigmas is not None and not self.accepts_sigmas:
            raise InvalidArgumentError(f"{self.class_name} does not accept custom sigmas (as in diffusers)")
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
            or num_inference_steps < 1
        ):  # fmt: skip
            raise InvalidArgumentError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
            if values is not None and len(values) < (2 if name == "sigmas" else 1):
                raise InvalidArgumentError(f"custom {name} must not be empty")

    def scale_model_input(self, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
        return sample

    def initial_state(self, plan: Plan) -> Any:
        return None

    def step(self, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any, generator=None):
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


def alphas_cumprod_from_config(config: dict, zero_snr_floor: bool = False) -> np.ndarray:
    """ᾱ_t for t = 0..T-1 (float32) from the training-schedule keys of a scheduler config."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float32)
    elif schedule == "linear":
        betas = _linspace_f32(config["beta_start"], config["beta_end"], n)
    elif schedule == "scaled_linear":
        betas = _linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise InvalidArgumentError(
            f"beta_schedule={schedule!r} is not supported (supported: linear, scaled_linear, squaredcos_cap_v2)"
        )
    if config.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
    if config.get("rescale_betas_zero_snr") and zero_snr_floor:
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod
