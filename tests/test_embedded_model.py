"""The embedded shapes model: it ships in the package, loads with no folder and no torch, and its
images match their prompts. The fidelity check is sized so a broken runtime fails it: the same
check is run against a deliberately broken tokenizer, swapped guidance and a wrong scheduler
setting, and each of those must fail it."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgediff.runtime import Pipeline, shapes

# 12 training-split captions (scene and wording seed 7), image seed = index. Measured on the shipped
# model (shapes-v1): colour, background, shape and position all 1.0. A broken tokenizer gives
# colour 0.08 / background 0.25 / shape 0.17 / position 0.17; swapped guidance 0.08 / 0.0 / 0.17 /
# 0.33; an epsilon scheduler on this v-prediction model 0.17 / 0.0 / 0.25 / 0.25. The thresholds
# leave room for float differences between machines, none for a broken runtime.
_rng = np.random.default_rng(7)
CHECK = [shapes.caption(scene, _rng) for scene in shapes.sample_scenes(12, seed=7, split="train")]
MINIMUM = {"colour": 0.9, "background": 0.9, "shape": 0.8, "position": 0.9}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()


def fidelity(pipe, swap=False, **kwargs):
    images = []
    for seed, prompt in enumerate(CHECK):
        # swapped guidance: the prompt in the unconditional slot, the empty prompt in the conditional one
        text = dict(prompt="", negative_prompt=prompt) if swap else dict(prompt=prompt)
        result = pipe(**text, num_inference_steps=20, guidance_scale=5.0, seed=seed, **kwargs)
        images.append(np.asarray(result.images[0]))
    return shapes.score(CHECK, images)


def passes(result) -> bool:
    return all(result[k] >= v for k, v in MINIMUM.items())


def test_embedded_model_matches_prompts(pipe):
    result = fidelity(pipe)
    print({k: result[k] for k in shapes.ATTRIBUTES})
    assert passes(result), {k: result[k] for k in shapes.ATTRIBUTES}


def test_broken_tokenizer_fails_the_check(pipe, monkeypatch):
    real = pipe.tokenizer.encode
    monkeypatch.setattr(pipe.tokenizer, "encode", lambda prompts: real([""] * len(prompts)))
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
            main(["generate", "a yellow square on a black background", "-o", {str(tmp_path / "out.png")!r}, "--steps", "20"],
                 standalone_mode=False)
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
