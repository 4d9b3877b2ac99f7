"""An image's parameters reproduce it (issue 12): every scheduler name and option set, generated through the
CLI to a PNG and regenerated from that PNG, gives identical pixels; the A1111 text alone rebuilds the same
call; a changed recorded option changes the pixels (so the record is what is used). Torch-free: the
committed micro model."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cli_check import assert_one_line_error, run_cli
from edgediff.runtime import schedulers
from edgediff.runtime.model_folder import ModelFolder
from edgediff.runtime.parameters import (
    ParametersError,
    call_arguments,
    format_parameters,
    parse_parameters_text,
    read_png_parameters,
)

MICRO = Path(__file__).parent / "fixtures" / "micro-sd1"
SHORT_NAMES = [n for n in schedulers.known_names() if n not in schedulers.SCHEDULERS]
OPTION_SETS = {
    "dpmpp_2m order 3": ["--scheduler", "dpmpp_2m", "--scheduler-option", "solver_order=3", "--steps", "5"],
    "dpmpp_2m_sde heun": ["--scheduler", "dpmpp_2m_sde", "--scheduler-option", "solver_type=heun"],
    "dpmpp_2m lu lambdas": ["--scheduler", "dpmpp_2m", "--scheduler-option", "use_lu_lambdas=true"],
    "dpmpp_2m sde by option": ["--scheduler", "DPMSolverMultistepScheduler", "--scheduler-option",
                               "algorithm_type=sde-dpmsolver++", "--scheduler-option", "solver_order=1"],
    "euler exponential": ["--scheduler", "euler", "--scheduler-option", "use_exponential_sigmas=true"],
    "unipc order 3": ["--scheduler", "unipc", "--scheduler-option", "solver_order=3", "--steps", "5"],
    "ddim eta": ["--scheduler", "ddim", "--eta", "0.5"],
    "ddim trailing": ["--scheduler", "ddim", "--scheduler-option", "timestep_spacing=trailing"],
    "euler timesteps": ["--scheduler", "euler", "--timesteps", "999,650.5,300,20"],
    "euler sigmas": ["--scheduler", "euler", "--sigmas", "14.6,3.5,0.9,0.0"],
    "dpmpp_2m timesteps": ["--scheduler", "dpmpp_2m", "--timesteps", "999,600,200"],
    "ddpm timesteps": ["--scheduler", "ddpm", "--timesteps", "999,500,100"],
    "lcm timesteps": ["--scheduler", "lcm", "--timesteps", "999,499"],
    "class name": ["--scheduler", "EulerDiscreteScheduler"],
    "model default, negative prompt": ["--negative-prompt", "blurry, dark: no", "--guidance", "5.5"],
}  # fmt: skip
CASES = {**{name: ["--scheduler", name] for name in SHORT_NAMES}, **OPTION_SETS}


def generate(out: Path, *args) -> Path:
    code, output = run_cli("generate", *args, "--model", MICRO, "-o", out)
    assert code == 0, output
    return out


def make(tmp_path: Path, case: str, name: str = "a.png") -> Path:
    return generate(tmp_path / name, "a red circle", "--seed", "7", "--steps", "3", *CASES[case])


def regenerate(src: Path, out: Path, *args) -> Path:
    return generate(out, "--from-png", src, *args)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def chunks(path: Path) -> dict:
    with Image.open(path) as im:
        im.load()
        return dict(im.text)


def rewrite(src: Path, dst: Path, **text) -> Path:
    """``src``'s pixels with the given text chunks only (``edgediff=`` a dict is written as JSON)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, json.dumps(value) if isinstance(value, dict) else value)
    Image.fromarray(pixels(src)).save(dst, pnginfo=info)
    return dst


