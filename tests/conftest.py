"""Shared fixtures: tiny random-weight Stable Diffusion models built locally (no network) and
exported once per test session. Tests that need the PyTorch side skip cleanly without it; the
README's test command installs it, so CI runs them all."""

from __future__ import annotations

import importlib.util

import pytest

HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers"))
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs the export extra (torch, diffusers, transformers)")


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """variant ("sd1", "sd2", "sdxl", with "-inpaint": a 9-channel inpainting UNet, "-lcm": an LCM-distilled UNet,
    "-turbo": Turbo's scheduler) -> path of a saved diffusers folder (built once per variant)."""
    from edgediff.export.random_model import build_tiny_pipeline

    cache = {}

    def get(variant: str):
        if variant not in cache:
            base, *flags = variant.split("-")
            out = tmp_path_factory.mktemp(f"src-{variant}") / "model"
            cache[variant] = build_tiny_pipeline(out, base, inpaint="inpaint" in flags, lcm="lcm" in flags,
                                                 turbo="turbo" in flags)  # fmt: skip
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def tiny_export(tiny_source, tmp_path_factory):
    """(variant, fp16) -> path of the edgediff export of the tiny model."""
    from edgediff.export import export_model

    cache = {}

    def get(variant: str, fp16: bool = False):
        key = (variant, fp16)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ex-{variant}-{'fp16' if fp16 else 'fp32'}") / "model"
            cache[key] = export_model(tiny_source(variant), out, fp16=fp16)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_source):
    """variant -> the diffusers StableDiffusionPipeline loaded from the tiny source (the oracle)."""
    from diffusers import StableDiffusionPipeline

    cache = {}

    def get(variant: str):
        if variant not in cache:
            pipe = StableDiffusionPipeline.from_pretrained(
                tiny_source(variant), safety_checker=None, requires_safety_checker=False, local_files_only=True
            )
            pipe.set_progress_bar_config(disable=True)
            cache[variant] = pipe
        return cache[variant]

    return get
