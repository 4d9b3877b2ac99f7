"""Measure every scheduler's difference to diffusers: per step (stand-in model outputs, same noise)
and per image (tiny SD1 epsilon / SD2 v-prediction models, same seed), and write
benchmarks/results/scheduler_parity.md.

    python benchmarks/scheduler_parity.py

Needs the export extra (diffusers and torch are the oracle).
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from golden_cases import SCHEDULER_NAMES, edgediff_spec  # noqa: E402
from scheduler_harness import SD_BASE  # noqa: E402

STEPS = (1, 2, 4, 7, 20, 50)
PREDICTIONS = ("epsilon", "v_prediction")
SEEDS = (0, 1, 2)


def per_step(name: str) -> float:
    """Largest |ours - diffusers| / max(1, max|diffusers|) over every step of the grid."""
    import diffusers
    import torch

    from edgediff.runtime import schedulers
    from edgediff.runtime.rng import TorchCPUGenerator

    cls_name, overrides = SCHEDULER_NAMES[name]
    worst = 0.0
    for pred in PREDICTIONS:
        for steps in STEPS:
            if name == "lcm" and steps > 50:
                continue
            for seed in SEEDS:
                cfg = dict(SD_BASE, prediction_type=pred, **overrides)
                ref = getattr(diffusers, cls_name).from_config(cfg)
                ours = schedulers.resolve(dict(cfg, _class_name=cls_name), {})
                ref.set_timesteps(steps)
                schedule = ours.schedule(steps)
                rng = np.random.default_rng(seed)
                x = (rng.standard_normal((1, 4, 8, 8)) * schedule.init_noise_sigma).astype(np.float32)
                xr = torch.from_numpy(x.copy())
                state = ours.initial_state(schedule)
                g_ref, g_ours = torch.Generator().manual_seed(seed), TorchCPUGenerator(seed)
                for i, t in enumerate(ref.timesteps):
                    ref.scale_model_input(xr, t)
                    out = rng.standard_normal(x.shape).astype(np.float32)
                    kw = {"generator": g_ref} if "generator" in ref.step.__code__.co_varnames else {}
                    xr = ref.step(torch.from_numpy(out), t, xr, **kw).prev_sample
                    x, state = ours.step(schedule, i, out, x, state, g_ours)
                    want = xr.numpy()
                    worst = max(worst, float(np.abs(x - want).max()) / max(1.0, float(np.abs(want).max())))
    return worst


def per_image(pipes: dict) -> dict:
    import diffusers
    import torch

    prompts = ["a red circle on a blue background", "small green triangle at the top, yellow background"]
    results = {}
    for name, (cls_name, overrides) in SCHEDULER_NAMES.items():
        row = {}
        for variant, (ours, ref) in pipes.items():
            original = ref.scheduler
            ref.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
            kw = dict(prompt=prompts, num_inference_steps=20, guidance_scale=7.5, num_images_per_prompt=2)
            want = ref(generator=torch.Generator().manual_seed(42), output_type="np", **kw).images
            ref.scheduler = original
            want = (want * 255).round().astype(np.int16)
            got = np.stack([np.asarray(im) for im in ours(seed=42, scheduler=edgediff_spec(name), **kw).images])
            d = np.abs(got.astype(np.int16) - want)
            row[variant] = (int(d.max()), float(d.mean()))
        results[name] = row
    return results


def supported_section() -> list[str]:
    """Each class's restricted options, from its own ``supported`` table (what raises an error)."""
    from edgediff.runtime.schedulers import SCHEDULERS

    lines = ["", "## Options with restricted values", "",
             "Any other value of these keys raises `InvalidArgumentError` naming it (reasons in DECISIONS.md).", "",
             "| diffusers class | key: allowed values |", "|---|---|"]  # fmt: skip
    for name, cls in SCHEDULERS.items():
        allowed = "; ".join(f"`{k}`: {', '.join(map(str, v))}" for k, v in cls.supported.items())
        lines.append(f"| {name} | {allowed} |")
    return lines


def main() -> None:
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    from edgediff.export import export_model
    from edgediff.export.random_model import build_tiny_pipeline
    from edgediff.runtime import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipes = {}
        for variant in ("sd1", "sd2"):
            src = build_tiny_pipeline(Path(tmp) / f"src-{variant}", variant)
            ref = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
            ref.set_progress_bar_config(disable=True)
            pipes[variant] = (Pipeline.load(export_model(src, Path(tmp) / f"ex-{variant}")), ref)
        images = per_image(pipes)
    lines = [
        "# Scheduler parity with diffusers",
        "",
        "Measured by `python benchmarks/scheduler_parity.py` on "
        f"{platform.machine()} / {platform.processor() or 'cpu'}, "
        f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}.",
        "",
        "- **per step**: largest |edgediff − diffusers| / max(1, max|diffusers sample|) over every step, "
        "driving both with "
        f"the same stand-in model outputs and the same noise; SD 1.x config, prediction epsilon and v, steps {STEPS}, "
        f"seeds {SEEDS}.",
        "- **per image**: the whole pipeline with `seed=42` against diffusers with "
        "`torch.Generator('cpu').manual_seed(42)`; "
        "tiny random-weight models (SD1-style epsilon, SD2-style v-prediction), 32×32, 20 steps, guidance 7.5, "
        "2 prompts × 2 images; max and mean per-pixel difference in 1/255.",
        "",
        "| scheduler | diffusers class (+ options) | per step | image sd1 max / mean | image sd2 max / mean |",
        "|---|---|---|---|---|",
    ]
    for name, (cls_name, overrides) in SCHEDULER_NAMES.items():
        opts = ", ".join(f"{k}={v}" for k, v in overrides.items())
        s1, s2 = images[name]["sd1"], images[name]["sd2"]
        lines.append(
            f"| `{name}` | {cls_name}{' (' + opts + ')' if opts else ''} | {per_step(name):.1e} | "
            f"{s1[0]} / {s1[1]:.4f} | {s2[0]} / {s2[1]:.4f} |"
        )
    lines += supported_section()
    out = ROOT / "benchmarks" / "results" / "scheduler_parity.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