@pytest.mark.parametrize("case", CASES)
def test_png_regenerates_identical_pixels(case, tmp_path):
    a = make(tmp_path, case)
    record = json.loads(chunks(a)["edgediff"])
    if case in SHORT_NAMES:
        assert record["scheduler"] == case  # the issue: dpmpp_2m_sde used to be recorded as dpmpp_2m
    b = regenerate(a, tmp_path / "b.png")
    assert np.array_equal(pixels(a), pixels(b))
    assert json.loads(chunks(b)["edgediff"]) == record  # the regenerated image records the same call

    # the A1111 text alone rebuilds the same call over the same model: same scheduler config, same arguments
    from_text = call_arguments(parse_parameters_text(chunks(a)["parameters"]))
    from_json = call_arguments(record)
    base = ModelFolder.open(MICRO).scheduler_config
    rebuilt = schedulers.resolve(from_text.pop("scheduler"), base, eta=from_text["eta"])
    assert rebuilt.class_name == record["scheduler_class"]
    assert rebuilt.config == record["scheduler_config"]
    from_json.pop("scheduler")
    assert from_text == from_json


@pytest.mark.parametrize("case", ["dpmpp_2m_sde_karras", "dpmpp_2m order 3", "ddim eta", "euler sigmas",
                                  "lcm timesteps", "model default, negative prompt"])  # fmt: skip
def test_a1111_text_alone_regenerates_identical_pixels(case, tmp_path):
    a = make(tmp_path, case)
    text_only = rewrite(a, tmp_path / "text.png", parameters=chunks(a)["parameters"])
    assert np.array_equal(pixels(a), pixels(regenerate(text_only, tmp_path / "b.png")))


def _set(record: dict, path: str, value) -> dict:
    record = json.loads(json.dumps(record))
    *parents, key = path.split(".")
    target = record
    for p in parents:
        target = target[p]
    if key.isdigit():
        target[int(key)] = value
    else:
        target[key] = value
    return record


@pytest.mark.parametrize(
    "case, path, value",
    [
        ("dpmpp_2m", "scheduler_config.algorithm_type", "sde-dpmsolver++"),
        ("dpmpp_2m order 3", "scheduler_config.solver_order", 2),
        ("unipc order 3", "scheduler_config.solver_order", 2),
        ("dpmpp_2m_sde heun", "scheduler_config.solver_type", "midpoint"),
        ("euler_karras", "scheduler_config.use_karras_sigmas", False),
        ("ddim eta", "eta", 0.0),
        ("euler timesteps", "timesteps.1", 640.0),
        ("euler sigmas", "sigmas.1", 3.0),
    ],
)
def test_changed_recorded_option_changes_pixels(case, path, value, tmp_path):
    """Negative control: the JSON record is what drives the regeneration."""
    a = make(tmp_path, case)
    changed = _set(json.loads(chunks(a)["edgediff"]), path, value)
    edited = rewrite(a, tmp_path / "edited.png", parameters=chunks(a)["parameters"], edgediff=changed)
    b = regenerate(edited, tmp_path / "b.png")
    assert not np.array_equal(pixels(a), pixels(b))
    assert _set(json.loads(chunks(b)["edgediff"]), path, value) == json.loads(chunks(b)["edgediff"])


def test_changed_text_option_changes_pixels(tmp_path):
    a = make(tmp_path, "dpmpp_2m order 3")
    text = chunks(a)["parameters"]
    assert "Sampler: DPM++ 3M, Schedule type: Uniform" in text and "Scheduler options: solver_order=3" in text
    edited = rewrite(a, tmp_path / "edited.png", parameters=text.replace("solver_order=3", "solver_order=2"))
    b = regenerate(edited, tmp_path / "b.png")
    assert not np.array_equal(pixels(a), pixels(b))
    assert json.loads(chunks(b)["edgediff"])["scheduler_config"]["solver_order"] == 2


