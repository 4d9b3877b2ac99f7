"""Torch-free tests: edgediff against arrays recorded from diffusers / torch / transformers by
tests/tools/record_goldens.py. These run with the lean runtime alone (no torch installed).

Tolerances: final latents within 3e-5 relative to their magnitude (the float32 UNet through ONNX vs
torch, compounded over the steps; measured up to 3e-6); whole images within 1/255 per pixel;
scheduler steps within 2e-5 relative to the sample's magnitude (float32 rounding); RNG within 1e-5
relative to its magnitude; tokenizer ids exact. Every comparison first requires both sides finite (NaN never passes).

Schedulers are resolved by the short names users type. The goldens must tell every pair of names
apart by SEPARATION times the tolerance (tested on the recorded arrays, and by swapping names):
the random-weight VAE squeezes latent differences to a fraction of 1/255, so the latents are the
golden that discriminates, the images check the decode end to end.
"""

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime import Pipeline, schedulers
from edgediff.runtime.rng import TorchCPUGenerator
from edgediff.runtime.tokenizer import ClipTokenizer
from golden_cases import (
    IMAGE_CASES,
    IMAGE_KW,
    IMAGE_SEED,
    IMAGE_SIZE,
    PIPELINE_KW,
    PIPELINE_PROMPTS,
    PIPELINE_SEED,
    RNG_CASES,
    SCHEDULER_NAMES,
    TOKENIZER_PROMPTS,
    edgediff_spec,
    generation_scheduler_config,
    image_case_key,
)
from parity import mask_for, picture
from scheduler_harness import SD_BASE
from tools.record_goldens import SCHED_PREDICTIONS, SCHED_STEPS, stand_in_outputs

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("sd1", "sd2")
LATENT_RTOL = 3e-5
STEP_RTOL = 2e-5
SEPARATION = 10  # every pair of names: mean |difference| of their goldens >= this many tolerances


@pytest.fixture(scope="module")
def goldens():
    return dict(np.load(FIXTURES / "goldens.npz"))


@pytest.fixture(scope="module")
def micro():
    return {v: Pipeline.load(FIXTURES / f"micro-{v}") for v in (*VARIANTS, "sd1-inpaint")}


def assert_close(got, want, atol: float, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert np.isfinite(got).all() and np.isfinite(want).all(), (
        f"{what}: not finite (ours {int((~np.isfinite(got)).sum())}, golden {int((~np.isfinite(want)).sum())} values)"
    )
    assert got.shape == want.shape, f"{what}: shape {got.shape}, golden {want.shape}"
    err = float(np.abs(got - want).max())
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol:.3g}"


def relative_atol(rtol: float, *arrays) -> float:
    return rtol * max(1.0, *(float(np.abs(a).max()) for a in arrays))


def check_generation(goldens, micro, variant: str, name: str) -> None:
    final = {}

    def keep(i, t, latents):
        final["latents"] = latents.copy()

    sched = schedulers.resolve(name, generation_scheduler_config(variant))
    result = micro[variant](PIPELINE_PROMPTS, seed=PIPELINE_SEED, scheduler=sched, callback=keep, **PIPELINE_KW)
    want = goldens[f"latents/{variant}/{name}"]
    assert_close(final["latents"], want, relative_atol(LATENT_RTOL, want), f"{variant} {name} latents")
    images = np.stack([np.asarray(im) for im in result.images])
    assert_close(images, goldens[f"image/{variant}/{name}"], 1, f"{variant} {name} image (/255)")


def check_steps(goldens, name: str, pred: str, steps: int) -> None:
    key = f"sched/{name}/{pred}/{steps}"
    sched = schedulers.resolve(name, dict(SD_BASE, prediction_type=pred))
    schedule = sched.schedule(steps)
    assert_close(schedule.timesteps, goldens[f"{key}/timesteps"], 1e-3, f"{key} timesteps")
    x0, outs = stand_in_outputs(steps, len(schedule.timesteps))
    x = x0 * np.float32(schedule.init_noise_sigma)
    state, g = sched.initial_state(schedule), TorchCPUGenerator(steps)
    for i, (out, want) in enumerate(zip(outs, goldens[f"{key}/samples"])):
        x, state = sched.step(schedule, i, out, x, state, g)
        assert_close(x, want, relative_atol(STEP_RTOL, want), f"{key} step {i}")


def swap_short_names(monkeypatch, a: str, b: str) -> None:
    short = schedulers.SHORT_NAMES
    class_a, class_b = short[a], short[b]
    monkeypatch.setitem(short, a, class_b)
    monkeypatch.setitem(short, b, class_a)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
