"""Record the golden arrays the torch-free tests compare against (PyTorch side; needs the export extra).

    python tests/tools/record_goldens.py            # writes tests/fixtures/goldens.npz, goldens.json
    python tests/tools/record_goldens.py --models   # also re-exports tests/fixtures/micro-sd1, -sd2, -sd1-inpaint
    python tests/tools/record_goldens.py --sdxl     # only the SDXL goldens (and micro-sdxl when missing)
    python tests/tools/record_goldens.py --lora     # only the LoRA goldens (needs peft)

Writes:
- tests/fixtures/micro-sd1/, micro-sd2/, micro-sd1-inpaint/: micro random-weight models (SD1 epsilon, SD2
  v-prediction, SD1 with a 9-channel inpainting UNet) exported by `edgediff export` (about 2.3 MB each), only
  with --models or when missing: other tests use them, and the goldens come from the same seeded source
  (build_tiny_pipeline(seed=0)) either way;
- tests/fixtures/goldens.npz: from diffusers / torch / transformers:
  latents/<variant>/<scheduler>  the StableDiffusionPipeline's final latents (float32, before the VAE)
      and image/<variant>/<scheduler> its image (uint8), for PIPELINE_SEED, each scheduler made by
      from_config over generation_scheduler_config(variant)
  sched/<scheduler>/<pred>/<steps>/{timesteps,samples}  every step of the scheduler, driven by the
      deterministic stand-in model outputs of `stand_in_outputs`
  img2img/... and inpaint/<variant>/<scheduler>/<strength>  StableDiffusionImg2ImgPipeline's and
      StableDiffusionInpaintPipeline's images (uint8) for golden_cases.IMAGE_CASES
  rng/<seed>/<shape>            torch.randn with torch.Generator("cpu").manual_seed(seed), in sequence
  tok/<variant>                 CLIPTokenizer ids of TOKENIZER_PROMPTS
- tests/fixtures/micro-sdxl/ and goldens_sdxl.npz: a micro SDXL model and, for golden_cases.SDXL_CASES, the
  SDXL pipelines' images (uint8) and final latents (kept apart, so recording them leaves goldens.npz as it is);
- tests/fixtures/lora/micro-sd1-locon.safetensors and goldens_lora.npz: a tiny kohya LoCon (UNet linear and conv
  layers, text encoder) made with peft on micro-sd1's seeded source, and the final latents and image of the
  pipeline with it fused by diffusers (golden_cases.LORA_*), plus the same call without it; micro-sd1's LoRA
  weights maps are made first when it lacks them (`edgediff weights-map`);
- tests/fixtures/goldens.json: versions used.
Re-run it when a case is added; the committed files are what the tests read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_cases import (  # noqa: E402
    IMAGE_CASES,
    IMAGE_KW,
    IMAGE_SEED,
    IMAGE_SIZE,
    PIPELINE_KW,
    PIPELINE_PROMPTS,
    PIPELINE_SEED,
    RNG_CASES,
    SCHEDULER_NAMES,
    SDXL_CASES,
    SDXL_PROMPT,
    SDXL_SEED,
    TOKENIZER_PROMPTS,
    generation_scheduler_config,
    image_case_key,
)
from parity import diffusers_images, mask_for, picture  # noqa: E402
from scheduler_harness import SD_BASE  # noqa: E402

FIXTURES = HERE.parent / "fixtures"
SCHED_STEPS = (1, 4, 7)
SCHED_PREDICTIONS = ("epsilon", "v_prediction")


def stand_in_outputs(seed: int, n: int, shape=(1, 4, 8, 8)):
    """Deterministic model outputs and initial sample for scheduler goldens (numpy only)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return x, [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def record_scheduler(goldens: dict, name: str) -> None:
    import diffusers
    import torch

    cls_name, overrides = SCHEDULER_NAMES[name]
    for pred in SCHED_PREDICTIONS:
        for steps in SCHED_STEPS:
            ref = getattr(diffusers, cls_name).from_config(dict(SD_BASE, prediction_type=pred, **overrides))
            ref.set_timesteps(steps)
            x0, outs = stand_in_outputs(steps, len(ref.timesteps))
            x = torch.from_numpy(x0 * float(ref.init_noise_sigma))
            g = torch.Generator("cpu").manual_seed(steps)
            samples = []
            for t, out in zip(ref.timesteps, outs):
                ref.scale_model_input(x, t)  # as a pipeline calls it (LMS warns otherwise)
                kwargs = {"generator": g} if "generator" in ref.step.__code__.co_varnames else {}
                x = ref.step(torch.from_numpy(out), t, x, **kwargs).prev_sample
                samples.append(x.numpy().copy())
            key = f"sched/{name}/{pred}/{steps}"
            goldens[f"{key}/timesteps"] = ref.timesteps.numpy().astype(np.float32)
            goldens[f"{key}/samples"] = np.stack(samples)


def record_image_cases(goldens: dict, variant: str, pipe) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    w, h = IMAGE_SIZE
    for mode, v, name, strength in IMAGE_CASES:
        if v != variant:
            continue
        cls = StableDiffusionInpaintPipeline if mode == "inpaint" else StableDiffusionImg2ImgPipeline
        ref = cls(**pipe.components)
        ref.set_progress_bar_config(disable=True)
        extra = dict(mask_image=mask_for(w, h), height=h, width=w) if mode == "inpaint" else {}
        goldens[image_case_key(mode, v, name, strength)] = diffusers_images(
            ref, name, IMAGE_SEED, image=picture(w, h), strength=strength, **IMAGE_KW, **extra
        )


def sdxl_call(kw: dict) -> tuple[dict, str]:
    """A SDXL_CASES entry as call arguments (the picture and mask made) and its scheduler name."""
    w, h = IMAGE_SIZE
    call = dict(kw)
    name = call.pop("scheduler")
    if call.get("image") == "picture":
        call["image"] = picture(w, h)
    if call.get("mask_image") == "mask":
        call["mask_image"] = mask_for(w, h)
    return call, name


def seeded_outputs(ref, seed: int, **call) -> tuple[np.ndarray, np.ndarray]:
    """(final latents as float32, image as uint8) of a diffusers pipeline: two seeded runs, so each output is
    exactly what the pipeline makes."""
    import torch

    out = {output: ref(generator=torch.Generator("cpu").manual_seed(seed), output_type=output, **call).images
           for output in ("latent", "np")}  # fmt: skip
    return out["latent"].numpy().astype(np.float32), (out["np"] * 255).round().astype(np.uint8)


def record_sdxl(models: bool) -> None:
    import diffusers

    from edgediff.export import export_model
    from edgediff.export.random_model import build_tiny_pipeline

    goldens: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = build_tiny_pipeline(Path(tmp) / "src-sdxl", "sdxl", seed=0, size="micro")
        dst = FIXTURES / "micro-sdxl"
        if models or not dst.exists():
            if dst.exists():
                shutil.rmtree(dst)
            export_model(src, dst)
        base = diffusers.StableDiffusionXLPipeline.from_pretrained(src, add_watermarker=False)
        for label, (cls_name, kw) in SDXL_CASES.items():
            options = {} if cls_name == "StableDiffusionXLPipeline" else {"requires_aesthetics_score": False}
            ref = getattr(diffusers, cls_name)(**base.components, add_watermarker=False, **options)
            ref.set_progress_bar_config(disable=True)
            call, name = sdxl_call(kw)
            cls_name_, overrides = ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}) if (
                name == "turbo") else SCHEDULER_NAMES[name]  # fmt: skip
            ref.scheduler = getattr(diffusers, cls_name_).from_config(base.scheduler.config, **overrides)
            goldens[f"sdxl/{label}/latents"], goldens[f"sdxl/{label}/image"] = seeded_outputs(
                ref, SDXL_SEED, prompt=SDXL_PROMPT, **call
            )
    np.savez_compressed(FIXTURES / "goldens_sdxl.npz", **goldens)
    print(f"wrote {len(goldens)} SDXL arrays to {FIXTURES}")