def test_command_line_overrides_the_record(tmp_path):
    a = make(tmp_path, "dpmpp_2m order 3")
    # --seed and --scheduler-option over the recorded call = a fresh call with those values
    b = regenerate(a, tmp_path / "b.png", "--seed", "8", "--scheduler-option", "solver_type=heun")
    fresh = generate(tmp_path / "fresh.png", "a red circle", "--seed", "8", "--steps", "5", "--scheduler", "dpmpp_2m",
                     "--scheduler-option", "solver_order=3", "--scheduler-option", "solver_type=heun")  # fmt: skip
    assert np.array_equal(pixels(b), pixels(fresh)) and not np.array_equal(pixels(a), pixels(b))
    assert json.loads(chunks(b)["edgediff"]) == json.loads(chunks(fresh)["edgediff"])
    # --scheduler replaces the recorded scheduler and its options; PROMPT replaces the prompt
    c = regenerate(a, tmp_path / "c.png", "a blue square", "--scheduler", "euler")
    record = json.loads(chunks(c)["edgediff"])
    assert record["scheduler"] == "euler" and record["scheduler_options"] == {} and record["prompt"] == "a blue square"
    assert record["seed"] == 7 and record["num_inference_steps"] == 5
    # --steps replaces a recorded custom schedule
    t = make(tmp_path, "euler timesteps", "t.png")
    record = json.loads(chunks(regenerate(t, tmp_path / "d.png", "--steps", "2"))["edgediff"])
    assert record["timesteps"] is None and record["num_inference_steps"] == 2


def test_params_file_json_or_text(tmp_path):
    a = make(tmp_path, "dpmpp_2m_sde heun")
    (tmp_path / "p.json").write_text(chunks(a)["edgediff"])
    (tmp_path / "p.txt").write_text(chunks(a)["parameters"])
    for name in ("p.json", "p.txt"):
        b = generate(tmp_path / f"{name}.png", "--params", tmp_path / name)
        assert np.array_equal(pixels(a), pixels(b))


def test_python_api_reproduces_from_the_record():
    from edgediff.runtime import Pipeline

    with Pipeline.load(MICRO) as pipe:
        first = pipe("a cat", num_inference_steps=3, seed=2, scheduler="dpmpp_2m_sde", timesteps=[999, 500, 20])
        again = pipe(**call_arguments(first.parameters))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert again.parameters == first.parameters


def test_images_from_caller_latents_are_not_regenerated(tmp_path):
    """latents= are not in the record, so an image made from them is refused, not silently redrawn."""
    from edgediff.runtime import Pipeline
    from edgediff.runtime.image import save_png

    with Pipeline.load(MICRO) as pipe:
        result = pipe("a cat", num_inference_steps=2, latents=np.zeros((1, 4, 16, 16), np.float32))
    assert result.parameters["custom_latents"] is True
    with pytest.raises(ParametersError, match="starting latents the caller passed in"):
        call_arguments(result.parameters)
    png = save_png(result.images[0], tmp_path / "l.png", result.parameters)
    assert_one_line_error(*run_cli("generate", "--from-png", png, "--model", MICRO, "-o", tmp_path / "again.png"),
                          "starting latents the caller passed in")  # fmt: skip
    assert not (tmp_path / "again.png").exists()


def test_img2img_records_are_refused_and_name_their_strength():
    """The starting image is not in the record: refused rather than silently redrawn as txt2img."""
    from edgediff.runtime import Pipeline

    image = np.full((32, 32, 3), 128, np.uint8)
    with Pipeline.load(MICRO) as pipe:
        result = pipe("a cat", image=image, strength=0.5, num_inference_steps=4, seed=1)
    assert "Denoising strength: 0.5" in format_parameters(result.parameters)
    assert parse_parameters_text(format_parameters(result.parameters))["strength"] == 0.5
    with pytest.raises(ParametersError, match="image-to-image from a starting image"):
        call_arguments(result.parameters)


