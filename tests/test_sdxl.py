"""SDXL and the few-step models against diffusers, on tiny random-weight models built here (no network).

Oracle: diffusers' StableDiffusionXLPipeline / -Img2Img / -Inpaint (and LatentConsistencyModelPipeline, and
StableDiffusionPipeline for SD-Turbo) on the same seed, CPU generator; tolerance 1/255 per pixel. The SDXL model has
two text encoders of different widths (a swapped concat fails), the second padding with id 0 and pooling to its own
width, a UNet with SDXL's added conditioning, and an SDXL-style VAE (scaling 0.13025).
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from conftest import needs_torch
from golden_cases import edgediff_spec
from parity import PROMPT, assert_close, diffusers_images, mask_for, picture

pytestmark = needs_torch

STEPS = 4


@pytest.fixture(scope="module")
def oracle(tiny_source):
    """(variant, diffusers class name) -> that pipeline over the tiny source's components (loaded once)."""
    import diffusers

    cache: dict = {}

    def get(variant: str, cls: str = "StableDiffusionXLPipeline"):
        if (variant, cls) not in cache:
            if cls.startswith("StableDiffusionXL"):
                base = cache.get((variant, "base")) or diffusers.StableDiffusionXLPipeline.from_pretrained(
                    tiny_source(variant), add_watermarker=False, local_files_only=True
                )
                cache[(variant, "base")] = base
                options = {"requires_aesthetics_score": False} if cls != "StableDiffusionXLPipeline" else {}
                pipe = getattr(diffusers, cls)(**base.components, add_watermarker=False, **options)
            else:
                options = {"safety_checker": None}
                if cls != "LatentConsistencyModelPipeline":
                    options["requires_safety_checker"] = False
                pipe = getattr(diffusers, cls).from_pretrained(tiny_source(variant), local_files_only=True, **options)
            pipe.set_progress_bar_config(disable=True)
            cache[(variant, cls)] = pipe
        return cache[(variant, cls)]

    return get


@pytest.fixture(scope="module")
def xl(tiny_export):
    from edgediff.runtime import Pipeline

    with Pipeline.load(tiny_export("sdxl")) as pipe:
        yield pipe


