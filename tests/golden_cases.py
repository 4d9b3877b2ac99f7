"""The cases shared by the golden recorder (tests/tools/record_goldens.py, torch side) and the
torch-free golden tests (test_goldens.py). Written by hand, independently of edgediff's own name
resolution, so they also check it: edgediff name -> (diffusers class, from_config overrides)."""

from scheduler_harness import SD_BASE

SCHEDULER_NAMES = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}  # fmt: skip


# `scheduler=` as edgediff takes it: a dict for the cases that need an option beyond the name
# (DDIM/DDPM over an SD config inherit their class default clip_sample=True, which makes the
# random-weight test models chaotic: float32 noise grows to several /255; see test_pipeline_parity).
# For the tests that run over the folders' own scheduler config (test_pipeline_parity, benchmarks).
def edgediff_spec(name: str):
    cls, overrides = SCHEDULER_NAMES[name]
    if name in ("ddim", "ddpm"):
        return {"_class_name": cls, **overrides}
    return name


# The scheduler config the whole-pipeline goldens resolve each name over: SD 1.x's as published (no
# timestep_spacing, clip_sample off), not the micro folders' own, which pins timestep_spacing="leading".
# Each class then takes its own default spacing, as over a real SD 1.5 model: DDIM/DDPM "leading",
# Euler/Euler a "linspace". Over one shared "leading" schedule DDPM and Euler a are the same sampler
# and DDIM and Euler differ only by the last sigma, so their images matched and a swapped name passed.
PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction"}


def generation_scheduler_config(variant: str) -> dict:
    return dict(SD_BASE, prediction_type=PREDICTION[variant])


PIPELINE_PROMPTS = ["a red circle on a blue background", "small green triangle at the top, yellow background"]
PIPELINE_KW = dict(num_inference_steps=6, guidance_scale=5.0, negative_prompt=["blurry", ""])
PIPELINE_SEED = 1234

# Image-to-image and inpainting goldens (micro models; "sd1-inpaint": a 9-channel inpainting UNet):
# (mode, variant, scheduler name, strength), on parity.picture(*IMAGE_SIZE) and parity.mask_for(*IMAGE_SIZE)
IMAGE_CASES = [
    ("img2img", "sd1", "euler_a", 0.6),
    ("img2img", "sd2", "dpmpp_2m", 0.75),
    ("inpaint", "sd1", "euler", 1.0),
    ("inpaint", "sd2", "ddim", 0.6),
    ("inpaint", "sd1-inpaint", "dpmpp_2m", 1.0),
    ("inpaint", "sd1-inpaint", "heun", 0.6),
]
IMAGE_SIZE = (48, 32)
IMAGE_KW = dict(prompt="a red circle on a blue background", num_inference_steps=6, guidance_scale=5.0)
IMAGE_SEED = 77


def image_case_key(mode: str, variant: str, name: str, strength: float) -> str:
    return f"{mode}/{variant}/{name}/{strength:g}"


TOKENIZER_PROMPTS = [
    "",
    "a photo of a cat",
    "A  Photo   of a\tCAT\n on the  table",
    "red, green; blue!! (masterpiece:1.2) [sky] {x} #hash @at 100% $5",
    "don't we'll they're it's I'm you've he'd",
    "naïve café — crème brûlée, emoji 🐱🚀, ñ ü ß",
    " ".join(["sunset over the mountain river"] * 30),
]

RNG_CASES = [(0, (1, 4, 8, 8)), (42, (3,)), (42, (17,)), (2**32 + 5, (2, 4, 16, 16)), (7, (15,))]


# SDXL goldens (tests/fixtures/micro-sdxl, goldens_sdxl.npz): label -> (diffusers pipeline class, call arguments;
# "scheduler": an edgediff name whose diffusers class is swapped in, or "turbo" for Euler ancestral on trailing
# timesteps). Each case moves a different part of SDXL's conditioning; images within 1/255, latents as the SD ones.
SDXL_PROMPT = "a red circle on a blue background"
SDXL_CASES = {
    "zeros-negative": ("StableDiffusionXLPipeline", {"scheduler": "euler", "num_inference_steps": 5}),
    "second-prompt-sizes-rescale": ("StableDiffusionXLPipeline", {
        "scheduler": "dpmpp_2m", "num_inference_steps": 5, "prompt_2": "a green square", "negative_prompt": "dark",
        "original_size": (48, 40), "crops_coords_top_left": (2, 4), "target_size": (36, 32),
        "guidance_rescale": 0.6}),
    "no-guidance-euler-a": ("StableDiffusionXLPipeline", {"scheduler": "euler_a", "num_inference_steps": 4,
                                                          "guidance_scale": 1.0}),
    "turbo-1-step": ("StableDiffusionXLPipeline", {"scheduler": "turbo", "num_inference_steps": 1,
                                                   "guidance_scale": 0.0}),
    "img2img": ("StableDiffusionXLImg2ImgPipeline", {"scheduler": "euler", "num_inference_steps": 10,
                                                     "image": "picture"}),
    # (diffusers' inpainting defaults to the model's native size, edgediff to the image's: both given here)
    "inpaint": ("StableDiffusionXLInpaintPipeline", {"scheduler": "euler", "num_inference_steps": 6,
                                                     "image": "picture", "mask_image": "mask", "width": 48,
                                                     "height": 32}),
}  # fmt: skip
SDXL_SEED = 21

# The committed tiny LoRA (tests/fixtures/lora/, made on micro-sd1's seeded source by record_goldens.py --lora):
# its file, strength, and the call whose final latents and image diffusers recorded with it fused
LORA_FILE = "lora/micro-sd1-locon.safetensors"
LORA_SCALE = 0.8
LORA_SEED = 7
LORA_KW = dict(num_inference_steps=4, guidance_scale=5.0, negative_prompt="blurry")
LORA_PROMPT = "a red circle on a blue background"
LORA_SCHEDULER = "euler"
