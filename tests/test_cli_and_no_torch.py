"""The CLI end to end, PNG parameters, and the one hard rule: a full generate imports neither
torch, diffusers nor transformers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import needs_torch
from edgediff.runtime.cli import main
from edgediff.runtime.image import format_parameters

# the tiny model is built with diffusers (needs_torch); the generate itself is torch-free


@needs_torch
def test_generate_writes_png_with_parameters(tiny_export, tmp_path):
    out = tmp_path / "sub" / "out.png"
    args = ["generate", "a red circle", "--model", str(tiny_export("sd1")), "-o", str(out), "--steps", "3",
            "--seed", "7", "--scheduler", "euler", "--negative-prompt", "blurry", "--guidance", "6"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (32, 32)
    text = image.text["parameters"]
    assert text.splitlines()[0] == "a red circle"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    # A1111's sampler and schedule-type names, then edgediff's own name
    pairs = text.splitlines()[2]
    assert "Steps: 3, Sampler: Euler, Schedule type: Uniform, CFG scale: 6.0, Seed: 7, Size: 32x32" in pairs
    assert "Scheduler: euler," in pairs
    record = json.loads(image.text["edgediff"])  # the full record, machine-readable
    assert record["scheduler_class"] == "EulerDiscreteScheduler" and record["scheduler_config"]["timestep_spacing"]
    assert (record["seed"], record["num_inference_steps"], record["negative_prompt"]) == (7, 3, "blurry")
    assert not [p for p in out.parent.iterdir() if p.name != "out.png"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@needs_torch
def test_info_reports_valid_folder(tiny_export):
    result = CliRunner().invoke(main, ["info", str(tiny_export("sd2")), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["valid"] and report["family"] == "sd2" and report["prediction_type"] == "v_prediction"
    assert report["unet_kind"] == "standard"
    assert "dpmpp_2m_karras" in report["schedulers_available"]
    assert report["io"]["unet"]["inputs"]["timestep"] == ["float32", []]


def test_parameters_format_without_negative():
    text = format_parameters(
        {
            "prompt": "cat",
            "num_inference_steps": 20,
            "scheduler": "dpmpp_2m_karras",
            "guidance_scale": 7.5,
            "seed": 1,
            "width": 512,
            "height": 512,
            "model": "m",
        }
    )
    pairs = (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: m, "
        "RNG: CPU, Scheduler: dpmpp_2m_karras, Version: edgediff"
    )
    assert text.splitlines() == ["cat", pairs]


@needs_torch
def test_full_generate_imports_no_torch(tiny_export, tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from edgediff.runtime import Pipeline
        from edgediff.runtime.cli import main
        pipe = Pipeline.load({str(tiny_export("sd1"))!r})
        result = pipe("a cat", num_inference_steps=3, seed=1, scheduler="dpmpp_2m_karras")
        result.images[0].save({str(tmp_path / "a.png")!r})
        mask = {str(tmp_path / "mask.png")!r}
        result.images[0].convert("L").point(lambda v: 255 * (v > 128)).save(mask)
        runs = [  # text-to-image, image-to-image, inpainting with a standard and with a 9-channel UNet
            ["--model", {str(tiny_export("sd2"))!r}, "-o", {str(tmp_path / "b.png")!r}],
            ["--model", {str(tiny_export("sd1"))!r}, "--image", {str(tmp_path / "a.png")!r}, "--strength", "0.6",
             "-o", {str(tmp_path / "c.png")!r}],
            ["--model", {str(tiny_export("sd1"))!r}, "--image", {str(tmp_path / "a.png")!r}, "--mask", mask,
             "-o", {str(tmp_path / "d.png")!r}],
            ["--model", {str(tiny_export("sd1-inpaint"))!r}, "--image", {str(tmp_path / "a.png")!r}, "--mask", mask,
             "--keep-unmasked", "-o", {str(tmp_path / "e.png")!r}],
            ["--model", {str(tiny_export("sdxl"))!r}, "--prompt-2", "a cow", "--guidance-rescale", "0.5",
             "-o", {str(tmp_path / "f.png")!r}],  # SDXL: both text encoders, size conditioning
            ["--model", {str(tiny_export("sdxl-lcm"))!r}, "-o", {str(tmp_path / "g.png")!r}],  # LCM: timestep_cond
        ]
        for args in runs:
            try:
                main(["generate", "a dog", "--steps", "2", *args], standalone_mode=False)
            except SystemExit:
                pass
        banned = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "optimum"))
        print("BANNED", banned)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "BANNED []" in proc.stdout, proc.stdout
    assert all((tmp_path / f"{name}.png").exists() for name in "abcdefg"), proc.stdout


@pytest.mark.parametrize(
    "module",
    ["edgediff.runtime", "edgediff.engines.onnxruntime", "edgediff.runtime.cli", "edgediff.runtime.serve.app"],
)
def test_runtime_modules_import_without_torch(module):
    banned = "('torch', 'diffusers', 'transformers')"
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in {banned}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