# -- the A1111 text ---------------------------------------------------------------------------------------
def test_text_uses_a1111_names_and_keeps_ours():
    record = {"prompt": "a cat", "negative_prompt": "ugly", "num_inference_steps": 20, "guidance_scale": 7.0,
              "seed": 42, "width": 512, "height": 768, "scheduler": "dpmpp_2m_sde_karras",
              "scheduler_class": "DPMSolverMultistepScheduler",
              "scheduler_config": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
              "scheduler_options": {"lower_order_final": False}, "model": "sd15, fp16",
              "model_hash": "0123456789abcdef",
              "edgediff_version": "0.1.0"}  # fmt: skip
    lines = format_parameters(record).splitlines()
    assert lines[:2] == ["a cat", "Negative prompt: ugly"]
    assert lines[2] == (
        "Steps: 20, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 512x768, "
        'Model hash: 0123456789, Model: "sd15, fp16", RNG: CPU, Scheduler: dpmpp_2m_sde_karras, '
        "Scheduler options: lower_order_final=false, Version: edgediff 0.1.0"
    )
    parsed = parse_parameters_text("\n".join(lines))
    assert parsed["model"] == "sd15, fp16" and parsed["scheduler_options"] == {"lower_order_final": False}
    assert (parsed["width"], parsed["height"], parsed["seed"], parsed["guidance_scale"]) == (512, 768, 42, 7.0)


@pytest.mark.parametrize(
    "sampler, schedule, name, options",
    [
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras", {}),
        ("DPM++ 2M", "Automatic", "dpmpp_2m_karras", {}),  # A1111's default schedule for DPM++ 2M
        ("DPM++ 2M", "Uniform", "dpmpp_2m", {}),
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras", {}),  # A1111 before 1.9
        ("DPM++ 2M SDE Heun", "Exponential", "dpmpp_2m_sde", {"solver_type": "heun", "use_exponential_sigmas": True}),
        ("DPM++ 3M SDE", "Karras", "dpmpp_2m_sde_karras", {"solver_order": 3}),
        ("Euler a", "Automatic", "euler_a", {}),
        ("Euler", "SGM Uniform", "euler", {"timestep_spacing": "trailing"}),
        ("PLMS", None, "pndm", {"skip_prk_steps": True}),
        ("dpmpp_2m_karras", None, "dpmpp_2m_karras", {}),  # edgediff before issue 12
    ],
)
def test_a1111_sampler_names_map_back(sampler, schedule, name, options):
    pairs = f"Steps: 20, Sampler: {sampler}, " + (f"Schedule type: {schedule}, " if schedule else "")
    parsed = parse_parameters_text(f"a cat\n{pairs}CFG scale: 7, Seed: 42, Size: 512x512, Model: m, Version: v1.10.1")
    assert (parsed["scheduler"], parsed["scheduler_options"]) == (name, options)
    assert (parsed["num_inference_steps"], parsed["seed"], parsed["prompt"]) == (20, 42, "a cat")
    assert "edgediff_version" not in parsed


@pytest.mark.parametrize(
    "sampler, schedule, needle",
    [("Restart", "Automatic", "'Restart' has no edgediff scheduler"), ("DDIM", "Karras", "DDIMScheduler has no")],
)
def test_a1111_names_without_equivalent_are_refused(sampler, schedule, needle):
    with pytest.raises(ParametersError, match=needle):
        parse_parameters_text(f"x\nSteps: 20, Sampler: {sampler}, Schedule type: {schedule}, Seed: 1, Size: 8x8")


def test_multiline_prompts_and_quotes_round_trip():
    record = {"prompt": 'a "cat",\nsecond line: yes', "negative_prompt": "ugly,\nbad", "num_inference_steps": 2,
              "guidance_scale": 1.0, "seed": 0, "width": 8, "height": 8, "scheduler": "euler",
              "timesteps": [999.0, 500.5]}  # fmt: skip
    parsed = parse_parameters_text(format_parameters(record))
    assert parsed["prompt"] == record["prompt"] and parsed["negative_prompt"] == record["negative_prompt"]
    assert parsed["timesteps"] == [999.0, 500.5] and parsed["scheduler"] == "euler"


# -- errors -----------------------------------------------------------------------------------------------
def _error(tmp_path, *args, needles):
    out = tmp_path / "out.png"
    assert_one_line_error(*run_cli("generate", *args, "-o", out), *needles)
    assert not out.exists()


