"""Bad input gets a specific exception in Python and, from the CLI, one line and exit code 1."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cli_check import assert_one_line_error, run_cli
from conftest import needs_torch
from edgediff.runtime import (
    EngineInputError,
    ExportError,
    InvalidArgumentError,
    ManifestError,
    ModelFolderError,
    Pipeline,
    UnknownSchedulerError,
)

pytestmark = needs_torch


@pytest.fixture()
def model_copy(tiny_export, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_export("sd1"), dst)
    return dst


# ---- model folder ---------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        Pipeline.load(tmp_path / "nope")
    assert_one_line_error(*run_cli("generate", "x", "--model", tmp_path / "nope"), "does not exist")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match=r"model_index.json"):
        Pipeline.load(tmp_path)


def test_missing_component(model_copy):
    (model_copy / "unet" / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"unet/model.onnx is missing.*re-export"):
        Pipeline.load(model_copy)
    assert_one_line_error(*run_cli("generate", "x", "--model", model_copy), "unet/model.onnx is missing")


def test_truncated_component(model_copy):
    path = model_copy / "vae_decoder" / "model.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match=r"vae_decoder/model.onnx is \d+ bytes.*truncated"):
        Pipeline.load(model_copy)


def test_damaged_component_detected_by_hash(model_copy):
    path = model_copy / "text_encoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    code, output = run_cli("info", model_copy)
    assert code == 1 and "text_encoder/model.onnx does not match its sha256" in output


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"format": 1})])  # unreadable: no further check
def test_corrupted_manifest(model_copy, content):
    (model_copy / "edgediff.json").write_text(content)
    with pytest.raises(ManifestError, match=r"edgediff.json is corrupted"):
        Pipeline.load(model_copy)
    assert_one_line_error(*run_cli("generate", "x", "--model", model_copy), "edgediff.json is corrupted")


# ---- generation arguments -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_export):
    return Pipeline.load(tiny_export("sd1"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(width=33), r"width must be a positive multiple of 4 \(the VAE's factor 2 x the UNet's down-sampling 2"),
        (dict(height=0), "height must be a positive multiple of 4"),
        (dict(width=-32), "width must be a positive multiple"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(num_inference_steps=-3), "num_inference_steps must be an integer >= 1"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt=[]), "non-empty list"),
        (dict(prompt=["a", 3]), "non-empty list of strings"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries"),
        (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), r"latents must have shape \[1, 4, 16, 16\]"),
    ],
)
def test_bad_generation_arguments(pipe, kwargs, match):
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    with pytest.raises(InvalidArgumentError, match=match):
        pipe(**kwargs)


def test_unknown_scheduler(pipe, tiny_export):
    with pytest.raises(UnknownSchedulerError, match="unknown scheduler 'warp'; known: pndm, ddim"):
        pipe("a cat", scheduler="warp")
    assert_one_line_error(*run_cli("generate", "x", "--model", tiny_export("sd1"), "--scheduler", "warp"), "warp")


@pytest.mark.parametrize(
    "args,needle", [(["--width", "31"], "width must be"), (["--steps", "0"], "num_inference_steps")]
)
def test_cli_bad_arguments(tiny_export, tmp_path, args, needle):
    out = tmp_path / "o.png"
    assert_one_line_error(*run_cli("generate", "x", "--model", tiny_export("sd1"), "-o", out, *args), needle)
    assert not out.exists()


def test_engine_input_errors_name_the_tensor(pipe):
    te = pipe.engines["text_encoder"]
    with pytest.raises(EngineInputError, match=r"missing \['input_ids'\].*unexpected \['ids'\]"):
        te.run({"ids": np.zeros((1, 77), np.int64)})
    with pytest.raises(EngineInputError, match="input 'input_ids' expects rank 2"):
        te.run({"input_ids": np.zeros((77,), np.int64)})
    with pytest.raises(EngineInputError, match="input 'input_ids' is int32 in the model, got float32"):
        te.run({"input_ids": np.zeros((1, 77), np.float32)})


# ---- export -------------------------------------------------------------------------------------
def test_export_missing_source(tmp_path):
    from edgediff.export import export_model

    with pytest.raises(ExportError, match="does not exist"):
        export_model(tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(*run_cli("export", tmp_path / "nope", tmp_path / "out"), "does not exist")


def test_export_unsupported_source(tmp_path):
    from edgediff.export import export_model

    (tmp_path / "src").mkdir()
    with pytest.raises(ExportError, match="not a diffusers model folder"):
        export_model(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ExportError, match="holds a 'FluxPipeline'"):
        export_model(tmp_path / "src", tmp_path / "out")


def test_export_refuses_existing_out(tiny_source, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_one_line_error(*run_cli("export", tiny_source("sd1"), tmp_path / "out"), "already exists", "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_no_traceback_from_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgediff.runtime.cli", "generate", "x", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: model folder") and "Traceback" not in proc.stderr