def test_seeded_generation_equals_diffusers(goldens, micro, variant, name):
    check_generation(goldens, micro, variant, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_goldens_tell_every_scheduler_apart(goldens, variant):
    lat = {n: goldens[f"latents/{variant}/{n}"] for n in SCHEDULER_NAMES}
    assert all(np.isfinite(x).all() for x in lat.values())
    gaps = {
        (a, b): float(np.abs(lat[a] - lat[b]).mean()) / relative_atol(LATENT_RTOL, lat[a], lat[b])
        for a, b in combinations(lat, 2)
    }
    (a, b), gap = min(gaps.items(), key=lambda kv: kv[1])
    assert gap >= SEPARATION, f"{variant}: {a} and {b} latents differ by only {gap:.1f} tolerances; re-record"


@pytest.mark.parametrize("pred", SCHED_PREDICTIONS)
def test_step_goldens_tell_every_scheduler_apart(goldens, pred):
    for a, b in combinations(SCHEDULER_NAMES, 2):
        gaps = []
        for steps in SCHED_STEPS:
            x, y = (goldens[f"sched/{n}/{pred}/{steps}/samples"] for n in (a, b))
            assert np.isfinite(x).all() and np.isfinite(y).all()
            same_shape = x.shape == y.shape
            gaps.append(float(np.abs(x - y).mean()) / relative_atol(STEP_RTOL, x, y) if same_shape else np.inf)
        assert max(gaps) >= SEPARATION, f"{pred}: {a} and {b} differ by at most {max(gaps):.1f} tolerances"


# Negative controls: a wrong name -> class mapping must fail. ddpm/euler_a were byte-identical images and
# ddim/euler 1/255 apart in the old fixture; dpmpp_2m_karras/unipc_karras is the closest pair now.
@pytest.mark.parametrize(
    "a, b, name", [("ddpm", "euler_a", "ddpm"), ("ddim", "euler", "euler"), ("dpmpp_2m", "unipc", "unipc_karras")]
)
def test_swapped_short_names_fail_the_generation_goldens(goldens, micro, monkeypatch, a, b, name):
    swap_short_names(monkeypatch, a, b)
    with pytest.raises(AssertionError, match=r"sd1 \w+ latents: max \|diff\|"):
        check_generation(goldens, micro, "sd1", name)


def test_swapped_short_names_fail_the_step_goldens(goldens, monkeypatch):
    swap_short_names(monkeypatch, "ddpm", "euler_a")
    with pytest.raises(AssertionError, match="sched/ddpm/epsilon/4 "):
        check_steps(goldens, "ddpm", "epsilon", 4)


def test_comparison_refuses_nan():
    with pytest.raises(AssertionError, match="not finite"):
        assert_close([np.nan], [np.nan], 1.0, "nan")


@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
@pytest.mark.parametrize("pred", SCHED_PREDICTIONS)
@pytest.mark.parametrize("steps", SCHED_STEPS)
def test_scheduler_steps_equal_diffusers(goldens, name, pred, steps):
    check_steps(goldens, name, pred, steps)


def test_rng_equals_torch(goldens):
    gens: dict = {}
    for seed, shape in RNG_CASES:
        g = gens.setdefault(seed, TorchCPUGenerator(seed))
        key = f"rng/{seed}/{'x'.join(map(str, shape))}"
        want = goldens[key]
        assert_close(g.randn(shape), want, relative_atol(1e-5, want), key)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_equals_clip_tokenizer(goldens, variant):
    folder = FIXTURES / f"micro-{variant}" / "tokenizer"
    assert ClipTokenizer(folder).encode(TOKENIZER_PROMPTS).tolist() == goldens[f"tok/{variant}"].tolist()


@pytest.mark.parametrize("mode,variant,name,strength", IMAGE_CASES)
def test_img2img_and_inpaint_equal_diffusers(goldens, micro, mode, variant, name, strength):
    """StableDiffusionImg2ImgPipeline's and StableDiffusionInpaintPipeline's images (both UNet kinds), within
    1/255, without torch."""
    assert _image_case_error(goldens, micro, mode, variant, name, strength) <= 1


def _image_case_error(goldens, micro, mode, variant, name, strength) -> int:
    w, h = IMAGE_SIZE
    extra = {"mask_image": mask_for(w, h)} if mode == "inpaint" else {}
    result = micro[variant](image=picture(w, h), strength=strength, seed=IMAGE_SEED, scheduler=edgediff_spec(name),
                            **IMAGE_KW, **extra)  # fmt: skip
    want = goldens[image_case_key(mode, variant, name, strength)].astype(int)
    return int(np.abs(np.asarray(result.images[0]).astype(int) - want[0]).max())


@pytest.mark.parametrize("breakage", ["no blend", "inverted mask"])
def test_broken_inpainting_fails_the_goldens(goldens, micro, monkeypatch, breakage):
    """Negative controls: without the standard UNet's blend, or with the mask inverted, the inpainting goldens fail
    (by far more than 1/255)."""
    from edgediff.runtime.pipeline import Pipeline as P

    original = P._image_start

    def broken(self, pixels, mask, *args):
        if breakage == "inverted mask" and mask is not None:
            mask = 1 - mask
        latents, hook = original(self, pixels, mask, *args)
        return latents, (None if breakage == "no blend" and hook and hook.after_step else hook)

    monkeypatch.setattr(P, "_image_start", broken)
    cases = [c for c in IMAGE_CASES if c[0] == "inpaint" and (breakage == "inverted mask" or c[1] != "sd1-inpaint")]
    errors = [_image_case_error(goldens, micro, *c) for c in cases]
    assert min(errors) > 10, dict(zip(map(str, cases), errors))
