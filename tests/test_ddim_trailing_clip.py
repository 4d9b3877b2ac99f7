"""Issue 13 item 8: DDIM with timestep_spacing="trailing" and clip_sample=True, 9 steps. On identical inputs
edgediff's step is diffusers' step: bit-equal wherever torch's scalar square roots are correctly rounded, within one
float32 ulp of a coefficient where torch's are not (benchmarks/results/ddim_trailing_clip.md: the image difference
of the whole pipeline is the clipped sampler amplifying float32 rounding, not our arithmetic)."""

import numpy as np
import pytest

from conftest import needs_torch
from edgediff.runtime import schedulers
from scheduler_harness import SD_BASE, assert_close_finite

CONFIG = dict(SD_BASE, _class_name="DDIMScheduler", timestep_spacing="trailing", clip_sample=True)
STEPS = 9


def _ours():
    sched = schedulers.resolve(CONFIG, {})
    return sched, sched.schedule(STEPS)


def _exact_sqrt(x) -> np.float32:
    return np.float32(np.sqrt(np.float64(x)))  # one rounding of the float64 root: the correctly rounded float32


def _inputs(sched, schedule, i: int, seed: int):
    """A sample and a model output whose x̂_0 is N(0, 1): about a third of it beyond ±1, clipped, at every step."""
    a_t, _, b_t, _, _ = sched._coefficients(schedule, i)
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    x0 = rng.standard_normal(sample.shape).astype(np.float32)
    return ((sample - a_t**0.5 * x0) / b_t**0.5).astype(np.float32), sample


def test_our_square_roots_are_correctly_rounded():
    """Every scalar root the step takes (√ᾱ_t, √(1−ᾱ_t), √ᾱ_prev, √(1−ᾱ_prev−σ²)) is the correctly rounded one."""
    sched, schedule = _ours()
    assert list(schedule.int_timesteps) == [999, 888, 777, 666, 555, 443, 332, 221, 110]
    for i in range(STEPS):
        a_t, a_prev, b_t, _, direction_sq = sched._coefficients(schedule, i)
        for x in (a_t, b_t, a_prev, direction_sq):
            assert isinstance(x, np.float32)
            assert x**0.5 == _exact_sqrt(x), f"step {i}: sqrt({x!r})"


@needs_torch
@pytest.mark.parametrize("seed", [0, 1])
def test_step_equals_diffusers_on_identical_inputs(seed):
    import diffusers
    import torch

    ref = diffusers.DDIMScheduler.from_config(CONFIG)
    ref.set_timesteps(STEPS)
    sched, schedule = _ours()
    exact_steps = 0
    for i, t in enumerate(ref.timesteps):
        model_output, sample = _inputs(sched, schedule, i, seed)
        a, _, b, _, _ = sched._coefficients(schedule, i)
        x0 = (sample - b**0.5 * model_output) / a**0.5
        assert 0.2 < np.mean(np.abs(x0) > 1) < 0.5, "the inputs must exercise both the clipped and the free values"
        want = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(sample)).prev_sample.numpy()
        got, _ = sched.step(schedule, i, model_output, sample)
        # diffusers' scalar roots: 0-d float32 tensors ** 0.5 (torch's sqrt), as in its step
        t_int, prev_t = int(t), int(t) - ref.config.num_train_timesteps // STEPS
        a_t = ref.alphas_cumprod[t_int]
        a_prev = ref.alphas_cumprod[prev_t] if prev_t >= 0 else ref.final_alpha_cumprod
        theirs = [np.float32((x**0.5).item()) for x in (a_t, 1 - a_t, a_prev, 1 - a_prev)]
        mine = [x**0.5 for x in np.array(sched._coefficients(schedule, i), np.float32)[[0, 2, 1, 4]]]
        if theirs == mine:
            exact_steps += 1
            np.testing.assert_array_equal(got, want, err_msg=f"step {i} (t={t_int}): same coefficients, not bit-equal")
        else:
            gaps = [abs(int(a.view(np.int32)) - int(b.view(np.int32))) for a, b in zip(theirs, mine)]
            assert max(gaps) == 1, f"step {i}: diffusers' square roots {theirs} against ours {mine}"
            scale = np.spacing(np.float32(max(1.0, float(np.abs(want).max()))))
            assert_close_finite(got, want, atol=2 * scale, err_msg=f"step {i} (t={t_int})")
    assert exact_steps >= 1  # torch 2.13 on x86_64: 6 of the 9 steps share every coefficient (t = 999 always)
