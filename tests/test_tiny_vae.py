"""The tiny autoencoder (diffusers' AutoencoderTiny, TAESD) and previews.

Oracle: diffusers' pipelines with ``vae=AutoencoderTiny`` (what ``pipe.vae = AutoencoderTiny.from_pretrained(...)``
does) on the same seed, within 1/255 per pixel; each tiny component is validated against torch by the export.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import needs_torch
from parity import PROMPT, assert_close, diffusers_images, picture

pytestmark = needs_torch


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    from edgediff.export.random_model import build_tiny_autoencoder

    return build_tiny_autoencoder(tmp_path_factory.mktemp("taesd") / "taesd", seed=3)


@pytest.fixture(scope="module")
def with_tiny(tiny_source, taesd, tmp_path_factory):
    """variant -> an export of the tiny model made with --tiny-vae (SD 1) or added to it afterwards (SDXL)."""
    from edgediff.export import add_tiny_vae, export_model

    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{variant}") / "model"
            if variant == "sd1":
                export_model(tiny_source(variant), out, tiny_vae=taesd)
            else:
                export_model(tiny_source(variant), out)
                add_tiny_vae(out, taesd)
            cache[variant] = out
        return cache[variant]

    return get


def _oracle(tiny_source, taesd, variant: str, cls: str):
    import diffusers

    base = diffusers.StableDiffusionXLPipeline if variant == "sdxl" else diffusers.StableDiffusionPipeline
    options = {"add_watermarker": False} if variant == "sdxl" else {"safety_checker": None,
                                                                    "requires_safety_checker": False}  # fmt: skip
    components = base.from_pretrained(tiny_source(variant), local_files_only=True, **options).components
    components["vae"] = diffusers.AutoencoderTiny.from_pretrained(taesd)
    if variant != "sdxl":
        options = {"requires_safety_checker": False}
        components.pop("image_encoder", None)
    elif cls != "StableDiffusionXLPipeline":
        options["requires_aesthetics_score"] = False
    pipe = getattr(diffusers, cls)(**components, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("variant", "cls"), [("sd1", "StableDiffusionPipeline"),
                                               ("sdxl", "StableDiffusionXLPipeline")])  # fmt: skip
def test_tiny_decoder_matches_diffusers(tiny_source, taesd, with_tiny, variant, cls):
    from edgediff.runtime import Pipeline

    want = diffusers_images(_oracle(tiny_source, taesd, variant, cls), "euler", 4, prompt=PROMPT,
                            num_inference_steps=3)  # fmt: skip
    with Pipeline.load(with_tiny(variant)) as pipe:
        got = pipe(PROMPT, num_inference_steps=3, seed=4, scheduler="euler", decoder="tiny")
        assert got.parameters["decoder"] == "tiny"
        full = pipe(PROMPT, num_inference_steps=3, seed=4, scheduler="euler")
    assert_close(got, want, f"{variant} tiny decoder")
    assert "decoder" not in full.parameters  # the full VAE: records keep their keys
    assert not np.array_equal(np.asarray(full.images[0]), np.asarray(got.images[0]))


@pytest.mark.parametrize(("variant", "cls"), [("sd1", "StableDiffusionImg2ImgPipeline"),
                                               ("sdxl", "StableDiffusionXLImg2ImgPipeline")])  # fmt: skip
def test_tiny_encoder_img2img_matches_diffusers(tiny_source, taesd, with_tiny, variant, cls):
    """The tiny encoder gives the latents themselves: no draw from the generator, unlike the full VAE's sample."""
    from edgediff.runtime import Pipeline

    kw = dict(prompt=PROMPT, image=picture(32, 32), strength=0.6, num_inference_steps=6)
    want = diffusers_images(_oracle(tiny_source, taesd, variant, cls), "euler", 5, **kw)
    with Pipeline.load(with_tiny(variant)) as pipe:
        assert_close(pipe(seed=5, scheduler="euler", decoder="tiny", **kw), want, f"{variant} tiny img2img")


def test_tiny_components_are_recorded_and_verified(with_tiny):
    from edgediff.runtime.model_folder import ModelFolder

    for variant in ("sd1", "sdxl"):
        folder = ModelFolder.open(with_tiny(variant))
        assert folder.has_tiny_vae and folder.tiny_vae_scaling_factor == 1.0
        assert {"vae_decoder_tiny", "vae_encoder_tiny"} <= set(folder.manifest["components"])
        assert "vae_decoder_tiny/model.onnx" in folder.manifest["files"]
        assert folder.verify() == []
        io = folder.manifest["components"]["vae_encoder_tiny"]
        assert [t["name"] for t in io["inputs"]] == ["sample"] and [t["name"] for t in io["outputs"]] == [
            "latent_sample"]  # fmt: skip


