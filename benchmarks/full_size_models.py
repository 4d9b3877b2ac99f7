"""Full-size Stable Diffusion shapes with no download: random-weight diffusers models with the exact
published architectures of SD 1.5, SD 2.1-base and SDXL base 1.0, exported with ``edgediff export``.

    python benchmarks/full_size_models.py                  # sd15 into ~/.cache/edgediff/full-size
    python benchmarks/full_size_models.py --arch sd21-base --root /data/models [--fp16]

Writes ROOT/<arch>-diffusers (the PyTorch source, for the diffusers and optimum peers) and
ROOT/<arch>-onnx (the edgediff model folder), skipping what exists. Checks each component's
parameter count against the published model's (a wrong config would benchmark another network).
Their cost is the real model's cost; their images are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Parameter counts of the published checkpoints (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1-base, stabilityai/stable-diffusion-xl-base-1.0): public facts, computed from
# their weights.
PUBLISHED_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sd21-base": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sdxl-base": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                  "vae": 83_653_863},
}  # fmt: skip
DEFAULT_ROOT = Path.home() / ".cache" / "edgediff" / "full-size"


def parameter_counts(source: Path) -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    counts = {}
    classes = [("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel), ("vae", AutoencoderKL)]
    if (source / "text_encoder_2").is_dir():
        classes.append(("text_encoder_2", CLIPTextModelWithProjection))
    for name, cls in classes:
        model = cls.from_pretrained(source, subfolder=name)
        counts[name] = sum(p.numel() for p in model.parameters())
        del model
    return counts


def ensure(arch: str, root: Path = DEFAULT_ROOT, fp16: bool = False, build_only: bool = False,
           tiny_vae: bool = False) -> tuple[Path, Path]:  # fmt: skip
    """(diffusers source, edgediff folder) for ``arch``, built and exported if missing; ``tiny_vae``: with a
    random-weight tiny autoencoder of TAESD's published architecture (ROOT/taesd-diffusers)."""
    from edgediff.export import export_model
    from edgediff.export.random_model import build_full_size_pipeline, build_tiny_autoencoder

    taesd = root / "taesd-diffusers"
    if tiny_vae and not (taesd / "config.json").exists():
        build_tiny_autoencoder(taesd, size="full")

    source = root / f"{arch}-diffusers"
    folder = root / f"{arch}-onnx{'-fp16' if fp16 else ''}"
    if not (source / "model_index.json").exists():
        t0 = time.time()
        build_full_size_pipeline(source, arch)
        print(f"built {source} in {time.time() - t0:.0f} s", file=sys.stderr)
        counts = parameter_counts(source)
        expected = PUBLISHED_PARAMETERS[arch]
        wrong = {k: (counts[k], expected[k]) for k in expected if counts[k] != expected[k]}
        if wrong:
            raise SystemExit(f"{arch}: parameter counts differ from the published model (ours, published): {wrong}")
        (source / "parameter_counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    if not build_only and not (folder / "model_index.json").exists():
        t0 = time.time()
        export_model(source, folder, fp16=fp16, progress=sys.stderr.isatty(), tiny_vae=taesd if tiny_vae else None)
        print(f"exported {folder} in {time.time() - t0:.0f} s", file=sys.stderr)
    return source, folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(PUBLISHED_PARAMETERS), default="sd15")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--fp16", action="store_true", help="export fp16 components")
    p.add_argument("--build-only", action="store_true", help="build and check the diffusers source, do not export")
    p.add_argument("--tiny-vae", action="store_true", help="export a TAESD-architecture tiny autoencoder too")
    args = p.parse_args(argv)
    source, folder = ensure(args.arch, args.root, args.fp16, args.build_only, args.tiny_vae)
    print(json.dumps({"source": str(source), "folder": str(folder)}))


if __name__ == "__main__":
    main()
