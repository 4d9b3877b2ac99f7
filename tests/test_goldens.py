"""Torch-free tests: edgediff against arrays recorded from diffusers / torch / transformers by
tests/tools/record_goldens.py. These run with the lean runtime alone (no torch installed).

Tolerances: whole images within 1/255 per pixel; scheduler steps within 2e-5 relative to the
sample's magnitude (float32 rounding); RNG within 1e-5 relative; tokenizer ids exact.
"""

from pathlib import Path

import numpy as np
import pytest
from golden_cases import (
    PIPELINE_KW,
    PIPELINE_PROMPTS,
    PIPELINE_SEED,
    RNG_CASES,
    SCHEDULER_NAMES,
    TOKENIZER_PROMPTS,
    edgediff_spec,
)
from scheduler_harness import SD_BASE
from tools.record_goldens import SCHED_PREDICTIONS, SCHED_STEPS, stand_in_outputs

from edgediff.runtime import Pipeline, schedulers
from edgediff.runtime.rng import TorchCPUGenerator
from edgediff.runtime.tokenizer import ClipTokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def goldens():
    return dict(np.load(FIXTURES / "goldens.npz"))


@pytest.fixture(scope="module")
def micro():
    return {v: Pipeline.load(FIXTURES / f"micro-{v}") for v in ("sd1", "sd2")}


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
def test_seeded_image_equals_diffusers(goldens, micro, variant, name):
    result = micro[variant](PIPELINE_PROMPTS, seed=PIPELINE_SEED, scheduler=edgediff_spec(name), **PIPELINE_KW)
    got = np.stack([np.asarray(im) for im in result.images]).astype(np.int16)
    want = goldens[f"image/{variant}/{name}"].astype(np.int16)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1, f"{variant} {name}: max {np.abs(got - want).max()}/255"


@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
@pytest.mark.parametrize("pred", SCHED_PREDICTIONS)
@pytest.mark.parametrize("steps", SCHED_STEPS)
def test_scheduler_steps_equal_diffusers(goldens, name, pred, steps):
    key = f"sched/{name}/{pred}/{steps}"
    cls_name, overrides = SCHEDULER_NAMES[name]
    sched = schedulers.resolve(dict(SD_BASE, _class_name=cls_name, prediction_type=pred, **overrides), {})
    plan = sched.plan(steps)
    np.testing.assert_allclose(plan.timesteps, goldens[f"{key}/timesteps"], rtol=0, atol=1e-3)
    x0, outs = stand_in_outputs(steps, len(plan.timesteps))
    x = x0 * np.float32(plan.init_noise_sigma)
    state, g = sched.initial_state(plan), TorchCPUGenerator(steps)
    for i, (out, want) in enumerate(zip(outs, goldens[f"{key}/samples"])):
        x, state = sched.step(plan, i, out, x, state, g)
        np.testing.assert_allclose(x, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())), err_msg=f"step {i}")


def test_rng_equals_torch(goldens):
    gens: dict = {}
    for seed, shape in RNG_CASES:
        g = gens.setdefault(seed, TorchCPUGenerator(seed))
        want = goldens[f"rng/{seed}/{'x'.join(map(str, shape))}"]
        np.testing.assert_allclose(g.randn(shape), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_tokenizer_equals_clip_tokenizer(goldens, variant):
    folder = FIXTURES / f"micro-{variant}" / "tokenizer"
    assert ClipTokenizer(folder).encode(TOKENIZER_PROMPTS).tolist() == goldens[f"tok/{variant}"].tolist()
