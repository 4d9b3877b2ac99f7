"""Each numpy scheduler against its diffusers class, driven with the same model outputs (and the
same noise), compared at every step.

Tolerance: |ours - diffusers| <= 2e-5 * max(1, max|sample|) at every step: float32 rounding
(diffusers computes in float32 with torch, we in float32 with numpy; betas differ by <= 1 ulp).
"""

import inspect
import itertools

import numpy as np
import pytest
from conftest import needs_torch

from edgediff.runtime import schedulers
from edgediff.runtime.errors import UnknownSchedulerError
from edgediff.runtime.rng import TorchCPUGenerator

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


def _drive(name_or_cfg, diffusers_cls, overrides, steps, seed=0, eta=None):
    import torch

    base = dict(SD_BASE, **overrides)
    ref = diffusers_cls.from_config(base)
    ours = schedulers.resolve(dict(base, _class_name=diffusers_cls.__name__, **({"eta": eta} if eta else {})), {})
    ref.set_timesteps(steps)
    plan = ours.plan(steps)
    np.testing.assert_allclose(plan.timesteps, ref.timesteps.numpy().astype(np.float32), rtol=0, atol=1e-3)
    assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 4, 8, 8)) * plan.init_noise_sigma).astype(np.float32)
    xr = torch.from_numpy(x.copy())
    state = ours.initial_state(plan)
    g_ref = torch.Generator("cpu").manual_seed(seed)
    g_ours = TorchCPUGenerator(seed)
    for i, t in enumerate(ref.timesteps):
        scaled = ours.scale_model_input(plan, i, x)
        scaled_ref = ref.scale_model_input(xr, t)
        np.testing.assert_allclose(scaled, scaled_ref.numpy(), rtol=2e-5, atol=2e-5)
        out = rng.standard_normal(x.shape).astype(np.float32)  # stand-in model output
        kwargs = {"eta": eta} if eta else {}
        if "generator" in inspect.signature(ref.step).parameters:
            kwargs["generator"] = g_ref
        xr = ref.step(torch.from_numpy(out), t, xr, **kwargs).prev_sample
        x, state = ours.step(plan, i, out, x, state, g_ours)
        scale = max(1.0, float(np.abs(xr.numpy()).max()))
        np.testing.assert_allclose(x, xr.numpy(), rtol=0, atol=2e-5 * scale, err_msg=f"step {i} (t={float(t)})")
    return x


@needs_torch
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_zero_snr_floor(cls):
    import diffusers

    cfg = dict(SD_BASE, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    ref = getattr(diffusers, cls).from_config(cfg).alphas_cumprod.numpy()
    ours = schedulers.resolve(dict(cfg, _class_name=cls), {}).alphas_cumprod
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-9)
    assert ours[-1] == 2.0**-24


@needs_torch
@pytest.mark.parametrize("steps,pred,spacing", list(itertools.product(STEPS, PREDICTIONS, SPACINGS)))
def test_pndm(steps, pred, spacing):
    from diffusers import PNDMScheduler

    _drive("pndm", PNDMScheduler, {"prediction_type": pred, "timestep_spacing": spacing}, steps)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,clip,alpha_one,eta",
    [
        (s, p, sp, c, a, e)
        for s, p, sp in itertools.product(STEPS, [*PREDICTIONS, "sample"], SPACINGS)
        for c, a, e in [(False, False, None), (True, True, None), (False, False, 0.7)]
    ],
)
def test_ddim(steps, pred, spacing, clip, alpha_one, eta):
    from diffusers import DDIMScheduler

    overrides = {"prediction_type": pred, "timestep_spacing": spacing, "clip_sample": clip, "set_alpha_to_one": alpha_one}
    _drive("ddim", DDIMScheduler, overrides, steps, eta=eta)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,karras,final",
    list(itertools.product(STEPS, [*PREDICTIONS, "sample"], SPACINGS, [False, True], ["zero", "sigma_min"])),
)
def test_euler(steps, pred, spacing, karras, final):
    from diffusers import EulerDiscreteScheduler

    overrides = {"prediction_type": pred, "timestep_spacing": spacing, "use_karras_sigmas": karras,
                 "final_sigmas_type": final}  # fmt: skip
    _drive("euler", EulerDiscreteScheduler, overrides, steps)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,karras,order,solver,lower_final,final",
    [
        (s, p, sp, k, o, so, lf, f)
        for s, p, sp, k in itertools.product(STEPS, [*PREDICTIONS, "sample"], SPACINGS, [False, True])
        for o, so, lf, f in [(2, "midpoint", True, "zero"), (2, "heun", False, "sigma_min"), (1, "midpoint", True, "zero")]
    ],
)
def test_dpmpp_2m(steps, pred, spacing, karras, order, solver, lower_final, final):
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"prediction_type": pred, "timestep_spacing": spacing, "use_karras_sigmas": karras,
                 "solver_order": order, "solver_type": solver, "lower_order_final": lower_final,
                 "final_sigmas_type": final}  # fmt: skip
    _drive("dpmpp_2m", DPMSolverMultistepScheduler, overrides, steps)


@needs_torch
def test_alphas_cumprod_match_diffusers():
    from diffusers import DDIMScheduler

    for overrides in ({}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                      {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}):  # fmt: skip
        ref = DDIMScheduler.from_config(dict(SD_BASE, **overrides)).alphas_cumprod.numpy()
        ours = schedulers.resolve(dict(SD_BASE, _class_name="DDIMScheduler", **overrides), {}).alphas_cumprod
        np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-9)


def test_names_resolve():
    assert type(schedulers.resolve("euler", SD_BASE)).__name__ == "EulerDiscrete"
    assert type(schedulers.resolve("EulerDiscreteScheduler", SD_BASE)).__name__ == "EulerDiscrete"
    s = schedulers.resolve("dpmpp_2m_karras", SD_BASE)
    assert s.config["use_karras_sigmas"] is True and s.class_name == "DPMSolverMultistepScheduler"
    s = schedulers.resolve({"_class_name": "DDIMScheduler", "timestep_spacing": "trailing"}, SD_BASE)
    assert s.config["timestep_spacing"] == "trailing" and s.config["beta_schedule"] == "scaled_linear"
    # the model's own class when no name is given; class defaults fill missing keys as in diffusers
    assert schedulers.resolve(None, SD_BASE).class_name == "PNDMScheduler"
    assert schedulers.resolve("euler", SD_BASE).config["timestep_spacing"] == "linspace"


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownSchedulerError, match="known: .*euler.*dpmpp_2m_karras"):
        schedulers.resolve("eulerish", SD_BASE)


def test_pipeline_corrections_match_diffusers():
    fixed = schedulers.apply_pipeline_corrections({"steps_offset": 0, "clip_sample": True})
    assert fixed == {"steps_offset": 1, "clip_sample": False}