# -- export ---------------------------------------------------------------------------------------------------
def test_export_writes_optimums_sdxl_layout(tiny_export):
    """Both encoders with every layer's hidden states, tokenizer_2, the added-conditioning UNet inputs, family sdxl,
    and diffusers' zeroing rule kept in model_index.json (every component validated against torch by export)."""
    from edgediff.runtime.model_folder import ModelFolder

    folder = tiny_export("sdxl")
    manifest = json.loads((folder / "edgediff.json").read_text())
    assert manifest["family"] == "sdxl"
    assert json.loads((folder / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    comps = manifest["components"]
    names = {k: [t["name"] for t in v["outputs"]] for k, v in comps.items()}
    assert names["text_encoder"] == ["last_hidden_state", "pooler_output"] + [f"hidden_states.{i}" for i in range(4)]
    assert names["text_encoder_2"] == ["text_embeds", "last_hidden_state"] + [f"hidden_states.{i}" for i in range(5)]
    assert [t["name"] for t in comps["unet"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]  # fmt: skip
    mf = ModelFolder.open(folder)
    assert mf.features == {"hidden_states", "added_cond"}
    symbols = mf.model_symbols()
    assert (symbols["D"], symbols["D1"], symbols["D2"], symbols["P"], symbols["T"]) == (80, 32, 48, 40, 6)
    assert mf.tokenizer_2 is not None and mf.tokenizer_2.pad_id == 0  # OpenCLIP's "!" padding
    assert mf.tokenizer is not None and mf.tokenizer.pad_id == mf.tokenizer.eos_id


# -- text-to-image --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [5.0, 1.0])
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "ddim", "unipc"])
def test_txt2img_matches_diffusers(xl, oracle, name, guidance):
    ref = oracle("sdxl")
    want = diffusers_images(ref, name, 3, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=guidance)
    got = xl(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, scheduler=edgediff_spec(name), seed=3)
    assert_close(got, want, f"sdxl {name} g{guidance}")


CONDITIONING = {
    "default (zeros for no negative)": {},
    "negative prompt": {"negative_prompt": "a blurry picture"},
    "empty negative is encoded": {"negative_prompt": ""},
    "second prompts": {"prompt_2": "a green square", "negative_prompt": "dark", "negative_prompt_2": "a blue star"},
    "size conditioning": {
        "original_size": (64, 48),
        "crops_coords_top_left": (3, 5),
        "target_size": (40, 36),
        "negative_original_size": (20, 24),
        "negative_target_size": (24, 28),
        "negative_crops_coords_top_left": (1, 2),
    },
    "guidance_rescale": {"guidance_rescale": 0.7, "negative_prompt": "dark"},
    "rescale with zeros": {"guidance_rescale": 0.5},
}


@pytest.mark.parametrize("case", sorted(CONDITIONING))
def test_conditioning_matches_diffusers(xl, oracle, case):
    kw = CONDITIONING[case]
    want = diffusers_images(oracle("sdxl"), "euler", 5, prompt=PROMPT, num_inference_steps=STEPS, **kw)
    got = xl(PROMPT, num_inference_steps=STEPS, seed=5, **kw)
    assert_close(got, want, f"sdxl {case}")


def test_batches_match_diffusers(xl, oracle):
    prompts = [PROMPT, "a yellow triangle"]
    kw = dict(negative_prompt=["dark", "light"], num_images_per_prompt=2, num_inference_steps=STEPS)
    want = diffusers_images(oracle("sdxl"), "euler_a", 7, prompt=prompts, **kw)
    assert_close(xl(prompts, seed=7, scheduler="euler_a", **kw), want, "sdxl batch 2x2")
    want = diffusers_images(oracle("sdxl"), "euler", [1, 2], prompt=PROMPT, num_images_per_prompt=2,
                            num_inference_steps=STEPS)  # fmt: skip
    assert_close(xl(PROMPT, seeds=[1, 2], num_images_per_prompt=2, num_inference_steps=STEPS), want, "sdxl seeds")


def test_negative_sizes_pair_with_their_image(xl):
    """diffusers' txt2img stacks [neg; pos] size rows before tiling them over the batch, which pairs image 2's
    negative with image 1's row when the negative sizes differ (sdxl.md); edgediff pairs each image with its own, so
    image i of a batch is the one-image call with its seed."""
    kw = dict(num_inference_steps=STEPS, negative_original_size=(16, 16), negative_target_size=(20, 24))
    batch = xl(PROMPT, seeds=[11, 12], num_images_per_prompt=2, **kw)
    one = xl(PROMPT, seed=12, **kw)
    assert np.array_equal(np.asarray(batch.images[1]), np.asarray(one.images[0]))


def test_zeroed_negative_differs_from_encoded_empty(xl):
    none = np.asarray(xl(PROMPT, num_inference_steps=2, seed=1).images[0])
    empty = np.asarray(xl(PROMPT, num_inference_steps=2, seed=1, negative_prompt="").images[0])
    assert not np.array_equal(none, empty)


def test_defaults_are_sdxls(xl):
    record = xl(PROMPT, num_inference_steps=2, seed=1).parameters
    assert record["guidance_scale"] == 5.0
    assert xl.folder.call_defaults("img2img")["strength"] == 0.3
    assert xl.folder.call_defaults("inpaint") == {"num_inference_steps": 50, "guidance_scale": 7.5, "strength": 0.9999}
    assert record["original_size"] is None and record["prompt_2"] is None  # the record keeps what was given


def test_record_repeats_the_call(xl):
    from edgediff.runtime import parameters

    kw = CONDITIONING["size conditioning"] | {"prompt_2": "a green square", "guidance_rescale": 0.3}
    first = xl(PROMPT, num_inference_steps=2, seed=9, **kw)
    again = xl(**parameters.call_arguments(json.loads(json.dumps(first.parameters))))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


# -- image-to-image and inpainting ----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "strength"), [("euler", None), ("dpmpp_2m", 0.75), ("ddim", 0.5)])
def test_img2img_matches_diffusers(xl, oracle, name, strength):
    image = picture(32, 32)
    kw = dict(prompt=PROMPT, image=image, num_inference_steps=10, negative_prompt="dark", guidance_rescale=0.4)
    if strength is not None:
        kw["strength"] = strength  # else both default to SDXL img2img's 0.3
    want = diffusers_images(oracle("sdxl", "StableDiffusionXLImg2ImgPipeline"), name, 4, **kw)
    assert_close(xl(seed=4, scheduler=edgediff_spec(name), **kw), want, f"sdxl img2img {name} {strength}")


@pytest.mark.parametrize(
    ("variant", "strength"),
    [("sdxl", None), ("sdxl", 1.0), ("sdxl", 0.6), ("sdxl-inpaint", None), ("sdxl-inpaint", 1.0)],
)
def test_inpaint_matches_diffusers(tiny_export, oracle, variant, strength):
    """4-channel UNet (the blend) and 9-channel inpainting UNet (1.0 and 0.9999 cover its two paths); None: both
    default to SDXL inpainting's 0.9999."""
    from edgediff.runtime import Pipeline

    image, mask = picture(32, 32, seed=2), mask_for(32, 32)
    kw = dict(prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=6)
    if strength is not None:
        kw["strength"] = strength
    want = diffusers_images(oracle(variant, "StableDiffusionXLInpaintPipeline"), "euler", 6, **kw)
    with Pipeline.load(tiny_export(variant)) as pipe:
        assert_close(pipe(seed=6, **kw), want, f"{variant} inpaint {strength}")


# -- few-step models -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [8.0, 13.0, 1.5])
def test_lcm_unet_matches_diffusers(tiny_export, oracle, guidance):
    """An LCM-distilled UNet takes the guidance as an embedding (timestep_cond), one batch-B call per step."""
    from edgediff.runtime import Pipeline

    for variant, cls in (("sd1-lcm", "LatentConsistencyModelPipeline"), ("sdxl-lcm", "StableDiffusionXLPipeline")):
        want = diffusers_images(oracle(variant, cls), "lcm", 2, prompt=PROMPT, num_inference_steps=4,
                                guidance_scale=guidance)  # fmt: skip
        with Pipeline.load(tiny_export(variant)) as pipe:
            got = pipe(PROMPT, num_inference_steps=4, guidance_scale=guidance, seed=2, scheduler="lcm")
        assert_close(got, want, f"{variant} g{guidance}")
        assert len(got.unet_calls) == 4


def test_lcm_defaults_and_frozen_frequencies(tiny_export):
    """The folder dictates 4 steps at 8; the guidance embedding's frequencies are torch's, stored at export."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from edgediff.runtime import Pipeline

    folder = tiny_export("sdxl-lcm")
    freqs = json.loads((folder / "edgediff.json").read_text())["guidance_embedding"]["frequencies"]
    with Pipeline.load(folder) as pipe:
        result = pipe(PROMPT, seed=1)
        assert (result.parameters["num_inference_steps"], result.parameters["guidance_scale"]) == (4, 8.0)
        emb = pipe._guidance_embedding(8.0, 2)
    want = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, torch.tensor([7.0, 7.0]), 2 * len(freqs))
    assert emb.shape == (2, 2 * len(freqs))
    np.testing.assert_allclose(emb, want.numpy(), rtol=0, atol=1e-6)  # sin/cos: numpy's and torch's last ulp


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize(("variant", "cls"), [("sdxl-turbo", "StableDiffusionXLPipeline"),
                                               ("sd2-turbo", "StableDiffusionPipeline")])  # fmt: skip
def test_turbo_matches_diffusers(tiny_export, oracle, variant, cls, steps):
    """Guidance 0 (one batch-1 UNet call per step), Euler ancestral on trailing timesteps: 999 first."""
    from edgediff.runtime import Pipeline

    want = diffusers_images(oracle(variant, cls), "euler_a", 8, prompt=PROMPT, num_inference_steps=steps,
                            guidance_scale=0.0)  # fmt: skip
    with Pipeline.load(tiny_export(variant)) as pipe:
        got = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, seed=8)
    assert_close(got, want, f"{variant} {steps} steps")
    assert len(got.unet_calls) == steps


def test_turbo_folder_dictates_defaults_and_warns_on_guidance(tiny_export, caplog):
    from edgediff.runtime import Pipeline

    with Pipeline.load(tiny_export("sdxl-turbo")) as pipe:
        assert pipe.folder.guidance_distilled
        result = pipe(PROMPT, seed=1)
        assert (result.parameters["num_inference_steps"], result.parameters["guidance_scale"]) == (1, 0.0)
        assert pipe.planned_calls() == 1
        assert pipe.folder.call_defaults("img2img")["strength"] == 0.5
        with caplog.at_level(logging.WARNING):
            pipe(PROMPT, seed=1, guidance_scale=3.0)
    assert "guidance-distilled" in caplog.text and "twice the time" in caplog.text


# -- optimum's folders ----------------------------------------------------------------------------------------
def test_optimum_sdxl_export_loads_and_matches(tiny_source, oracle, tmp_path):
    """A folder written by optimum's own exporter (no edgediff.json) opens as SDXL and gives diffusers' images."""
    from optimum.exporters.onnx import main_export

    from edgediff.runtime import Pipeline

    out = tmp_path / "optimum-sdxl"
    main_export(str(tiny_source("sdxl")), str(out), task="text-to-image")
    assert not (out / "edgediff.json").exists()
    with Pipeline.load(out) as pipe:
        assert pipe.folder.family.name == "sdxl"
        for kw in ({}, {"negative_prompt": "dark", "guidance_rescale": 0.5}):
            want = diffusers_images(oracle("sdxl"), "euler", 3, prompt=PROMPT, num_inference_steps=STEPS, **kw)
            assert_close(pipe(PROMPT, num_inference_steps=STEPS, seed=3, **kw), want, f"optimum sdxl {kw}")


# -- bad input ------------------------------------------------------------------------------------------------
def test_sdxl_arguments_on_sd1_are_refused(tiny_export):
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import InvalidArgumentError

    with Pipeline.load(tiny_export("sd1")) as pipe:
        with pytest.raises(InvalidArgumentError, match=r"prompt_2 applies only to SDXL models.*sd1 model"):
            pipe(PROMPT, prompt_2="x", num_inference_steps=1)
        with pytest.raises(InvalidArgumentError, match=r"original_size, crops_coords_top_left apply only to SDXL"):
            pipe(PROMPT, original_size=(32, 32), crops_coords_top_left=(0, 0), num_inference_steps=1)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"original_size": (0, 32)}, r"original_size must be \(height, width\) in pixels"),
        ({"crops_coords_top_left": (-1, 0)}, r"crops_coords_top_left must be \(top, left\)"),
        ({"target_size": "32x32"}, r"target_size must be"),
        ({"guidance_rescale": 1.5}, r"guidance_rescale must be between 0 \(off\) and 1"),
        ({"prompt_2": ["a", "b"]}, r"prompt_2 has 2 entries but prompt has 1"),
    ],
)
def test_bad_sdxl_arguments(xl, kw, message):
    from edgediff.runtime.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=message):
        xl(PROMPT, num_inference_steps=1, **kw)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no text_encoder_2", r"text_encoder_2/model.onnx is missing"),
        ("no tokenizer_2", r"tokenizer_2/ is missing"),
        ("pooled width", r"projection_class_embeddings_input_dim 88 is not 6 size numbers x addition_time_embed_dim "
                         r"8 \+ the pooled width 41"),
        ("cross width", r"cross_attention_dim 80 is not the text encoders' widths 32 \+ 49"),
    ],
)  # fmt: skip
def test_damaged_sdxl_folders_are_named(tiny_export, tmp_path, damage, message):
    from edgediff.runtime.errors import ModelFolderError
    from edgediff.runtime.model_folder import ModelFolder

    folder = tmp_path / "m"
    shutil.copytree(tiny_export("sdxl"), folder)
    if damage == "no text_encoder_2":
        shutil.rmtree(folder / "text_encoder_2")
    elif damage == "no tokenizer_2":
        shutil.rmtree(folder / "tokenizer_2")
    else:
        cfg = folder / "text_encoder_2" / "config.json"
        data = json.loads(cfg.read_text())
        data["projection_dim" if damage == "pooled width" else "hidden_size"] += 1
        cfg.write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match=message):
        ModelFolder.open(folder)


# -- TensorRT profiles (no GPU needed: the shapes come from the I/O contract) -----------------------------------
def test_tensorrt_profiles_cover_the_new_inputs(tiny_export, tmp_path):
    """SDXL's and LCM's extra inputs, the second text encoder and the tiny autoencoder get profiles from the
    contract like any input; an LCM or Turbo model is not built for a doubled batch."""
    from edgediff.engines import trt_plans as plans
    from edgediff.engines.tensorrt_build import guided_by_default, model_facts
    from edgediff.runtime.model_folder import ModelFolder
    from edgediff.runtime.specs import TensorSpec

    def profile(mf, component):
        inputs = [TensorSpec.from_json(t) for t in mf.manifest["components"][component]["inputs"]]
        options = plans.ProfileOptions(guidance=guided_by_default(mf))
        [static] = plans.build_profiles(component, inputs, model_facts(mf), options)
        return {name: shapes[1] for name, shapes in static.items()}  # the opt shapes (static: min = opt = max)

    xl = ModelFolder.open(tiny_export("sdxl"))
    assert guided_by_default(xl)
    assert profile(xl, "unet") == {"sample": (2, 4, 16, 16), "timestep": (), "encoder_hidden_states": (2, 77, 80),
                                   "text_embeds": (2, 40), "time_ids": (2, 6)}  # fmt: skip
    assert profile(xl, "text_encoder_2") == {"input_ids": (2, 77)}
    lcm = ModelFolder.open(tiny_export("sdxl-lcm"))
    assert not guided_by_default(lcm)
    assert profile(lcm, "unet")["timestep_cond"] == (1, 64) and profile(lcm, "unet")["sample"] == (1, 4, 16, 16)
    assert not guided_by_default(ModelFolder.open(tiny_export("sdxl-turbo")))


def test_sdxl_img2img_and_inpaint_class_folders_export(tiny_source, tmp_path):
    """A folder saved by StableDiffusionXLImg2ImgPipeline (its model_index.json class) exports as SDXL too."""
    from edgediff.export import export_model
    from edgediff.runtime.model_folder import ModelFolder

    source = tmp_path / "src"
    shutil.copytree(tiny_source("sdxl"), source)
    index = json.loads((source / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=False)
    (source / "model_index.json").write_text(json.dumps(index))
    folder = ModelFolder.open(export_model(source, tmp_path / "out"))
    assert folder.family.name == "sdxl" and folder.unet_kind == "standard"
    assert (
        json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    )


def test_fp16_export_keeps_a_vae_that_misses_the_fp16_tolerance(tiny_source, tmp_path, monkeypatch):
    """SDXL's VAE overflows in fp16: a VAE half whose fp16 output misses the tolerance (forced here) stays fp32,
    and the manifest says so; the other components are fp16."""
    from edgediff.export import export_model
    from edgediff.runtime.specs import SUBMODELS

    for name in ("vae_decoder", "vae_encoder"):
        monkeypatch.setitem(SUBMODELS[name].tolerance, "fp16", (0.0, 0.0))
    out = export_model(tiny_source("sdxl"), tmp_path / "fp16", fp16=True)
    components = json.loads((out / "edgediff.json").read_text())["components"]
    for name in ("vae_decoder", "vae_encoder"):
        assert components[name]["precision"] == "fp32" and "kept fp32" in components[name]["note"]
    assert {components[n]["precision"] for n in ("text_encoder", "text_encoder_2", "unet")} == {"fp16"}
