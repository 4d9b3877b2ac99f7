"""Calibration data for static int8: the UNet's real inputs, collected by running the fp32 pipeline.

Static quantisation fixes every activation's int8 scale ahead of time, so the scales must come
from the values the UNet actually sees: latents at every noise level of the schedule, the text
embeddings of real prompts and the empty prompt (guidance's unconditional half). ``collect``
runs the folder's fp32 pipeline (ONNX Runtime, or whichever engine ``pipe`` was loaded with) over
a prompt list and records each UNet call's inputs; ``edgediff optimize --int8 static`` passes
them to the quantiser of each engine (``engines/ort_optimize.py``: ONNX Runtime QDQ;
``engines/ov_quantize.py``: OpenVINO NNCF).

The prompt file is plain text, one prompt per line; blank lines and lines starting with ``#`` are
skipped. Without one, ``DEFAULT_PROMPTS`` (varied everyday subjects and styles) are used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .engine import check_feed
from .errors import InvalidArgumentError

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old man with a beard, studio lighting",
    "a bowl of fruit on a wooden table, still life, oil painting",
    "a futuristic city skyline at night, neon lights, rain",
    "a cute corgi puppy sitting in a field of flowers",
    "an isometric illustration of a cozy bedroom",
    "a snowy mountain landscape with pine trees, morning fog",
)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a calibration file; a missing, unreadable or empty file is an error that says so."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"calibration prompt file {p} does not exist: give a text file with one prompt "
                                   "per line (--calibration-prompts FILE)")  # fmt: skip
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"calibration prompt file {p} cannot be read as UTF-8 text ({e})") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidArgumentError(f"calibration prompt file {p} has no prompts: write one prompt per line")
    return prompts


class _Recorder:
    """Stands in for the pipeline's UNet engine: runs it and keeps a copy of every call's inputs."""

    def __init__(self, engine, samples: list[dict[str, np.ndarray]]):
        self.engine, self.samples = engine, samples
        self.inputs, self.outputs = engine.inputs, engine.outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feed("unet", self.inputs, feeds)
        self.samples.append({k: np.array(v, copy=True) for k, v in checked.items()})
        return self.engine.run(checked)

    def close(self) -> None:
        self.engine.close()


def collect(
    pipe,
    prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
    steps: int = 10,
    size: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """The UNet inputs of ``len(prompts)`` images of ``steps`` steps each (one sample per UNet call, in
    call order), made at ``size`` (default the model's native size) with the model's own scheduler and
    guidance. Image i uses seed ``seed + i``."""
    if not prompts:
        raise InvalidArgumentError("calibration needs at least one prompt")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"calibration steps must be a positive integer, got {steps!r}")
    if pipe.low_memory:
        raise InvalidArgumentError("calibration runs the UNet many times: load the pipeline without low_memory")
    samples: list[dict[str, np.ndarray]] = []
    unet = pipe.engines["unet"]
    pipe.engines["unet"] = _Recorder(unet, samples)
    call: dict[str, Any] = {"num_inference_steps": steps}
    if size is not None:
        call.update(width=size, height=size)
    if guidance is not None:
        call["guidance_scale"] = guidance
    try:
        for i, prompt in enumerate(prompts):
            pipe(prompt, seed=seed + i, **call)
    finally:
        pipe.engines["unet"] = unet
    return samples
