"""DDPM and LCM (numpy) against diffusers' DDPMScheduler and LCMScheduler, driven with the same
model outputs and the same torch-stream noise, compared at every step (tolerance in
scheduler_harness)."""

import inspect
import itertools

import numpy as np
import pytest

from conftest import HAS_TORCH, needs_torch
from edgediff.runtime.errors import InvalidArgumentError
from edgediff.runtime.rng import TorchCPUGenerator
from edgediff.runtime.schedulers.ddpm import DDPM
from edgediff.runtime.schedulers.lcm import LCM
from scheduler_harness import (
    SD_BASE,
    SPACINGS,
    STEPS,
    assert_equal_finite,
    assert_refused_where_diffusers_breaks,
    drive,
    refusal,
)  # fmt: skip

PREDS = ["epsilon", "v_prediction", "sample"]
SEEDS = [0, 1, 1234]

# (variance_type, clip_sample, clip_sample_range, steps_offset)
DDPM_OPTIONS = [
    ("fixed_small", False, 1.0, 1),
    ("fixed_small_log", True, 1.0, 1),
    ("fixed_large", True, 0.5, 0),  # steps_offset 0: leading/linspace end at t = 0 (no noise drawn)
]


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,opts",
    list(itertools.product(STEPS, PREDS, SPACINGS, DDPM_OPTIONS)),
)
def test_ddpm_grid(steps, pred, spacing, opts):
    from diffusers import DDPMScheduler

    variance, clip, clip_range, offset = opts
    overrides = {"prediction_type": pred, "timestep_spacing": spacing, "variance_type": variance,
                 "clip_sample": clip, "clip_sample_range": clip_range, "steps_offset": offset}  # fmt: skip
    seed = SEEDS[(steps + len(pred) + len(spacing)) % len(SEEDS)]
    drive(DDPMScheduler, overrides, steps, seed=seed, ours_cls=DDPM)


@needs_torch
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "timesteps",
    [[999, 850, 600, 420, 200, 10], [900, 700, 300, 1, 0], [500], [0], [999, 420.7, 3]],
)
def test_ddpm_custom_timesteps(timesteps, seed):
    from diffusers import DDPMScheduler

    drive(DDPMScheduler, {}, timesteps=timesteps, seed=seed, ours_cls=DDPM)
    drive(DDPMScheduler, {"variance_type": "fixed_large", "prediction_type": "v_prediction"},
          timesteps=timesteps, seed=seed, ours_cls=DDPM)  # fmt: skip


@needs_torch
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_ddpm_diffusers_defaults(steps):
    """DDPMScheduler's own defaults (linear betas, clip_sample on, steps_offset 0)."""
    from diffusers import DDPMScheduler

    drive(DDPMScheduler, {}, steps, seed=steps, base={}, ours_cls=DDPM)


@needs_torch
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_ddpm_zero_snr_and_cosine(steps):
    from diffusers import DDPMScheduler

    drive(DDPMScheduler, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                          "prediction_type": "v_prediction"}, steps, ours_cls=DDPM)  # fmt: skip
    drive(DDPMScheduler, {"beta_schedule": "squaredcos_cap_v2"}, steps, base={}, ours_cls=DDPM)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "LCMScheduler"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_zero_snr_epsilon_refused(name, spacing):
    """These classes keep ᾱ_T = 0 under zero-SNR rescaling, and an epsilon prediction at t = T − 1 divides by
    sqrt(ᾱ_T) = 0 (inf/NaN in diffusers, checked with torch). v_prediction or clip_sample is accepted and matches;
    so is epsilon on a schedule that never reaches t = T − 1."""
    cls = name
    if HAS_TORCH:
        import diffusers

        cls = getattr(diffusers, name)
    overrides = {"rescale_betas_zero_snr": True, "timestep_spacing": spacing, "prediction_type": "epsilon",
                 "clip_sample": False}  # fmt: skip
    msg = assert_refused_where_diffusers_breaks(cls, overrides, 4, "makes alphas_cumprod 0 at timestep 999")
    assert "prediction_type='v_prediction'" in msg and "clip_sample=True" in msg
    ours = {"DDIMScheduler": None, "DDPMScheduler": DDPM, "LCMScheduler": LCM}[name]
    for fix in ({"prediction_type": "v_prediction"}, {"clip_sample": True}):
        if HAS_TORCH:
            drive(cls, {**overrides, **fix}, 4, ours_cls=ours)
    leading = {**overrides, "timestep_spacing": "leading"}  # 751, 501, 251, 1 with SD's steps_offset
    if name != "LCMScheduler":  # LCM's schedule always starts at T − 1
        if HAS_TORCH:
            drive(cls, leading, 4, ours_cls=ours)
        else:
            assert refusal(name, leading, 4) is None


# (original_inference_steps, timestep_scaling, clip_sample, clip_sample_range, set_alpha_to_one)
LCM_OPTIONS = [
    (50, 10.0, False, 1.0, False),
    (50, 5.0, True, 1.5, True),
    (25, 10.0, False, 1.0, True),
    (8, 0.3, True, 1.0, False),
]


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,opts",
    [(s, p, o) for s, p, o in itertools.product(STEPS, PREDS, LCM_OPTIONS) if s <= o[0]],
)
def test_lcm_grid(steps, pred, opts):
    from diffusers import LCMScheduler

    orig, scaling, clip, clip_range, alpha_one = opts
    overrides = {"prediction_type": pred, "original_inference_steps": orig, "timestep_scaling": scaling,
                 "clip_sample": clip, "clip_sample_range": clip_range, "set_alpha_to_one": alpha_one}  # fmt: skip
    seed = SEEDS[(steps + len(pred) + orig) % len(SEEDS)]
    drive(LCMScheduler, overrides, steps, seed=seed, ours_cls=LCM)


