"""Calibrated static int8 (``edgediff optimize --int8 static``): the calibration data, ONNX Runtime's QDQ UNet
and OpenVINO's NNCF UNet. Both are opt-in, keep the embedded model's fidelity check (calibrated on other
captions than the check's), and are refused once their source changes. Timings live in benchmarks/results."""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest

from cli_check import assert_one_line_error, run_cli  # tests/ is on sys.path
from edgediff.runtime import Pipeline, calibrate, shapes
from edgediff.runtime.errors import InvalidArgumentError, ModelFolderError
from edgediff.runtime.pipeline import embedded_model_path
from shapes_check import CHECK, fidelity, passes

HAS_OPTIMIZE = all(importlib.util.find_spec(m) for m in ("onnx", "sympy"))
HAS_NNCF = all(importlib.util.find_spec(m) for m in ("nncf", "openvino"))
needs_optimize = pytest.mark.skipif(not HAS_OPTIMIZE, reason="needs the optimize extra (onnx, sympy)")
needs_nncf = pytest.mark.skipif(not HAS_NNCF, reason="needs the int8 extra (nncf, openvino)")

_rng = np.random.default_rng(11)
# training captions of other scenes than the fidelity check's: the check never sees its own calibration prompts
PROMPTS = [shapes.caption(scene, _rng) for scene in shapes.sample_scenes(8, seed=11, split="train")]
assert not set(PROMPTS) & set(CHECK)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A copy of the embedded model and 6 x 10 steps of its UNet inputs."""
    folder = tmp_path_factory.mktemp("int8") / "shapes"
    shutil.copytree(embedded_model_path(), folder, ignore=shutil.ignore_patterns("ort-cpu*", "openvino-*"))
    with Pipeline.load(folder) as pipe:
        samples = calibrate.collect(pipe, PROMPTS[:6], steps=10)
    return folder, samples


# ---- calibration data -----------------------------------------------------------------------------------
def test_collect_records_every_unet_call(calibrated):
    samples = calibrated[1]
    assert len(samples) == 6 * 10  # one sample per UNet call: guidance doubles the batch, not the calls
    assert {k: v.shape[0] for k, v in samples[0].items() if v.ndim} == {"sample": 2, "encoder_hidden_states": 2}
    timesteps = [float(s["timestep"]) for s in samples[:10]]
    assert timesteps == sorted(timesteps, reverse=True) and timesteps[0] > 800 > 200 > timesteps[-1]
    assert not np.array_equal(samples[0]["encoder_hidden_states"], samples[10]["encoder_hidden_states"])


def test_prompt_file_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"does not exist.*one prompt per line"):
        calibrate.read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    with pytest.raises(InvalidArgumentError, match="has no prompts"):
        calibrate.read_prompts(empty)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidArgumentError, match="cannot be read as UTF-8"):
        calibrate.read_prompts(binary)
    good = tmp_path / "p.txt"
    good.write_text("# calibration\na red circle\n\na blue square\n")
    assert calibrate.read_prompts(good) == ["a red circle", "a blue square"]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--int8", "static", "--calibration-prompts", "EMPTY"], ["has no prompts"]),
        (["--int8", "static", "--calibration-prompts", "MISSING"], ["does not exist"]),
        (["--engine", "openvino"], ["--engine belongs to --int8 static"]),
        (["--int8", "--calibration-prompts", "EMPTY"], ["--calibration-prompts belongs to --int8 static"]),
    ],
)
def test_cli_calibration_errors(tmp_path, args, needles):
    (tmp_path / "empty.txt").write_text("\n")
    files = {"EMPTY": str(tmp_path / "empty.txt"), "MISSING": str(tmp_path / "missing.txt")}
    folder = tmp_path / "m"
    shutil.copytree(embedded_model_path(), folder, ignore=shutil.ignore_patterns("ort-cpu*", "openvino-*"))
    assert_one_line_error(*run_cli("optimize", folder, *[files.get(a, a) for a in args]), *needles)
    assert not any(p.name.startswith(("ort-cpu", "openvino-")) for p in folder.iterdir())


# ---- ONNX Runtime: static QDQ ----------------------------------------------------------------------------
@needs_optimize
def test_ort_static_int8_keeps_fidelity_and_is_opt_in(calibrated):
    from edgediff.engines.ort_optimize import optimize_folder

    folder, samples = calibrated
    report = optimize_folder(folder, int8="static", calibration=samples, calibration_info={"prompts": 6})["unet"]
    assert report["int8_mode"] == "static" and report["calibration"]["samples"] == 60
    with Pipeline.load(folder, cpu_variant="int8") as pipe:
        assert pipe.engines["unet"].model_file.parent.parent.name == "ort-cpu-int8"
        result = fidelity(pipe)
        int8 = np.asarray(pipe("a red circle", seed=0, num_inference_steps=8).images[0], np.int16)
    assert passes(result), result
    with Pipeline.load(folder) as pipe:  # the default is untouched: fp32
        assert pipe.engines["unet"].model_file.parent.parent.name != "ort-cpu-int8"
        fp32 = np.asarray(pipe("a red circle", seed=0, num_inference_steps=8).images[0], np.int16)
    assert np.abs(int8 - fp32).max() > 0  # it is quantised: the image changes (by how much: benchmarks/results)
    # a dynamic int8 asked for next replaces the static one (not skipped as "up to date")
    assert optimize_folder(folder, int8="dynamic")["unet"]["int8_mode"] == "dynamic"


@needs_optimize
def test_ort_int8_variant_refused_when_its_source_changed(calibrated, tmp_path):
    from edgediff.engines.ort_optimize import optimize_folder

    folder = tmp_path / "m"
    shutil.copytree(calibrated[0], folder, ignore=shutil.ignore_patterns("ort-cpu*", "openvino-*"))
    optimize_folder(folder, int8="static", calibration=calibrated[1][:8])
    unet = folder / "unet" / "model.onnx"
    st = unet.stat()
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ModelFolderError, match=r"no int8 variant .*edgediff optimize .* --int8"):
        Pipeline.load(folder, cpu_variant="int8")


# ---- OpenVINO: NNCF ------------------------------------------------------------------------------------------
@needs_nncf
def test_openvino_nncf_int8_keeps_fidelity_and_is_opt_in(calibrated):
    from edgediff.engines import openvino as ove
    from edgediff.engines.ov_quantize import quantize_unet
    from edgediff.runtime.model_folder import ModelFolder

    folder, samples = calibrated
    report = quantize_unet(ModelFolder.open(folder), samples, {"prompts": 6}, force=True)
    assert report["int8_mode"] == "static" and report["max_relative_difference"] < 0.5
    assert quantize_unet(ModelFolder.open(folder), samples) == {"skipped": "up to date"}
    with Pipeline.load(folder, engine="openvino", cpu_variant="int8") as pipe:
        assert pipe.engines["unet"].model_file.name == "model.xml"
        result = fidelity(pipe)
    assert passes(result), result
    with Pipeline.load(folder, engine="openvino") as pipe:
        assert pipe.engines["unet"].model_file.suffix == ".onnx"
    unet = folder / "unet" / "model.onnx"
    st = unet.stat()
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ove.int8_variant(unet, "unet") is None  # stale: refused, never used blindly
    with pytest.raises(ModelFolderError, match=r"edgediff optimize .* --int8 static"):
        Pipeline.load(folder, engine="openvino", cpu_variant="int8")


@needs_nncf
@needs_optimize
def test_cli_static_int8_for_both_engines(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(embedded_model_path(), folder, ignore=shutil.ignore_patterns("ort-cpu*", "openvino-*"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    code, text = run_cli("optimize", folder, "--int8", "static", "--calibration-prompts", prompts,
                         "--calibration-steps", "4")  # fmt: skip
    assert code == 0, text
    assert "onnxruntime unet: int8 static" in text and "openvino unet: NNCF int8" in text
    out = tmp_path / "o.png"
    code, text = run_cli("generate", "a red circle", "--model", folder, "--engine", "openvino", "--int8",
                         "--steps", "4", "-o", out)  # fmt: skip
    assert code == 0, text
    from edgediff.runtime import parameters

    assert parameters.read_png_parameters(out)["engine_options"]["cpu_variant"] == "int8"
