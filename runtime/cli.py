"""The ``edgediff`` command: export, generate, info. Logging is configured here and only here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import schedulers
from .errors import EdgediffError

logger = logging.getLogger("edgediff")


class _Group(click.Group):
    """Turns every EdgediffError into one line on stderr and exit code 1 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgediffError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def main(verbose: bool) -> None:
    """edgediff: Stable Diffusion on the edge, no PyTorch at run time."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--fp16", is_flag=True, help="Write fp16 components (timestep stays fp32; VAE decoder kept fp32 if needed).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--opset", default=17, show_default=True, help="ONNX opset.")
@click.option("--device", default="cpu", show_default=True, help="Trace and validate on this torch device (cpu, cuda).")
def export(source: Path, out: Path, fp16: bool, force: bool, opset: int, device: str) -> None:
    """Export the diffusers Stable Diffusion folder SOURCE to the ONNX model folder OUT."""
    try:
        from edgediff.export import export_model
    except ImportError as e:
        raise click.ClickException(
            f"export needs the PyTorch side ({e.name or e} is missing): pip install 'edgediff[export]'"
        ) from None
    folder = export_model(source, out, fp16=fp16, force=force, opset=opset, progress=sys.stderr.isatty(), device=device)
    click.echo(f"exported {source} -> {folder}")


@main.command()
@click.argument("prompt")
@click.option("--model", "model", default=None, type=click.Path(path_type=Path),
              help="Model folder. Default: the embedded shapes model.")
@click.option("-o", "--output", default="out.png", show_default=True, type=click.Path(path_type=Path))
@click.option("--negative-prompt", default=None)
@click.option("--steps", default=50, show_default=True, type=int)
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--width", default=None, type=int, help="Default: the model's native size.")
@click.option("--height", default=None, type=int, help="Default: the model's native size.")
@click.option("--seed", default=None, type=int, help="Same seed, same image as diffusers with a CPU generator.")
@click.option("--scheduler", default=None, help=f"One of: {', '.join(schedulers.known_names())}. Default: the model's own.")
@click.option("--eta", default=0.0, show_default=True, type=float, help="DDIM's eta (ignored by other schedulers).")
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime execution provider (repeatable).")
def generate(prompt, model, output, negative_prompt, steps, guidance, width, height, seed, scheduler, eta, providers):
    """Generate an image from PROMPT and write it as a PNG with its parameters."""
    from tqdm import tqdm

    from .image import format_parameters, save_png
    from .pipeline import Pipeline

    with Pipeline.load(model, providers=list(providers) or None) as pipe:
        bar = tqdm(total=None, desc="denoising", unit="step", disable=not sys.stderr.isatty(), leave=False)
        result = pipe(
            prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
            width=width, height=height, seed=seed, scheduler=scheduler, eta=eta, callback=lambda *a: bar.update(1),
        )  # fmt: skip
        bar.close()
    path = save_png(result.images[0], output, format_parameters(result.parameters))
    click.echo(f"wrote {path} (seed {result.parameters['seed']}, {result.timings['total']:.2f} s)")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--verify/--no-verify", default=True, help="Recompute file hashes and load every component.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(model: Path, verify: bool, as_json: bool) -> None:
    """Show what the model folder MODEL holds and whether it validates."""
    from .engine import create_engine
    from .model_folder import ModelFolder

    mf = ModelFolder.open(model)
    problems = mf.verify() if verify else []
    loaded = {}
    if verify:
        for name in mf.components:
            try:
                eng = create_engine("onnxruntime", mf.component_path(name), component=name)
                loaded[name] = {
                    "inputs": {k: [v.dtype.name, list(v.shape)] for k, v in eng.inputs.items()},
                    "outputs": {k: [v.dtype.name, list(v.shape)] for k, v in eng.outputs.items()},
                }
                eng.close()
            except EdgediffError as e:
                problems.append(str(e))
    m = mf.manifest
    report = {
        "folder": str(mf.path),
        "manifest": "inferred (optimum/diffusers folder)" if mf.inferred else "edgediff.json",
        "family": m["family"],
        "prediction_type": m["prediction_type"],
        "native_size": m["native_size"],
        "latent_channels": m["latent_channels"],
        "vae_downscale": m["vae_downscale"],
        "vae_scaling_factor": m["vae_scaling_factor"],
        "scheduler": mf.scheduler_config.get("_class_name"),
        "components": {k: v.get("precision") for k, v in m["components"].items()},
        "schedulers_available": schedulers.known_names(),
        "valid": not problems,
        "problems": problems,
    }
    if verify:
        report["io"] = loaded
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            if k == "io":
                for comp, io in v.items():
                    click.echo(f"  {comp}: in {io['inputs']} out {io['outputs']}")
            elif k != "problems":
                click.echo(f"{k}: {', '.join(v) if k == 'schedulers_available' else v}")
        for p in problems:
            click.echo(f"problem: {p}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