def record_lora() -> None:

    import lora_maker as lm
    from edgediff.export import write_weights_maps
    from edgediff.export.random_model import build_tiny_pipeline
    from golden_cases import LORA_FILE, LORA_KW, LORA_PROMPT, LORA_SCALE, LORA_SCHEDULER, LORA_SEED

    goldens: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = build_tiny_pipeline(Path(tmp) / "src-sd1", "sd1", seed=0, size="micro")
        if not (FIXTURES / "micro-sd1" / "unet" / "weights_map.json").is_file():
            write_weights_maps(FIXTURES / "micro-sd1", src)
        path = FIXTURES / LORA_FILE
        path.parent.mkdir(exist_ok=True)
        lm.save_kohya(lm.make_lora(src, components=("unet", "text_encoder"), seed=0, sigma=0.2), path)
        for label, loras in (("with", [(path, LORA_SCALE)]), ("without", [])):
            ref = lm.fused_pipeline(src, loras)
            cls_name, overrides = SCHEDULER_NAMES[LORA_SCHEDULER]
            ref.scheduler = getattr(__import__("diffusers"), cls_name).from_config(ref.scheduler.config, **overrides)
            goldens[f"lora/{label}/latents"], goldens[f"lora/{label}/image"] = seeded_outputs(
                ref, LORA_SEED, prompt=LORA_PROMPT, **LORA_KW
            )
    np.savez_compressed(FIXTURES / "goldens_lora.npz", **goldens)
    print(f"wrote {len(goldens)} LoRA arrays and {LORA_FILE} to {FIXTURES}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", action="store_true", help="re-export the committed micro model folders too")
    parser.add_argument("--sdxl", action="store_true", help="record only the SDXL goldens")
    parser.add_argument("--lora", action="store_true", help="record only the LoRA goldens")
    args = parser.parse_args()
    FIXTURES.mkdir(exist_ok=True)
    if args.lora:
        record_lora()
        return
    record_sdxl(args.models)
    if args.sdxl:
        return
    import diffusers
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from edgediff.export import export_model
    from edgediff.export.random_model import build_tiny_pipeline

    FIXTURES.mkdir(exist_ok=True)
    goldens: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("sd1", "sd2", "sd1-inpaint"):
            base, inpaint = variant.removesuffix("-inpaint"), variant.endswith("-inpaint")
            src = build_tiny_pipeline(Path(tmp) / f"src-{variant}", base, seed=0, size="micro", inpaint=inpaint)
            dst = FIXTURES / f"micro-{variant}"
            if args.models or not dst.exists():
                if dst.exists():
                    shutil.rmtree(dst)
                export_model(src, dst)
            pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            record_image_cases(goldens, variant, pipe)
            if inpaint:
                continue
            for name, (cls_name, overrides) in SCHEDULER_NAMES.items():
                for output in ("latent", "np"):  # two seeded runs: each output exactly as the pipeline makes it
                    pipe.scheduler = getattr(diffusers, cls_name).from_config(
                        generation_scheduler_config(variant), **overrides
                    )
                    out = pipe(PIPELINE_PROMPTS, generator=torch.Generator("cpu").manual_seed(PIPELINE_SEED),
                               output_type=output, **PIPELINE_KW).images  # fmt: skip
                    if output == "latent":
                        goldens[f"latents/{variant}/{name}"] = out.numpy().astype(np.float32)
                    else:
                        goldens[f"image/{variant}/{name}"] = (out * 255).round().astype(np.uint8)
            tok = CLIPTokenizer.from_pretrained(src / "tokenizer")
            goldens[f"tok/{variant}"] = np.asarray(
                tok(TOKENIZER_PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
            )
    for name in SCHEDULER_NAMES:
        record_scheduler(goldens, name)
    by_seed: dict[int, torch.Generator] = {}
    for seed, shape in RNG_CASES:
        g = by_seed.setdefault(seed, torch.Generator("cpu").manual_seed(seed))
        goldens[f"rng/{seed}/{'x'.join(map(str, shape))}"] = torch.randn(shape, generator=g).numpy()
    np.savez_compressed(FIXTURES / "goldens.npz", **goldens)
    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    (FIXTURES / "goldens.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(goldens)} arrays to {FIXTURES}")
    record_lora()


if __name__ == "__main__":
    main()
