"""The pipeline's stages (prompt encoding, start latents, denoising loop, decoding) and the loop's one hook, on the
committed micro folder (no torch)."""

from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime import Pipeline
from edgediff.runtime.pipeline import StepHook, _Texts

MICRO = Path(__file__).parent / "fixtures" / "micro-sd1"


@pytest.fixture(scope="module")
def micro():
    with Pipeline.load(MICRO) as pipe:
        yield pipe


class _Spy:
    """Wraps the UNet engine: drops the channels a hook appended (the micro UNet has 4) and records them."""

    def __init__(self, engine):
        self.engine, self.inputs, self.extra = engine, engine.inputs, []

    def run(self, feeds):
        self.extra.append(feeds["sample"][:, 4:].copy())
        return self.engine.run({**feeds, "sample": feeds["sample"][:, :4]})


def _loop(pipe, hook, begin=0, steps=4):
    sched = pipe.default_scheduler
    schedule = sched.schedule(steps)
    timings: dict[str, float] = {}
    cond = pipe._encode_prompt(_Texts(["a red circle"], [""]), True, 1, timings)
    latents = np.random.RandomState(0).randn(1, 4, 16, 16).astype(np.float32)
    out, calls = pipe._denoise(sched, schedule, begin, latents, cond, 7.5, None, None, hook, timings)
    return out, calls, schedule


def test_hook_off_equals_no_hook_and_the_call_path(micro):
    """The stages chained by hand give the public call's image (same latents)."""
    latents = np.random.RandomState(0).randn(1, 4, 16, 16).astype(np.float32)
    want = micro("a red circle", num_inference_steps=4, latents=latents).images[0]
    out, _, schedule = _loop(micro, StepHook())
    got = micro._decode(out * np.float32(1.0), {})[0]  # PNDM's init_noise_sigma is 1
    assert schedule.init_noise_sigma == 1.0
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_hook_extra_channels_and_after_step(micro):
    seen = []

    def after(j, latents):
        seen.append(j)
        return latents * np.float32(0.5)

    extra = np.full((2, 5, 16, 16), 3.0, np.float32)  # 9-channel layout: mask ‖ masked latents, doubled for CFG
    spy = _Spy(micro.engines["unet"])
    original = micro.engines["unet"]
    micro.engines["unet"] = spy
    try:
        out, calls, schedule = _loop(micro, StepHook(extra_inputs=lambda j: extra, after_step=after), begin=2)
        plain, _, _ = _loop(micro, None, begin=2)
    finally:
        micro.engines["unet"] = original
    n = len(schedule.timesteps) - 2
    assert seen == list(range(n)) and len(calls) == n
    assert all(e.shape == (2, 5, 16, 16) and (e == 3.0).all() for e in spy.extra[:n])
    assert not np.allclose(out, plain)  # the blend hook changed the trajectory
