"""The embedded shapes model: it ships in the package, loads with no folder and no torch, and its
images match their prompts. The fidelity check is sized so a broken runtime fails it: the same
check is run against a deliberately broken tokenizer, swapped guidance and a wrong scheduler
setting, and each of those must fail it."""

import subprocess
import sys
import textwrap

import pytest

from edgediff.runtime import Pipeline, shapes
from shapes_check import edit_check, edit_passes, fidelity, passes  # tests/ is on sys.path


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()


def test_embedded_model_matches_prompts(pipe):
    result = fidelity(pipe)
    print({k: result[k] for k in shapes.ATTRIBUTES})
    assert passes(result), {k: result[k] for k in shapes.ATTRIBUTES}


def test_broken_tokenizer_fails_the_check(pipe, monkeypatch):
    real = pipe.tokenizer.encode
    monkeypatch.setattr(pipe.tokenizer, "encode", lambda prompts, **kw: real([""] * len(prompts), **kw))
    assert not passes(fidelity(pipe))


def test_swapped_guidance_fails_the_check(pipe):
    assert not passes(fidelity(pipe, swap=True))


def test_wrong_scheduler_setting_fails_the_check(pipe):
    wrong = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "epsilon"}
    assert not passes(fidelity(pipe, scheduler=wrong))


def test_loads_and_generates_without_torch(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from edgediff.runtime import Pipeline, shapes
        from edgediff.runtime.cli import main
        image = Pipeline.load()("a red circle on a blue background", num_inference_steps=20, seed=0).images[0]
        print("ANALYSED", shapes.analyse(np.asarray(image)))
        try:
            args = ["generate", "a yellow square on a black background", "-o", {str(tmp_path / "out.png")!r}]
            main([*args, "--steps", "20"], standalone_mode=False)
        except SystemExit:
            pass
        print("BANNED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers")))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "BANNED []" in proc.stdout
    assert "'colour': 'red'" in proc.stdout and "'background': 'blue'" in proc.stdout, proc.stdout
    assert (tmp_path / "out.png").exists()


@pytest.mark.parametrize("kind,strength", [("background", 0.7), ("colour", 1.0)])
def test_embedded_model_edits_as_asked(pipe, kind, strength):
    """img2img changes the background and keeps the object; inpainting recolours the masked object and leaves the
    pixels well outside the mask close to the input."""
    result = edit_check(pipe, kind, strength)
    assert edit_passes(result), {k: v for k, v in result.items() if k != "items"}


def test_reversed_strength_fails_the_edit_check(pipe, monkeypatch):
    from edgediff.runtime import pipeline as pipeline_module

    begin = pipeline_module._begin_index
    monkeypatch.setattr(pipeline_module, "_begin_index", lambda n, s, order: begin(n, 1 - s + 1e-9, order))
    result = edit_check(pipe, "background", 0.8)
    assert not edit_passes(result), {k: v for k, v in result.items() if k != "items"}


def test_inverted_mask_fails_the_edit_check(pipe):
    result = edit_check(pipe, "colour", 1.0, invert_mask=True)
    assert not edit_passes(result), {k: v for k, v in result.items() if k != "items"}