def test_preview_decodes_the_current_clean_estimate(with_tiny):
    """A callback that takes ``preview`` gets images at any step; with Euler the last step's estimate is the
    final latents (x - sigma * eps with the next sigma 0)."""
    from edgediff.runtime import Pipeline

    seen = []

    def callback(step, timestep, latents, preview):
        images = preview() if step in (0, 2) else None
        seen.append((step, latents.copy(), images))

    with Pipeline.load(with_tiny("sd1")) as pipe:
        result = pipe(PROMPT, num_inference_steps=3, seed=2, scheduler="euler", callback=callback)
        plain = pipe(PROMPT, num_inference_steps=3, seed=2, scheduler="euler", callback=lambda *a: None)
        tiny = pipe(PROMPT, num_inference_steps=3, seed=2, scheduler="euler", decoder="tiny")
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert seen[0][2] is not None and seen[0][2][0].size == (32, 32)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))  # a preview changes nothing
    # the last step's preview is the tiny decoder's rendering of the final latents: the decoder="tiny" image
    diff = np.abs(np.asarray(seen[2][2][0]).astype(int) - np.asarray(tiny.images[0]).astype(int))
    assert diff.max() <= 1


def test_denoised_estimate_of_the_last_euler_step_is_the_result():
    from edgediff.runtime import schedulers

    sched = schedulers.resolve("euler", {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                                         "beta_start": 0.00085, "beta_end": 0.012})  # fmt: skip
    schedule = sched.schedule(4)
    rng = np.random.default_rng(0)
    sample, eps = rng.standard_normal((1, 4, 8, 8), np.float32), rng.standard_normal((1, 4, 8, 8), np.float32)
    i = len(schedule.timesteps) - 1
    stepped, _ = sched.step(schedule, i, eps, sample, sched.initial_state(schedule))
    np.testing.assert_allclose(sched.denoised(schedule, i, sample, eps), stepped, rtol=0, atol=1e-5)
    ddim = schedulers.resolve("ddim", {"_class_name": "DDIMScheduler", "set_alpha_to_one": True, "clip_sample": False})
    plan = ddim.schedule(4)
    j = len(plan.timesteps) - 1  # DDIM's last step goes to alpha 1: the estimate itself
    stepped, _ = ddim.step(plan, j, eps, sample, ddim.initial_state(plan))
    np.testing.assert_allclose(ddim.denoised(plan, j, sample, eps), stepped, rtol=0, atol=1e-5)


# -- bad input ------------------------------------------------------------------------------------------------
def test_tiny_decoder_missing_names_the_command(tiny_export):
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import InvalidArgumentError, ModelFolderError

    with Pipeline.load(tiny_export("sd1")) as pipe:
        with pytest.raises(ModelFolderError, match=r"no tiny autoencoder .*`edgediff add-tiny-vae .* TAESD_DIR`"):
            pipe(PROMPT, num_inference_steps=1, decoder="tiny")
        with pytest.raises(InvalidArgumentError, match=r"decoder must be 'full' .* or 'tiny'"):
            pipe(PROMPT, num_inference_steps=1, decoder="small")


def test_bad_tiny_vae_folders_are_refused_before_torch_work(tiny_source, tiny_export, tmp_path):
    from edgediff.export import add_tiny_vae, export_model
    from edgediff.export.random_model import build_tiny_autoencoder
    from edgediff.runtime.errors import ExportError

    source = tiny_source("sd1")
    with pytest.raises(ExportError, match=r"holds a 'AutoencoderKL', not an AutoencoderTiny"):
        export_model(source, tmp_path / "a", tiny_vae=source / "vae")
    with pytest.raises(ExportError, match=r"has no config.json"):
        export_model(source, tmp_path / "b", tiny_vae=tmp_path)
    eight = build_tiny_autoencoder(tmp_path / "taesd8", latent_channels=8)
    with pytest.raises(ExportError, match=r"makes 8-channel latents but .* has 4"):
        add_tiny_vae(tiny_export("sd1"), eight)
    wide = build_tiny_autoencoder(tmp_path / "taesd-full", size="full")
    with pytest.raises(ExportError, match=r"scales by 8 but the VAE of .* by 2"):
        export_model(source, tmp_path / "c", tiny_vae=wide)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_adding_twice_needs_force_and_replaces(with_tiny, taesd, tmp_path):
    import shutil

    from edgediff.export import add_tiny_vae
    from edgediff.export.random_model import build_tiny_autoencoder
    from edgediff.runtime.errors import ExportError
    from edgediff.runtime.model_folder import ModelFolder

    folder = tmp_path / "m"
    shutil.copytree(with_tiny("sd1"), folder)
    with pytest.raises(ExportError, match=r"already has a tiny autoencoder .*pass --force"):
        add_tiny_vae(folder, taesd)
    before = json.loads((folder / "edgediff.json").read_text())["files"]["vae_decoder_tiny/model.onnx"]
    add_tiny_vae(folder, build_tiny_autoencoder(tmp_path / "other", seed=9), force=True)
    after = json.loads((folder / "edgediff.json").read_text())["files"]["vae_decoder_tiny/model.onnx"]
    assert before["sha256"] != after["sha256"]
    assert ModelFolder.open(folder).verify() == []
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no partial folder left
