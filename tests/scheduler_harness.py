"""Drive an edgediff scheduler and its diffusers class with the same model outputs and the same
noise; compare the schedule and every step.

Tolerance: |ours - diffusers| <= 2e-5 * max(1, max|sample|) at every step: float32 rounding
(diffusers computes in float32 with torch, we in float32 with numpy; betas differ by <= 1 ulp).
Noise: diffusers gets torch.Generator("cpu").manual_seed(seed), we get TorchCPUGenerator(seed), so
the per-step noise of stochastic schedulers is the same stream drawn in the same order.
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
    plan = ours.plan(steps, **set_kwargs)
    np.testing.assert_allclose(plan.timesteps, ref.timesteps.numpy().astype(np.float32), rtol=0, atol=1e-3,
                               err_msg="timesteps differ")  # fmt: skip
    assert abs(plan.init_noise_sigma - float(ref.init_noise_sigma)) <= 1e-6 * max(1.0, plan.init_noise_sigma)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 4, 8, 8)) * plan.init_noise_sigma).astype(np.float32)
    xr = torch.from_numpy(x.copy())
    state = ours.initial_state(plan)
    g_ref = torch.Generator("cpu").manual_seed(seed)
    g_ours = TorchCPUGenerator(seed)
    accepted = inspect.signature(ref.step).parameters
    for i, t in enumerate(ref.timesteps):
        scaled = ours.scale_model_input(plan, i, x)
        scaled_ref = ref.scale_model_input(xr, t)
        in_scale = max(1.0, float(np.abs(scaled_ref.numpy()).max()))
        np.testing.assert_allclose(scaled, scaled_ref.numpy(), rtol=0, atol=atol * in_scale, err_msg=f"scale_model_input {i}")
        out = rng.standard_normal(x.shape).astype(np.float32)  # stand-in model output
        kwargs = {k: v for k, v in step_kwargs.items() if k in accepted}
        if "generator" in accepted:
            kwargs["generator"] = g_ref
        xr = ref.step(torch.from_numpy(out), t, xr, **kwargs).prev_sample
        x, state = ours.step(plan, i, out, x, state, g_ours)
        assert x.dtype == np.float32 and x.shape == xr.shape
        scale = max(1.0, float(np.abs(xr.numpy()).max()))
        np.testing.assert_allclose(x, xr.numpy(), rtol=0, atol=atol * scale, err_msg=f"step {i} (t={float(t)})")
    return x
