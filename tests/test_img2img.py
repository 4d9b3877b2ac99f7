"""Image-to-image against diffusers' StableDiffusionImg2ImgPipeline (same components, same seed with
torch.Generator("cpu")): images within 1/255 per pixel, per scheduler family and strength; and the bad inputs.

The parity cases need torch; the bad-input cases run on the committed micro folder without it.
"""

import json
import shutil

import numpy as np
import pytest

from conftest import needs_torch
from edgediff.runtime import Pipeline
from edgediff.runtime.errors import InvalidArgumentError, ModelFolderError
from golden_cases import edgediff_spec
from parity import MICRO, PROMPT, assert_close, diffusers_images, picture

# (variant, scheduler name, strength): every family at one strength, 0.3/0.75/1.0 on the first-order, multistep
# and Heun ones; sd1 runs DDIM unclipped (see test_pipeline_parity: the clipped one is chaotic on the tiny model).
CASES = [
    (v, name, s)
    for v in ("sd1", "sd2")
    for name in ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "heun", "lcm", "dpmpp_2m_karras")
    for s in ((0.3, 0.75, 1.0) if name in ("pndm", "euler", "dpmpp_2m", "heun", "ddim") else (0.75,))
]


@pytest.fixture(scope="module")
def pipelines(tiny_export, diffusers_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    out = {}
    for v in ("sd1", "sd2"):
        ref = StableDiffusionImg2ImgPipeline(**diffusers_pipe(v).components)
        ref.set_progress_bar_config(disable=True)
        out[v] = (Pipeline.load(tiny_export(v)), ref)
    return out


@needs_torch
@pytest.mark.parametrize("variant,name,strength", CASES)
def test_img2img_matches_diffusers(pipelines, variant, name, strength):
    ours, ref = pipelines[variant]
    image = picture(48, 32)
    kwargs = dict(prompt=PROMPT, image=image, strength=strength, num_inference_steps=10, guidance_scale=7.5, seed=7)
    want = diffusers_images(ref, name, **kwargs)
    result = ours(scheduler=edgediff_spec(name), **kwargs)
    assert_close(result, want, f"{variant} {name} s={strength}")
    assert result.images[0].size == (48, 32)
    assert result.parameters["strength"] == strength and result.parameters["init_image"] is True


@needs_torch
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_img2img_batch_no_guidance_odd_strength(pipelines, variant):
    """Two prompts x two images, guidance off, strength 0.29 of 10 steps (int(2.9) = 2 steps), a path input."""
    ours, ref = pipelines[variant]
    kwargs = dict(prompt=[PROMPT, "a green square"], image=picture(32, 32, seed=3), strength=0.29,
                  num_inference_steps=10, guidance_scale=1.0, num_images_per_prompt=2, seed=11)  # fmt: skip
    want = diffusers_images(ref, "euler_a", **kwargs)
    result = ours(scheduler="euler_a", **kwargs)
    assert_close(result, want, f"{variant} batch euler_a s=0.29 g=1")
    assert len(result.unet_calls) == 2


@needs_torch
def test_img2img_width_height_resize_as_diffusers(pipelines):
    """width/height given: the image is Lanczos-resized to them (diffusers: image_processor.preprocess(h, w))."""
    ours, ref = pipelines["sd1"]
    image = picture(45, 37, seed=5)
    want_in = ref.image_processor.preprocess(image, height=32, width=48)
    kwargs = dict(prompt=PROMPT, strength=0.6, num_inference_steps=8, seed=2)
    want = diffusers_images(ref, "euler", image=want_in, **kwargs)
    result = ours(scheduler="euler", image=image, width=48, height=32, **kwargs)
    assert_close(result, want, "sd1 euler resized 45x37 -> 48x32")


# -- bad input (no torch) ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro():
    with Pipeline.load(MICRO) as pipe:
        yield pipe


def test_output_size_follows_the_image_floored(micro):
    m = micro.folder.size_multiple
    r = micro(PROMPT, image=picture(8 * m + m - 1, 6 * m + 1), num_inference_steps=4, seed=0)
    assert r.images[0].size == (8 * m, 6 * m)
    r = micro(PROMPT, image=np.asarray(picture(8 * m, 8 * m)), width=4 * m, height=6 * m, num_inference_steps=4)
    assert r.images[0].size == (4 * m, 6 * m)


def test_rgba_greyscale_palette_are_converted(micro):
    base = picture(32, 32)
    rgb = micro(PROMPT, image=base, num_inference_steps=4, seed=1).images[0]
    rgba = micro(PROMPT, image=base.convert("RGBA"), num_inference_steps=4, seed=1).images[0]
    assert np.array_equal(np.asarray(rgb), np.asarray(rgba))
    for mode in ("L", "P", "LA"):
        assert micro(PROMPT, image=base.convert(mode), num_inference_steps=4, seed=1).images[0].size == (32, 32)


@pytest.mark.parametrize(
    "image,fragment",
    [
        ("/nonexistent/dir/in.png", "no such file '/nonexistent/dir/in.png'"),
        (np.zeros((8, 8), np.uint8), "HxWx3 uint8"),
        (np.zeros((8, 8, 3), np.float32), "HxWx3 uint8"),
        (42, "image must be a PIL image"),
    ],
)
def test_badpicture(micro, image, fragment):
    with pytest.raises(InvalidArgumentError, match="image") as e:
        micro(PROMPT, image=image, num_inference_steps=4)
    assert fragment in str(e.value)


def test_unreadable_image_file(micro, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(InvalidArgumentError, match=r"cannot read .*not-an-image\.png.* as an image"):
        micro(PROMPT, image=bad, num_inference_steps=4)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.01, float("nan"), "0.5", True])
def test_bad_strength(micro, strength):
    with pytest.raises(InvalidArgumentError, match="strength"):
        micro(PROMPT, image=picture(32, 32), strength=strength, num_inference_steps=4)


def test_strength_too_small_for_any_step(micro):
    with pytest.raises(InvalidArgumentError, match=r"strength=0.05 with 10 inference steps runs no step"):
        micro(PROMPT, image=picture(32, 32), strength=0.05, num_inference_steps=10)
    # the same strength with enough steps runs int(20*0.05) = 1 step
    r = micro(PROMPT, image=picture(32, 32), strength=0.05, num_inference_steps=20, scheduler="euler")
    assert len(r.unet_calls) == 1


def test_strength_without_image_and_image_with_latents(micro):
    with pytest.raises(InvalidArgumentError, match="strength applies only to image-to-image"):
        micro(PROMPT, strength=0.5, num_inference_steps=4)
    with pytest.raises(InvalidArgumentError, match="pass image or latents, not both"):
        micro(PROMPT, image=picture(32, 32), latents=np.zeros((1, 4, 16, 16), np.float32), num_inference_steps=4)


def test_folder_without_vae_encoder_says_reexport(tmp_path):
    folder = tmp_path / "no-encoder"
    shutil.copytree(MICRO, folder)
    shutil.rmtree(folder / "vae_encoder")
    manifest = json.loads((folder / "edgediff.json").read_text())
    del manifest["components"]["vae_encoder"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("vae_encoder/")}
    (folder / "edgediff.json").write_text(json.dumps(manifest))
    with Pipeline.load(folder) as pipe:
        assert pipe(PROMPT, num_inference_steps=2).images  # txt2img does not need it
        with pytest.raises(ModelFolderError, match=r"has no vae_encoder.*re-export"):
            pipe(PROMPT, image=picture(32, 32), num_inference_steps=4)
