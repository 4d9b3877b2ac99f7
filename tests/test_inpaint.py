"""Inpainting against diffusers' StableDiffusionInpaintPipeline, both kinds of UNet it runs: a 9-channel inpainting
UNet (exported from a StableDiffusionInpaintPipeline folder) and a standard 4-channel one (the re-noised original
blended back outside the mask after every step). Same components, same seed with torch.Generator("cpu"): images
within 1/255 per pixel. Then ``seeds=[...]`` (one generator per image) against diffusers' list of generators, the
``keep_unmasked`` paste-back, and the bad inputs.

The parity cases need torch; the bad-input cases run on the committed micro folder without it.
"""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import needs_torch
from edgediff.runtime import Pipeline
from edgediff.runtime.errors import InvalidArgumentError, ModelConfigError
from golden_cases import edgediff_spec
from parity import MICRO, PROMPT, assert_close, diffusers_images, mask_for, picture

SCHEDULERS = ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "heun", "lcm", "dpmpp_2m_karras")
# (variant, UNet kind, scheduler, strength): every family at 1.0 (pure noise) and 0.6; 0.35 (int(2.8) = 2 of 8
# steps) on the first-order, multistep and Heun ones
CASES = [
    (v, kind, name, s)
    for v in ("sd1", "sd2")
    for kind in ("9ch", "4ch")
    for name in SCHEDULERS
    for s in ((1.0, 0.6, 0.35) if name in ("euler", "dpmpp_2m", "heun") else (1.0, 0.6))
]


@pytest.fixture(scope="module")
def pipelines(tiny_export, diffusers_pipe):
    from diffusers import StableDiffusionInpaintPipeline

    out = {}
    for v in ("sd1", "sd2"):
        for kind, variant in (("9ch", f"{v}-inpaint"), ("4ch", v)):
            ref = StableDiffusionInpaintPipeline(**diffusers_pipe(variant).components)
            ref.set_progress_bar_config(disable=True)
            out[v, kind] = (Pipeline.load(tiny_export(variant)), ref)
    return out


@needs_torch
@pytest.mark.parametrize("variant,kind,name,strength", CASES)
def test_inpaint_matches_diffusers(pipelines, variant, kind, name, strength):
    ours, ref = pipelines[variant, kind]
    assert ours.folder.unet_kind == ("inpainting" if kind == "9ch" else "standard")
    w, h = 48, 32
    kwargs = dict(prompt=PROMPT, image=picture(w, h), mask_image=mask_for(w, h), strength=strength,
                  num_inference_steps=8, guidance_scale=7.5, seed=5)  # fmt: skip
    want = diffusers_images(ref, name, height=h, width=w, **kwargs)  # diffusers' default size is the native one
    result = ours(scheduler=edgediff_spec(name), **kwargs)
    assert_close(result, want, f"{variant} {kind} {name} s={strength}")
    assert result.images[0].size == (w, h)
    assert result.parameters["mask"] is True and result.parameters["strength"] == strength


@needs_torch
@pytest.mark.parametrize("variant,kind", [("sd1", "9ch"), ("sd1", "4ch"), ("sd2", "9ch"), ("sd2", "4ch")])
def test_inpaint_square_batch_no_guidance(pipelines, variant, kind):
    """Two prompts x two images, guidance off, an RGB mask (luma, Lanczos-resized as diffusers) of another picture
    size than the output (both resized to 32x32)."""
    ours, ref = pipelines[variant, kind]
    image, mask = picture(40, 36, seed=2), mask_for(40, 36, box=(0.5, 0.0, 1.0, 0.6), mode="RGB")
    kwargs = dict(prompt=[PROMPT, "a green square"], image=image, mask_image=mask, strength=0.75,
                  num_inference_steps=6, guidance_scale=1.0, num_images_per_prompt=2, seed=9)  # fmt: skip
    want = diffusers_images(ref, "euler_a", height=32, width=32, **kwargs)
    result = ours(scheduler="euler_a", height=32, width=32, **kwargs)
    assert_close(result, want, f"{variant} {kind} batch euler_a g=1")


@needs_torch
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_seeds_match_diffusers_generator_list(pipelines, tiny_export, diffusers_pipe, mode):
    """seeds=[s0, s1, s2]: diffusers' list of generators (image i from generator i), for txt2img and img2img."""
    from diffusers import StableDiffusionImg2ImgPipeline

    seeds = [21, 22, 23]
    ours = Pipeline.load(tiny_export("sd1"))
    if mode == "txt2img":
        ref, extra = diffusers_pipe("sd1"), {}
    else:
        ref = StableDiffusionImg2ImgPipeline(**diffusers_pipe("sd1").components)
        ref.set_progress_bar_config(disable=True)
        extra = dict(image=picture(32, 32, seed=4), strength=0.7)
    kwargs = dict(prompt=PROMPT, num_inference_steps=6, num_images_per_prompt=3, **extra)
    want = diffusers_images(ref, "euler_a", seed=seeds, **kwargs)
    result = ours(scheduler="euler_a", seeds=seeds, **kwargs)
    assert_close(result, want, f"{mode} seeds {seeds}")
    assert result.parameters["seeds"] == seeds and result.parameters["seed"] == seeds[0]


