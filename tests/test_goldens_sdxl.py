"""Torch-free SDXL tests: the micro SDXL model (tests/fixtures/micro-sdxl) against diffusers' SDXL pipelines'
final latents and images recorded by tests/tools/record_goldens.py (golden_cases.SDXL_CASES). Tolerances as the SD
goldens: latents within 3e-5 relative to their magnitude, images within 1/255. Negative controls break one piece
of SDXL's conditioning at a time and require the goldens to fail by far more than the tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime import Pipeline
from golden_cases import SDXL_CASES, SDXL_PROMPT, SDXL_SEED, edgediff_spec
from test_goldens import LATENT_RTOL, assert_close, relative_atol
from tools.record_goldens import sdxl_call

FIXTURES = Path(__file__).parent / "fixtures"
TURBO = {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}


@pytest.fixture(scope="module")
def goldens():
    return dict(np.load(FIXTURES / "goldens_sdxl.npz"))


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load(FIXTURES / "micro-sdxl") as p:
        yield p


def run(pipe, label: str):
    call, name = sdxl_call(SDXL_CASES[label][1])
    final = {}

    def keep(i, t, latents):
        final["latents"] = latents.copy()

    scheduler = TURBO if name == "turbo" else edgediff_spec(name)
    result = pipe(SDXL_PROMPT, seed=SDXL_SEED, scheduler=scheduler, callback=keep, **call)
    return final["latents"], np.stack([np.asarray(im) for im in result.images])


def latent_error(goldens, pipe, label: str) -> float:
    """max |ours - golden| of the final latents, in units of the tolerance."""
    latents, _ = run(pipe, label)
    want = goldens[f"sdxl/{label}/latents"]
    return float(np.abs(latents - want).max()) / relative_atol(LATENT_RTOL, want)


@pytest.mark.parametrize("label", sorted(SDXL_CASES))
def test_sdxl_equals_diffusers(goldens, pipe, label):
    latents, images = run(pipe, label)
    want = goldens[f"sdxl/{label}/latents"]
    assert_close(latents, want, relative_atol(LATENT_RTOL, want), f"sdxl {label} latents")
    assert_close(images, goldens[f"sdxl/{label}/image"], 1, f"sdxl {label} image (/255)")


@pytest.mark.parametrize(
    ("breakage", "label"),
    [
        ("last layer instead of the penultimate", "zeros-negative"),
        ("encoded empty negative instead of zeros", "zeros-negative"),
        ("pooled embedding zeroed", "second-prompt-sizes-rescale"),
        ("size numbers in the wrong order", "second-prompt-sizes-rescale"),
        ("no guidance rescale", "second-prompt-sizes-rescale"),
    ],
)
def test_broken_conditioning_fails_the_goldens(goldens, pipe, monkeypatch, breakage, label):
    from edgediff.runtime import pipeline as pipeline_module
    from edgediff.runtime.model_folder import ModelFolder

    if breakage.startswith("last layer") or breakage.startswith("pooled"):
        engine = pipe.engines["text_encoder_2"]
        original = engine.run

        def run_broken(feeds):
            out = dict(original(feeds))
            if breakage.startswith("pooled"):
                out["text_embeds"] = np.zeros_like(out["text_embeds"])
            else:
                n = sum(1 for k in out if k.startswith("hidden_states.")) - 1
                out[f"hidden_states.{n - 1}"] = out[f"hidden_states.{n}"]
            return out

        monkeypatch.setattr(engine, "run", run_broken)
    elif breakage.startswith("encoded empty"):
        monkeypatch.setattr(ModelFolder, "force_zeros_for_empty_prompt", property(lambda self: False))
    elif breakage.startswith("size numbers"):
        original_sizes = pipeline_module.Pipeline._size_conditioning
        monkeypatch.setattr(pipeline_module.Pipeline, "_size_conditioning",
                            lambda self, *a: tuple(row[::-1].copy() for row in original_sizes(self, *a)))  # fmt: skip
    else:
        monkeypatch.setattr(pipeline_module, "_rescale_guidance", lambda guided, cond, phi: guided)
    assert latent_error(goldens, pipe, label) > 100, breakage


def test_cli_generates_sdxl(tmp_path):
    """The CLI on the micro SDXL model, in whatever environment the suite runs (the lean stage has no torch)."""
    from click.testing import CliRunner

    from edgediff.runtime.cli import main
    from edgediff.runtime.parameters import read_png_parameters

    out = tmp_path / "xl.png"
    args = ["generate", SDXL_PROMPT, "--model", str(FIXTURES / "micro-sdxl"), "--steps", "2", "--prompt-2",
            "a blue square", "--seed", "3", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = read_png_parameters(out)
    assert record["prompt_2"] == "a blue square" and record["guidance_scale"] == 5.0  # SDXL's default guidance