def test_png_without_parameters_is_one_line_error(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    _error(tmp_path, "--from-png", tmp_path / "plain.png", needles=["plain.png holds no generation parameters"])
    (tmp_path / "notes.txt").write_text("hello")
    _error(tmp_path, "--from-png", tmp_path / "notes.txt", needles=["cannot read", "notes.txt as an image"])
    _error(tmp_path, "--from-png", tmp_path / "missing.png", needles=["missing.png does not exist"])
    with pytest.raises(ParametersError, match="holds no generation parameters"):
        read_png_parameters(tmp_path / "plain.png")


def test_unusable_records_are_one_line_errors(tmp_path):
    a = make(tmp_path, "euler")
    record = json.loads(chunks(a)["edgediff"])
    cases = [
        ({"edgediff": "{not json"}, ["'edgediff' chunk of", "is not valid JSON"]),
        ({"edgediff": {**record, "num_images_per_prompt": 2}}, ["records a batch", "call_arguments"]),
        ({"edgediff": {**record, "seed": None}}, ["does not record seed", "--seed"]),
        ({"edgediff": {**record, "scheduler_class": "WarpScheduler"}}, ["WarpScheduler"]),
        ({"parameters": "a cat\nSteps: 3, Sampler: Restart, Seed: 1, Size: 32x32"}, ["'Restart'"]),
        ({"parameters": "a cat\nSteps: many, CFG scale: 7, Seed: 1, Size: 32x32"}, ["cannot read Steps: 'many'"]),
    ]
    for i, (text, needles) in enumerate(cases):
        png = rewrite(a, tmp_path / f"bad{i}.png", **text)
        _error(tmp_path, "--from-png", png, "--model", MICRO, needles=needles)


def test_embedded_model_needs_no_model_and_another_model_is_noted(tmp_path):
    a = tmp_path / "a.png"
    code, output = run_cli("generate", "a red circle on a blue background", "--steps", "2", "--seed", "1", "-o", a)
    assert code == 0, output
    code, output = run_cli("generate", "--from-png", a, "-o", tmp_path / "b.png")
    assert code == 0, output
    assert np.array_equal(pixels(a), pixels(tmp_path / "b.png"))
    code, output = run_cli("generate", "--from-png", a, "--model", MICRO, "-o", tmp_path / "c.png")
    assert code == 0, output
    assert output.splitlines()[0].startswith("note: ") and "made with the model 'shapes'" in output


def test_record_of_another_model_needs_model(tmp_path):
    a = make(tmp_path, "euler")
    _error(tmp_path, "--from-png", a, needles=["made with the model 'micro-sd1'", "pass its folder with --model"])


def test_bad_command_lines_are_one_line_errors(tmp_path):
    m = ("--model", MICRO)
    _error(tmp_path, *m, needles=["give a PROMPT, --from-file PROMPTS, or --from-png"])
    _error(tmp_path, "x", *m, "--scheduler", "dpmpp_2m", "--scheduler-option", "solver_ordr=3",
           needles=["solver_ordr", "DPMSolverMultistepScheduler has no such option", "solver_order"])  # fmt: skip
    _error(tmp_path, "x", *m, "--scheduler-option", "eta=0.3", needles=["PNDMScheduler has no such option", "--eta"])
    _error(tmp_path, "x", *m, "--scheduler-option", "solver_order", needles=["KEY=VALUE"])
    _error(tmp_path, "x", *m, "--timesteps", "999,half", needles=["--timesteps must be comma-separated numbers"])
    _error(tmp_path, "x", *m, "--scheduler", "pndm", "--timesteps", "999,500", needles=["does not accept custom"])
    (tmp_path / "p.json").write_text("[1, 2]")
    _error(tmp_path, *m, "--params", tmp_path / "p.json", needles=["must hold a JSON object"])
    _error(tmp_path, *m, "--params", tmp_path / "p.json", "--from-png", tmp_path / "p.json", needles=["not both"])
    (tmp_path / "p.txt").write_text("just a prompt\n")
    _error(tmp_path, *m, "--params", tmp_path / "p.txt", needles=["p.txt holds no generation parameters"])