@needs_torch
@pytest.mark.parametrize("kind", ["9ch", "4ch"])
def test_seeds_remake_one_image_of_an_inpaint_batch(pipelines, kind):
    """Image i of a seeds=[...] batch equals a one-image call with seed=seeds[i] (diffusers' inpainting encodes the
    image with the first generator only, so this is edgediff's rule, not diffusers')."""
    ours, _ = pipelines["sd1", kind]
    w, h = 32, 32
    kwargs = dict(image=picture(w, h), mask_image=mask_for(w, h), strength=0.8, num_inference_steps=5,
                  scheduler="euler_a")  # fmt: skip
    batch = ours([PROMPT, "a green square"], seeds=[100, 101], **kwargs)
    for i, (prompt, seed) in enumerate(((PROMPT, 100), ("a green square", 101))):
        alone = np.asarray(ours(prompt, seed=seed, **kwargs).images[0]).astype(int)
        diff = np.abs(np.asarray(batch.images[i]).astype(int) - alone)
        assert diff.max() <= 1, f"image {i}: {diff.max()}/255 from the one-image call with seed {seed}"


# -- keep_unmasked, records, bad input (no torch) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def micro():
    with Pipeline.load(MICRO) as pipe:
        yield pipe


def test_keep_unmasked_pastes_the_input_back(micro):
    w = h = 32
    image, mask = picture(w, h, seed=1), mask_for(w, h)
    kwargs = dict(image=image, mask_image=mask, num_inference_steps=4, seed=3)
    plain = np.asarray(micro(PROMPT, **kwargs).images[0]).astype(int)
    kept = micro(PROMPT, keep_unmasked=True, **kwargs)
    out, src, m = np.asarray(kept.images[0]).astype(int), np.asarray(image).astype(int), np.asarray(mask) > 0
    assert np.array_equal(out[~m], src[~m])  # outside the mask: the input's pixels exactly
    assert np.array_equal(out[m], plain[m])  # inside: what the model made
    assert np.abs(plain[~m] - src[~m]).max() > 0  # without it the VAE renders the outside (diffusers' default)
    assert kept.parameters["keep_unmasked"] is True


def test_inpaint_records_strength_and_mask(micro):
    from edgediff.runtime import parameters

    r = micro(PROMPT, image=picture(32, 32), mask_image=mask_for(32, 32), num_inference_steps=4, seed=1,
              scheduler="euler")  # fmt: skip
    assert r.parameters["strength"] == 1.0  # diffusers' inpainting default
    assert r.parameters["mask"] is True and r.parameters["keep_unmasked"] is False
    text = parameters.format_parameters(r.parameters)
    assert "Denoising strength: 1.0" in text and "Mask blur: 0" in text
    assert len(r.unet_calls) == 4


def test_mask_inputs_as_arrays_and_paths(micro, tmp_path):
    m = mask_for(32, 32)
    path = tmp_path / "mask.png"
    m.save(path)
    kwargs = dict(image=picture(32, 32), num_inference_steps=3, seed=2)
    ref = np.asarray(micro(PROMPT, mask_image=m, **kwargs).images[0])
    arr = np.asarray(m)
    for mask in (path, str(path), arr, arr[:, :, None], np.stack([arr] * 3, -1), arr > 0, m.convert("RGBA")):
        assert np.array_equal(np.asarray(micro(PROMPT, mask_image=mask, **kwargs).images[0]), ref)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(mask_image=mask_for(32, 32)), "mask_image needs image="),
        (dict(image=picture(32, 32), mask_image=mask_for(40, 32)), "mask_image is 40x32 but image is 32x32"),
        (dict(image=picture(32, 32), mask_image=np.zeros((32, 32), np.float32)), "uint8 or bool array"),
        (dict(image=picture(32, 32), mask_image=np.zeros((32, 32, 2), np.uint8)), "HxW, HxWx1 or HxWx3"),
        (dict(image=picture(32, 32), mask_image="/nonexistent/m.png"), "no such file"),
        (dict(image=picture(32, 32), mask_image=3), "mask_image must be a PIL image"),
        (dict(image=picture(32, 32), keep_unmasked=True), "keep_unmasked applies only to inpainting"),
        (dict(image=picture(32, 32), mask_image=mask_for(32, 32), strength=0), "diffusers' default is 1 for inpai"),
        (dict(seeds=[1, 2]), "seeds has 2 entries but the call makes 1 image(s)"),
        (dict(seeds=[1], seed=3), "pass seeds or seed/generator, not both"),
        (dict(seeds=5), "seeds must be a list of integers"),
        (dict(seeds=["x"]), "seed must be an integer"),
    ],
)
def test_bad_inpaint_inputs(micro, kwargs, fragment):
    with pytest.raises(InvalidArgumentError) as e:
        micro(PROMPT, num_inference_steps=4, **kwargs)
    assert fragment in str(e.value)