@needs_torch
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "timesteps",
    [[999, 749, 499, 249], [999, 759, 499, 259], [999, 500, 123], [999], [800, 400.9, 0]],
)
def test_lcm_custom_timesteps(timesteps, seed):
    from diffusers import LCMScheduler

    drive(LCMScheduler, {}, timesteps=timesteps, seed=seed, ours_cls=LCM)
    drive(LCMScheduler, {"prediction_type": "v_prediction"}, timesteps=timesteps, seed=seed, ours_cls=LCM)


@needs_torch
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_lcm_diffusers_defaults_and_zero_snr(steps):
    from diffusers import LCMScheduler

    drive(LCMScheduler, {}, steps, seed=steps, base={}, ours_cls=LCM)
    drive(LCMScheduler, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, steps, ours_cls=LCM)


@needs_torch
@pytest.mark.parametrize("orig,steps", [(50, 4), (50, 50), (100, 7), (1000, 20), (3, 2), (7, 7)])
def test_lcm_original_steps_argument(orig, steps):
    """``schedule(..., original_inference_steps=)`` as diffusers' ``set_timesteps`` argument."""
    from diffusers import LCMScheduler

    ref = LCMScheduler.from_config(SD_BASE)
    ref.set_timesteps(steps, original_inference_steps=orig)
    schedule = LCM(**SD_BASE).schedule(steps, original_inference_steps=orig)
    assert_equal_finite(schedule.timesteps, ref.timesteps.numpy().astype(np.float32))


def test_lcm_schedule_vectors():
    assert LCM().schedule(4).timesteps.tolist() == [999, 759, 499, 259]
    assert LCM().schedule(1).timesteps.tolist() == [999]


def test_ddpm_schedule_vectors():
    assert DDPM(steps_offset=1).schedule(4).timesteps.tolist() == [751, 501, 251, 1]
    assert DDPM(timestep_spacing="trailing").schedule(4).timesteps.tolist() == [999, 749, 499, 249]
    assert DDPM(timestep_spacing="trailing").schedule(4).prev_timesteps.tolist() == [749, 499, 249, -1]


@needs_torch
@pytest.mark.parametrize("ours,name", [(DDPM, "DDPMScheduler"), (LCM, "LCMScheduler")])
def test_defaults_are_diffusers_defaults(ours, name):
    import diffusers

    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    ref = {k: p.default for k, p in params.items() if k != "self"}
    assert ours.defaults == ref
    assert ours.class_name == name


@pytest.mark.parametrize(
    "cls,key,value",
    [(DDPM, "variance_type", "learned"), (DDPM, "variance_type", "learned_range"),
     (DDPM, "variance_type", "fixed_large_log"), (DDPM, "thresholding", True), (DDPM, "prediction_type", "flow"),
     (DDPM, "timestep_spacing", "karras"), (LCM, "thresholding", True), (LCM, "prediction_type", "flow")],
)  # fmt: skip
def test_unsupported_options_raise(cls, key, value):
    with pytest.raises(InvalidArgumentError, match=key):
        cls(**{key: value})


def test_schedule_argument_errors():
    with pytest.raises(InvalidArgumentError, match="descending"):
        DDPM().schedule(timesteps=[500, 700])
    with pytest.raises(InvalidArgumentError, match="start below"):
        DDPM().schedule(timesteps=[1000, 10])
    with pytest.raises(InvalidArgumentError, match="negative"):
        DDPM().schedule(timesteps=[10, -1])
    with pytest.raises(InvalidArgumentError, match="exceed"):
        DDPM().schedule(1001)
    with pytest.raises(InvalidArgumentError, match="exactly one of"):
        DDPM().schedule(4, timesteps=[900, 500])
    with pytest.raises(InvalidArgumentError, match="original_inference_steps=50"):
        LCM().schedule(51)
    with pytest.raises(InvalidArgumentError, match="original_inference_steps must be"):
        LCM().schedule(4, original_inference_steps=0)
    with pytest.raises(InvalidArgumentError, match="descending"):
        LCM().schedule(timesteps=[999, 999])
    with pytest.raises(InvalidArgumentError, match="repeat"):
        LCM().schedule(timesteps=[999, 500.7, 500.2])
    with pytest.raises(InvalidArgumentError, match="custom sigmas"):
        LCM().schedule(sigmas=[1.0, 0.0])


def test_generator_needed_only_for_noise():
    x = np.ones((1, 4, 8, 8), np.float32)
    # DDPM: noise for t > 0 only; LCM: noise on every step but the last
    ddpm, lcm = DDPM(clip_sample=False), LCM()
    p = ddpm.schedule(timesteps=[0])
    out, _ = ddpm.step(p, 0, x, x, None, None)
    assert out.dtype == np.float32
    with pytest.raises(InvalidArgumentError, match="generator"):
        ddpm.step(ddpm.schedule(2), 0, x, x, None, None)
    p = lcm.schedule(2)
    with pytest.raises(InvalidArgumentError, match="generator"):
        lcm.step(p, 0, x, x, None, None)
    out, _ = lcm.step(p, 1, x, x, None, None)
    assert out.dtype == np.float32
    out, _ = lcm.step(p, 0, x, x, None, TorchCPUGenerator(0))
    assert out.dtype == np.float32 and out.shape == x.shape
