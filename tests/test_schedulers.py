"""Each numpy scheduler against its diffusers class, driven with the same model outputs (and the
same noise), compared at every step (tolerance in scheduler_harness)."""

import itertools

import pytest

from conftest import needs_torch
from edgediff.runtime import schedulers
from edgediff.runtime.errors import UnknownSchedulerError
from scheduler_harness import (
    PREDICTIONS,
    SD_BASE,
    SPACINGS,
    STEPS,
    assert_close_finite,
    assert_equal_finite,
    assert_refused_where_diffusers_breaks,
    drive,
)  # fmt: skip


@needs_torch
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_zero_snr_floor(cls):
    import diffusers

    cfg = dict(SD_BASE, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    ref = getattr(diffusers, cls).from_config(cfg).alphas_cumprod.numpy()
    ours = schedulers.resolve(dict(cfg, _class_name=cls), {}).alphas_cumprod
    assert_close_finite(ours, ref, rtol=2e-6, atol=1e-9)
    assert ours[-1] == 2.0**-24


@needs_torch
@pytest.mark.parametrize("steps,pred,spacing", list(itertools.product(STEPS, PREDICTIONS, SPACINGS)))
def test_pndm(steps, pred, spacing):
    from diffusers import PNDMScheduler

    drive(PNDMScheduler, {"prediction_type": pred, "timestep_spacing": spacing}, steps)


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

    overrides = {
        "prediction_type": pred,
        "timestep_spacing": spacing,
        "clip_sample": clip,
        "set_alpha_to_one": alpha_one,
    }
    drive(DDIMScheduler, overrides, steps, step_kwargs={"eta": eta} if eta else None)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,karras,final",
    list(itertools.product(STEPS, [*PREDICTIONS, "sample"], SPACINGS, [False, True], ["zero", "sigma_min"])),
)
def test_euler(steps, pred, spacing, karras, final):
    from diffusers import EulerDiscreteScheduler

    overrides = {"prediction_type": pred, "timestep_spacing": spacing, "use_karras_sigmas": karras,
                 "final_sigmas_type": final}  # fmt: skip
    drive(EulerDiscreteScheduler, overrides, steps)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,karras,order,solver,lower_final,final",
    [
        (s, p, sp, k, o, so, lf, f)
        for s, p, sp, k in itertools.product(STEPS, [*PREDICTIONS, "sample"], SPACINGS, [False, True])
        for o, so, lf, f in [
            (2, "midpoint", True, "zero"),
            (2, "heun", False, "sigma_min"),
            (1, "midpoint", True, "zero"),
        ]
    ],
)
def test_dpmpp_2m(steps, pred, spacing, karras, order, solver, lower_final, final):
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"prediction_type": pred, "timestep_spacing": spacing, "use_karras_sigmas": karras,
                 "solver_order": order, "solver_type": solver, "lower_order_final": lower_final,
                 "final_sigmas_type": final}  # fmt: skip
    if karras and solver == "heun" and final == "sigma_min" and steps >= 2:
        # Karras σ end at σ_min: the last step is zero-length and its heun update 0/0 (these 36 cases used to pass
        # as NaN == NaN); refused, and diffusers is NaN there
        fragment = "final_sigmas_type='sigma_min' with use_karras_sigmas=True"
        msg = assert_refused_where_diffusers_breaks(DPMSolverMultistepScheduler, overrides, steps, fragment)
        assert "solver_type='heun' update" in msg and "euler_at_final=True" in msg
        assert ("lower_order_final=True" in msg) == (steps < 15)
    else:
        drive(DPMSolverMultistepScheduler, overrides, steps)


@needs_torch
def test_alphas_cumprod_match_diffusers():
    from diffusers import DDIMScheduler

    for overrides in ({}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                      {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}):  # fmt: skip
        ref = DDIMScheduler.from_config(dict(SD_BASE, **overrides)).alphas_cumprod.numpy()
        ours = schedulers.resolve(dict(SD_BASE, _class_name="DDIMScheduler", **overrides), {}).alphas_cumprod
        if overrides.get("rescale_betas_zero_snr"):
            assert_close_finite(ours, ref, rtol=4e-6, atol=1e-9)  # torch's float32 sqrt is not always exact
        else:
            assert_equal_finite(ours, ref)  # bit for bit


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
    with pytest.raises(UnknownSchedulerError, match=r"known: .*euler.*dpmpp_2m_karras"):
        schedulers.resolve("eulerish", SD_BASE)


def test_pipeline_corrections_match_diffusers():
    fixed = schedulers.apply_pipeline_corrections({"steps_offset": 0, "clip_sample": True})
    assert fixed == {"steps_offset": 1, "clip_sample": False}


@needs_torch
def test_custom_timesteps_and_sigmas():
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    drive(EulerDiscreteScheduler, {}, timesteps=[999, 850, 600, 420.5, 200, 10])
    drive(EulerDiscreteScheduler, {}, sigmas=[14.6, 7.0, 3.1, 1.0, 0.3, 0.0])
    drive(DPMSolverMultistepScheduler, {}, timesteps=[999, 800, 600, 400, 200, 1])


def test_custom_schedule_rules():
    from edgediff.runtime.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="does not accept custom timesteps"):
        schedulers.resolve("ddim", SD_BASE).schedule(timesteps=[900, 500])
    with pytest.raises(InvalidArgumentError, match="exactly one of"):
        schedulers.resolve("euler", SD_BASE).schedule(4, timesteps=[900, 500])