def test_inpainting_model_needs_a_mask(tmp_path):
    """A folder whose UNet takes 9 channels refuses text-to-image and img2img with the reason."""
    import shutil

    folder = tmp_path / "inpaint-config"
    shutil.copytree(MICRO, folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 9}))
    with Pipeline.load(folder, low_memory=True) as pipe:
        assert pipe.folder.unet_kind == "inpainting"
        for kwargs in ({}, dict(image=picture(32, 32))):
            with pytest.raises(InvalidArgumentError, match=r"is an inpainting model .* pass image= and mask_image="):
                pipe(PROMPT, num_inference_steps=2, **kwargs)
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 7}))
    with pytest.raises(ModelConfigError, match=r"in_channels: the UNet takes 7 input channels over 4 latent"):
        Pipeline.load(folder)


@needs_torch
def test_export_of_an_inpainting_folder(tiny_export):
    """`edgediff export` on a StableDiffusionInpaintPipeline folder: the 9-channel UNet validated against torch, the
    manifest's unet_kind and diffusers' ONNX inpainting class in model_index.json."""
    from edgediff.runtime.model_folder import ModelFolder

    out = tiny_export("sd1-inpaint")
    manifest = json.loads((out / "edgediff.json").read_text())
    assert manifest["unet_kind"] == "inpainting"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "OnnxStableDiffusionInpaintPipeline"
    folder = ModelFolder.open(out)
    assert folder.unet_kind == "inpainting" and folder.model_symbols()["C_in"] == 9
    assert json.loads((tiny_export("sd1") / "edgediff.json").read_text())["unet_kind"] == "standard"
    from cli_check import run_cli

    code, out = run_cli("info", out, "--json")
    assert code == 0 and json.loads(out)["unet_kind"] == "inpainting", out


def test_cli_image_to_image_and_inpainting(tmp_path):
    """generate --image [--strength] [--mask] [--keep-unmasked] on the embedded model; --from-png with the picture
    and mask given again remakes the same pixels; the flags that need --image say so."""
    from cli_check import assert_one_line_error, run_cli
    from edgediff.runtime import parameters

    base, edited, painted, again = (tmp_path / f"{n}.png" for n in ("base", "edited", "painted", "again"))
    mask = tmp_path / "mask.png"
    mask_for(64, 64, box=(0.2, 0.2, 0.8, 0.8)).save(mask)
    assert run_cli("generate", PROMPT, "--steps", 10, "--seed", 1, "-o", base)[0] == 0
    code, out = run_cli("generate", "a red circle on a green background", "--image", base, "--strength", 0.7,
                        "--steps", 10, "--seed", 2, "-o", edited)  # fmt: skip
    assert code == 0, out
    record = parameters.read_png_parameters(edited)
    assert record["strength"] == 0.7 and record["init_image"] is True and "mask" not in record
    code, out = run_cli("generate", "a yellow circle on a blue background", "--image", base, "--mask", mask,
                        "--keep-unmasked", "--steps", 10, "--seed", 3, "-o", painted)  # fmt: skip
    assert code == 0, out
    record = parameters.read_png_parameters(painted)
    assert record["strength"] == 1.0 and record["mask"] is True and record["keep_unmasked"] is True
    assert "Denoising strength: 1.0, Mask blur: 0" in Image.open(painted).text["parameters"]
    code, out = run_cli("generate", "--from-png", painted, "--image", base, "--mask", mask, "-o", again)
    assert code == 0, out
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(painted)))
    assert_one_line_error(*run_cli("generate", "--from-png", painted, "-o", again), "--image, and --mask")
    assert_one_line_error(*run_cli("generate", "--from-png", painted, "--image", base, "-o", again), "--mask too")
    for flags in (("--mask", mask), ("--strength", 0.5), ("--keep-unmasked",)):
        assert_one_line_error(*run_cli("generate", PROMPT, *flags, "-o", again), f"{flags[0]} needs --image")
    assert_one_line_error(*run_cli("generate", PROMPT, "--image", base, "--mask", tmp_path / "no.png", "-o", again),
                          "mask_image: no such file")  # fmt: skip
    assert_one_line_error(*run_cli("generate", PROMPT, "--image", base, "--strength", 1.5, "-o", again),
                          "strength must be in (0, 1]")  # fmt: skip


def test_planned_calls_is_what_runs(micro):
    """The CLI's progress bar total: the UNet calls a call makes, img2img's tail and Heun's doubled calls included."""
    image, mask = picture(32, 32), mask_for(32, 32)
    cases = [
        dict(num_inference_steps=10),
        dict(num_inference_steps=10, scheduler="heun", image=image),
        dict(num_inference_steps=10, scheduler="pndm", image=image, strength=0.35),
        dict(num_inference_steps=9, scheduler="euler", image=image, mask_image=mask, strength=0.5),
    ]
    for kwargs in cases:
        assert micro.planned_calls(**kwargs) == len(micro(PROMPT, seed=0, **kwargs).unet_calls), kwargs
