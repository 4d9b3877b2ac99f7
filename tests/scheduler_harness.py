"""Drive an edgediff scheduler and its diffusers class with the same model outputs and the same
noise; compare the schedule and every step.

Tolerance: |ours - diffusers| <= 2e-5 * max(1, max|sample|) at every step: float32 rounding
(diffusers computes in float32 with torch, we in float32 with numpy; betas differ by <= 1 ulp).
Noise: diffusers gets torch.Generator("cpu").manual_seed(seed), we get TorchCPUGenerator(seed), so
the per-step noise of stochastic schedulers is the same stream drawn in the same order.
Every comparison asserts that both sides are finite first (``assert_close_finite``): NaN == NaN in
``assert_allclose``. A configuration diffusers turns into NaN is refused by edgediff instead:
``assert_refused_where_diffusers_breaks`` checks both halves of that.
"""

from __future__ import annotations

import inspect

import numpy as np

from edgediff.runtime import schedulers
from edgediff.runtime.rng import TorchCPUGenerator

# SD 1.x's scheduler config (after StableDiffusionPipeline's load-time corrections)
SD_BASE = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
STEPS = [1, 2, 4, 7, 20]
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = ["leading", "linspace", "trailing"]


def assert_close_finite(got, want, *, atol: float = 0.0, rtol: float = 0.0, err_msg: str = "") -> None:
    """``np.testing.assert_allclose`` after asserting that both sides are finite: assert_allclose treats NaN as
    equal to NaN (and inf as equal to inf), so a configuration that breaks both sides would otherwise pass."""
    got, want = np.asarray(got), np.asarray(want)
    where = f" ({err_msg})" if err_msg else ""
    for side, values in (("the reference", want), ("the result", got)):
        bad = np.count_nonzero(~np.isfinite(values))
        assert bad == 0, f"{side} is not finite{where}: {bad} values"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_equal_finite(got, want, err_msg: str = "") -> None:
    """``np.testing.assert_array_equal`` after asserting that both sides are finite (NaN == NaN there too)."""
    assert_close_finite(got, want, err_msg=err_msg)


def drive(diffusers_cls, overrides: dict, steps=None, seed: int = 0, step_kwargs: dict | None = None,
          timesteps=None, sigmas=None, base: dict | None = None, atol: float = 2e-5, ours_cls=None):  # fmt: skip
    """Run both schedulers; assert schedule and every step agree. Returns our final sample.

    ``step_kwargs`` go to diffusers' ``step`` (e.g. ``eta`` for DDIM); edgediff takes the same
    keys through its config (``{"eta": 0.5}`` in the scheduler dict). ``ours_cls``: instantiate
    this edgediff class directly instead of resolving ``diffusers_cls.__name__`` in the registry.
    """
    import torch

    step_kwargs = dict(step_kwargs or {})
    base = dict(SD_BASE if base is None else base, **overrides)
    ref = diffusers_cls.from_config(base)
    if ours_cls is not None:
        ours = ours_cls(**{k: v for k, v in base.items() if not k.startswith("_")}, **step_kwargs)
    else:
        ours = schedulers.resolve(dict(base, _class_name=diffusers_cls.__name__, **step_kwargs), {})
    set_kwargs = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
    ref.set_timesteps(steps, **set_kwargs) if steps is not None else ref.set_timesteps(**set_kwargs)
    schedule = ours.schedule(steps, **set_kwargs)
    want_t = ref.timesteps.numpy().astype(np.float32)
    assert_close_finite(schedule.timesteps, want_t, atol=1e-3, err_msg="timesteps differ")
    assert abs(schedule.init_noise_sigma - float(ref.init_noise_sigma)) <= 1e-6 * max(1.0, schedule.init_noise_sigma)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 4, 8, 8)) * schedule.init_noise_sigma).astype(np.float32)
    xr = torch.from_numpy(x.copy())
    state = ours.initial_state(schedule)
    g_ref = torch.Generator("cpu").manual_seed(seed)
    g_ours = TorchCPUGenerator(seed)
    accepted = inspect.signature(ref.step).parameters
    for i, t in enumerate(ref.timesteps):
        scaled = ours.scale_model_input(schedule, i, x)
        scaled_ref = ref.scale_model_input(xr, t)
        in_scale = max(1.0, float(np.abs(scaled_ref.numpy()).max()))
        assert_close_finite(scaled, scaled_ref.numpy(), atol=atol * in_scale, err_msg=f"scale_model_input {i}")
        out = rng.standard_normal(x.shape).astype(np.float32)  # stand-in model output
        kwargs = {k: v for k, v in step_kwargs.items() if k in accepted}
        if "generator" in accepted:
            kwargs["generator"] = g_ref
        xr = ref.step(torch.from_numpy(out), t, xr, **kwargs).prev_sample
        x, state = ours.step(schedule, i, out, x, state, g_ours)
        assert x.dtype == np.float32 and x.shape == xr.shape
        scale = max(1.0, float(np.abs(xr.numpy()).max()))
        assert_close_finite(x, xr.numpy(), atol=atol * scale, err_msg=f"step {i} (t={float(t)})")
    return x


def refusal(class_name: str, overrides: dict, steps: int, base: dict | None = None) -> str | None:
    """edgediff's InvalidArgumentError message for this configuration (construction or schedule), None if accepted.
    ``overrides`` may hold ``eta`` (a DDIM step option, a config key here)."""
    from edgediff.runtime.errors import InvalidArgumentError

    cfg = dict(SD_BASE if base is None else base, **overrides, _class_name=class_name)
    try:
        schedulers.resolve(cfg, {}).schedule(steps)
    except InvalidArgumentError as e:
        return str(e)
    return None


def diffusers_breaks(diffusers_cls, overrides: dict, steps: int, base: dict | None = None, seed: int = 0) -> bool:
    """Whether diffusers' scheduler returns a non-finite sample at some step (stand-in model outputs)."""
    import torch

    cfg = dict(SD_BASE if base is None else base, **{k: v for k, v in overrides.items() if k != "eta"})
    ref = diffusers_cls.from_config(cfg)
    ref.set_timesteps(steps)
    gen = torch.Generator("cpu").manual_seed(seed)
    kwargs = {"eta": overrides["eta"]} if "eta" in overrides else {}
    if "generator" in inspect.signature(ref.step).parameters:
        kwargs["generator"] = gen
    x = torch.randn(1, 4, 8, 8, generator=gen) * ref.init_noise_sigma
    for t in ref.timesteps:
        ref.scale_model_input(x, t)  # the UNet's input; some classes insist it is called
        x = ref.step(torch.randn(1, 4, 8, 8, generator=gen), t, x, **kwargs).prev_sample
        if not torch.isfinite(x).all():
            return True
    return False


def assert_refused_where_diffusers_breaks(diffusers_cls, overrides: dict, steps: int, fragment: str,
                                          base: dict | None = None) -> str:  # fmt: skip
    """edgediff refuses the configuration naming ``fragment`` and, given the diffusers class (not just its name,
    as torch-free tests pass), diffusers really returns NaN/inf there: the oracle justifies the refusal."""
    name = diffusers_cls if isinstance(diffusers_cls, str) else diffusers_cls.__name__
    message = refusal(name, overrides, steps, base)
    assert message is not None, f"{name} {overrides} at {steps} steps: accepted, but diffusers breaks there"
    assert fragment in message and "NaN" in message, message
    if not isinstance(diffusers_cls, str):
        assert diffusers_breaks(diffusers_cls, overrides, steps, base), f"{name} {overrides}: finite in diffusers"
    return message
