"""One Pipeline object serves concurrent calls from several threads without sharing step state
(diffusers' shared `_step_index` breaks under concurrency: diffusers #3672, #7851, #9362)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import needs_torch
from edgediff.runtime import Pipeline

pytestmark = needs_torch

# multistep and stateful schedulers are the ones a shared cursor would break
JOBS = [
    dict(prompt="a red circle", seed=1, scheduler="dpmpp_2m_karras"),
    dict(prompt="a blue square", seed=2, scheduler=None),  # PNDM: history of 4 outputs
    dict(prompt="green triangle", seed=3, scheduler="euler"),
    dict(prompt="a red circle", seed=4, scheduler="ddim", eta=0.5),  # per-step noise
    dict(prompt=["two", "prompts"], seed=5, scheduler="dpmpp_2m"),
    dict(prompt="yellow star", seed=6, scheduler="euler_karras", guidance_scale=1.0),
]


def _run(pipe, job):
    kwargs = dict(num_inference_steps=7, guidance_scale=6.0)
    kwargs.update(job)
    return np.stack([np.asarray(im) for im in pipe(**kwargs).images])


def test_concurrent_calls_equal_sequential_calls(tiny_export):
    pipe = Pipeline.load(tiny_export("sd1"))
    sequential = [_run(pipe, job) for job in JOBS]
    # several rounds, so the calls really interleave step by step
    with ThreadPoolExecutor(max_workers=len(JOBS)) as pool:
        for _ in range(3):
            concurrent = list(pool.map(lambda job: _run(pipe, job), JOBS))
            for job, a, b in zip(JOBS, sequential, concurrent):
                assert np.array_equal(a, b), f"thread result differs for {job}"
    # and the results depend on their own arguments, not on neighbours
    assert not np.array_equal(sequential[0], sequential[3])


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_karras", None])
def test_scheduler_object_is_not_mutated_by_a_call(tiny_export, scheduler):
    pipe = Pipeline.load(tiny_export("sd1"))
    before = repr(pipe.default_scheduler)
    _run(pipe, dict(prompt="x", seed=0, scheduler=scheduler))
    assert repr(pipe.default_scheduler) == before
