"""Issue 11, the runtime side: bad sizes, requests that cannot fit in memory, non-finite numbers,
seeds that cannot be reproduced, output paths, damaged or edited model folders. Each case: the
API raises the specific error; the CLI prints one line, exits 1, and writes or deletes nothing.

Torch-free: runs in the lean stage, on copies of the committed micro-sd1 folder (``M`` in the
issue) and on the embedded model."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cli_check import assert_one_line_error, run_cli
from edgediff.runtime import (
    EngineUnavailableError,
    InvalidArgumentError,
    ManifestError,
    ModelConfigError,
    ModelFolderError,
    NonFiniteError,
    OutputPathError,
    Pipeline,
    ResourceError,
)
from edgediff.runtime.rng import TorchCPUGenerator

MICRO = Path(__file__).parent / "fixtures" / "micro-sd1"


@pytest.fixture()
def model(tmp_path):
    """M: a private copy of the micro SD1 export."""
    dst = tmp_path / "M"
    shutil.copytree(MICRO, dst)
    return dst


@pytest.fixture(scope="module")
def micro():
    return Pipeline.load(MICRO)


@pytest.fixture(scope="module")
def embedded():
    return Pipeline.load()


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".", 1)
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    path.write_text(json.dumps(data, indent=2))


_DELETE = object()


# ---- 4. sizes the UNet cannot take ----------------------------------------------------------
def test_size_rule_is_vae_factor_times_unet_downsampling(embedded, micro):
    assert embedded.folder.size_multiple == 16  # VAE 4 x UNet 4 (three levels)
    with pytest.raises(
        InvalidArgumentError,
        match=r"width must be a positive multiple of 16 \(the VAE's factor 4 "
        r"x the UNet's down-sampling 4\), got 68; nearest valid: 64 or 80",
    ):
        embedded("x", width=68, height=64, num_inference_steps=1)
    assert micro.folder.size_multiple == 4
    with pytest.raises(InvalidArgumentError, match="got 34; nearest valid: 32 or 36"):
        micro("x", width=34, num_inference_steps=1)
    with pytest.raises(InvalidArgumentError, match=r"got 2; nearest valid: 4$"):
        micro("x", height=2, num_inference_steps=1)
    micro("x", width=36, height=28, num_inference_steps=1)  # valid non-native sizes still run


def test_cli_size_rule(tmp_path):
    out = tmp_path / "o.png"
    assert_one_line_error(
        *run_cli("generate", "x", "--width", "68", "--height", "64", "-o", out), "nearest valid: 64 or 80"
    )
    assert not out.exists()


# ---- 5. requests that cannot fit --------------------------------------------------------------
def test_huge_request_refused_before_allocating(embedded):
    with pytest.raises(ResourceError) as info:
        embedded("x", width=65536, height=65536, num_inference_steps=1)
    msg = str(info.value)
    assert "65536x65536" in msg and "GiB available now" in msg and "memory_limit=None" in msg and "fits" in msg


def test_memory_limit_is_the_users(tmp_path):
    pipe = Pipeline.load(memory_limit=2**30)  # 1 GiB
    with pytest.raises(
        ResourceError,
        match=r"512x512 x 1 image\(s\) needs about .* GiB in the vae_decoder .* "
        r"more than the 1.0 GiB allowed by memory_limit",
    ):
        pipe("x", width=512, height=512, num_inference_steps=1)
    pipe("x", width=64, height=64, num_inference_steps=1)  # what fits still runs
    with pytest.raises(InvalidArgumentError, match="memory_limit must be"):
        Pipeline.load(memory_limit=-3)
    out = tmp_path / "o.png"
    args = ("generate", "x", "--width", "512", "--height", "512", "--memory-limit", "1", "-o", out)
    assert_one_line_error(*run_cli(*args),
                    "allowed by memory_limit", "--memory-limit off")  # fmt: skip
    assert_one_line_error(*run_cli("generate", "x", "--memory-limit", "lots", "-o", out), "--memory-limit must be")
    bench = ("bench", "--width", "1024", "--height", "1024", "--memory-limit", "2")
    assert_one_line_error(*run_cli(*bench), "more than the 2.0 GiB allowed by memory_limit", "fits")
    assert not out.exists()


def test_allocation_failure_inside_the_engine_is_a_resource_error():
    """A real ONNX Runtime allocation failure (address space capped below the VAE's 1 GiB
    attention scores at 512 px, the estimate turned off) becomes one ResourceError line."""
    code = textwrap.dedent(
        """
        import resource
        from edgediff.runtime import Pipeline, ResourceError
        pipe = Pipeline.load(memory_limit=None, threads=1)
        limit = 3 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            pipe("a red circle", num_inference_steps=1, width=512, height=512, seed=0)
            print("RAN")
        except ResourceError as e:
            print("RESOURCE", e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(("RESOURCE", "RAN")))
    assert line.startswith("RESOURCE") and "ran out of memory" in line and "reduce the width/height" in line, line
    assert "bfc_arena.cc" not in line  # the C++ location is cut, the node and the size stay
    assert "Failed to allocate memory" in line
    assert "[E:onnxruntime" not in proc.stderr  # ONNX Runtime's own log line stays quiet


def test_engine_failure_is_one_line():
    """What the size rule prevents, seen at the engine: ONNX Runtime's Concat failure as one line."""
    from edgediff.engines.onnxruntime import OrtEngine
    from edgediff.runtime import EngineRunError

    unet = OrtEngine(MICRO / "unet" / "model.onnx", component="unet")
    feeds = {"sample": np.zeros((1, 4, 16, 17), np.float32), "timestep": np.array(5.0, np.float32),
             "encoder_hidden_states": np.zeros((1, 77, 16), np.float32)}  # fmt: skip
    with pytest.raises(EngineRunError) as info:
        unet.run(feeds)
    msg = str(info.value)
    assert msg.startswith("unet failed in ONNX Runtime on inputs sample [1, 4, 16, 17]") and "Concat node" in msg
    assert "\n" not in msg and "concatbase.h" not in msg


# ---- 6. non-finite and out-of-range numbers ---------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
        (dict(guidance_scale="7"), "guidance_scale must be a number"),
        (dict(eta=float("nan")), "eta must be a finite number >= 0"),
        (dict(eta=-5.0, scheduler="ddim"), "eta must be a finite number >= 0"),
        (dict(latents=np.full((1, 4, 16, 16), np.nan, np.float32)), "latents contain NaN or infinite"),
        (dict(latents=np.full((1, 4, 16, 16), 1e39)), "beyond float32's range"),
    ],
)
def test_non_finite_arguments_refused(micro, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        micro("x", num_inference_steps=2, **kwargs)


@pytest.mark.parametrize("flag,value", [("--guidance", "nan"), ("--guidance", "inf"), ("--eta", "nan")])
def test_cli_non_finite_arguments(tmp_path, flag, value):
    out = tmp_path / "o.png"
    assert_one_line_error(*run_cli("generate", "x", "--model", MICRO, flag, value, "-o", out), "finite number")
    assert not out.exists()


def test_latents_that_stop_being_finite_raise_naming_the_step(tmp_path, monkeypatch):
    pipe = Pipeline.load(MICRO)
    unet = pipe.engines["unet"]
    real, calls = unet.run, []

    def diverging(feeds):
        calls.append(1)
        out = real(feeds)
        return {"out_sample": out["out_sample"] * (np.inf if len(calls) == 2 else 1)}

    monkeypatch.setattr(unet, "run", diverging)  # PNDM: 3 steps are 4 UNet calls (its duplicated timestep)
    with pytest.raises(NonFiniteError, match=r"at step 2 of 4 \(timestep [\d.]+\) with PNDMScheduler"):
        pipe("x", num_inference_steps=3, seed=0)


def test_decoder_that_overflows_raises(monkeypatch):
    pipe = Pipeline.load(MICRO)
    vae = pipe.engines["vae_decoder"]
    real = vae.run
    monkeypatch.setattr(vae, "run", lambda feeds: {"sample": real(feeds)["sample"] * np.nan})
    with pytest.raises(NonFiniteError, match="VAE decoder produced NaN or infinite pixels"):
        pipe("x", num_inference_steps=1, seed=0)


# ---- 8. seeds that reproduce ------------------------------------------------------------------
def test_seed_outside_torchs_range(micro, tmp_path):
    with pytest.raises(InvalidArgumentError, match="outside the range torch accepts"):
        micro("x", num_inference_steps=1, seed=2**70)
    out = tmp_path / "o.png"
    assert_one_line_error(
        *run_cli("generate", "x", "--model", MICRO, "--seed", str(2**70), "-o", out), "outside the range"
    )
    assert not out.exists()


def test_seed_and_generator_together_refused_and_generator_recorded(micro):
    with pytest.raises(InvalidArgumentError, match="pass seed or generator, not both"):
        micro("x", num_inference_steps=1, seed=123, generator=TorchCPUGenerator(5))
    result = micro("x", num_inference_steps=1, generator=TorchCPUGenerator(5))
    assert result.parameters["seed"] == 5  # what drew the noise
    same = micro("x", num_inference_steps=1, seed=5)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(same.images[0]))

    class Foreign:  # a generator without a seed: nothing false is recorded
        def randn(self, shape):
            return np.zeros(shape, np.float32)

    assert micro("x", num_inference_steps=1, generator=Foreign()).parameters["seed"] is None


# ---- 9. output paths, checked before the work ------------------------------------------------
@pytest.fixture()
def no_generation(monkeypatch):
    """Fails the test if a model is loaded: the path check must come first."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, *a, **k: boom()))


def test_output_path_checked_first(tmp_path, no_generation):
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path, "is an existing folder"),
        ("", "names no file"),
        (tmp_path / "file" / "o.png", "is a file, not a folder"),
        ("/proc/edgediff-test/o.png", "is not writable"),
    ]
    for path, needle in cases:
        assert_one_line_error(*run_cli("generate", "x", "-o", path), needle)
        assert_one_line_error(*run_cli("bench", "-o", path), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_write_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from PIL import Image

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "sub" / "o.png"
    assert_one_line_error(*run_cli("generate", "x", "--model", MICRO, "--steps", "1", "-o", out),
                    f"cannot write {out}: No space left on device")  # fmt: skip
    assert not out.exists() and not [p for p in (tmp_path / "sub").iterdir()]


def test_check_output_path_accepts_new_folders(tmp_path):
    from edgediff.runtime.files import check_output_path

    assert check_output_path(tmp_path / "a" / "b" / "o.png") == tmp_path / "a" / "b" / "o.png"
    assert not (tmp_path / "a").exists()  # checked, not created
    with pytest.raises(OutputPathError):
        check_output_path(tmp_path)


# ---- 10. bad values in a folder's own config files ------------------------------------------
@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(native_size=[32]), "native_size must be [height, width]"),
        (dict(native_size=["a", "b"]), "native_size must be [height, width]"),
        (dict(native_size=[30, 30]), "native_size [30, 30] is not a multiple of 4"),
        (dict(vae_downscale=0), "vae_downscale must be a power of two"),
        (dict(vae_downscale=3), "vae_downscale must be a power of two"),
        (dict(vae_scaling_factor=0), "vae_scaling_factor must be a positive finite number"),
        (dict(latent_channels=3), "out_channels 4 disagrees with latent_channels 3 in edgediff.json"),
        (dict(prediction_type="noise"), "prediction_type must be one of"),
        (dict(family="flux"), "family 'flux' is not one"),
        (dict(**{"components.unet": "x"}), "components.unet must be an object"),
        (
            dict(**{"files.unet/model.onnx": {"sha256": "0" * 64}}),
            "files entry 'unet/model.onnx' must have an integer size",
        ),
    ],
)
def test_manifest_values_validated(model, changes, needle):
    _edit_json(model / "edgediff.json", **changes)
    with pytest.raises(ModelConfigError) as info:
        Pipeline.load(model)
    assert needle in str(info.value) and "edgediff.json" in str(info.value)
    assert_one_line_error(*run_cli("generate", "x", "--model", model, "-o", model / "o.png"), needle)
    assert_one_line_error(*run_cli("info", model), needle)


def test_every_problem_in_one_error(model):
    _edit_json(model / "edgediff.json", native_size=[32], vae_downscale=0)
    (model / "unet" / "config.json").write_text("{oops")
    with pytest.raises(ModelConfigError) as info:
        Pipeline.load(model)
    msg = str(info.value)
    assert "3 problem(s)" in msg and "native_size" in msg and "vae_downscale" in msg
    assert "unet/config.json: not valid JSON" in msg


def test_only_the_manifest_is_a_manifest_error(model):
    _edit_json(model / "edgediff.json", vae_downscale=0)
    with pytest.raises(ManifestError):
        Pipeline.load(model)
    assert issubclass(ManifestError, ModelConfigError) and issubclass(ModelConfigError, ModelFolderError)


# ---- 11. a hand-edited config is not "damaged" ----------------------------------------------
def test_edited_scheduler_config_is_accepted(model, caplog):
    _edit_json(model / "scheduler" / "scheduler_config.json", beta_end=0.0125, timestep_spacing="trailing")
    with caplog.at_level("WARNING"):
        pipe = Pipeline.load(model)
    assert "scheduler/scheduler_config.json was edited since export" in caplog.text
    pipe("x", num_inference_steps=2, seed=0)
    code, output = run_cli("info", model)
    assert code == 0, output
    assert "note: scheduler/scheduler_config.json was edited since export" in output and "valid: True" in output


def test_same_size_edit_is_noted_by_verify(model):
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(path.read_text().replace('"beta_end": 0.012', '"beta_end": 0.013'))
    code, output = run_cli("info", model, "--json")
    report = json.loads(output)
    assert code == 0 and report["valid"] and report["edited_since_export"] == ["scheduler/scheduler_config.json"]


def test_weights_are_checked_strictly(model):
    path = model / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelFolderError, match=r"unet/model.onnx is \d+ bytes, the manifest says \d+ \(truncated"):
        Pipeline.load(model)
    shutil.copy(MICRO / "unet" / "model.onnx", path)
    data = bytearray((model / "text_encoder" / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the hash sees it
    (model / "text_encoder" / "model.onnx").write_bytes(bytes(data))
    code, output = run_cli("info", model)
    assert code == 1 and "problem: text_encoder/model.onnx does not match its sha256 (damaged)" in output


# ---- messages that pointed at the wrong fix --------------------------------------------------
def test_unexported_diffusers_folder_says_export_first(tmp_path):
    src = tmp_path / "sd15"
    (src / "unet").mkdir(parents=True)
    (src / "vae").mkdir()
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (src / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    line = assert_one_line_error(*run_cli("info", src), "has not been exported", f"edgediff export {src} OUT")
    assert "re-export" not in line
    with pytest.raises(ModelFolderError, match="run `edgediff export"):
        Pipeline.load(src)


def test_component_file_passed_as_model(tmp_path):
    args = ("generate", "x", "--model", MICRO / "unet" / "model.onnx", "-o", tmp_path / "o.png")
    assert_one_line_error(*run_cli(*args),
                    "is a component file; pass the model folder", str(MICRO))  # fmt: skip
    (tmp_path / "notes.txt").write_text("x")
    assert_one_line_error(*run_cli("info", tmp_path / "notes.txt"), "is a file, not a model folder")


def test_damaged_cpu_variant_names_optimize(model):
    pytest.importorskip("onnx")
    pytest.importorskip("sympy")
    from edgediff.engines.ort_optimize import optimize_folder

    optimize_folder(model, ["unet"])
    variant = model / "ort-cpu" / "unet" / "model.onnx"
    variant.write_bytes(variant.read_bytes()[: variant.stat().st_size // 3])
    with pytest.raises(ModelFolderError) as info:
        Pipeline.load(model)
    assert f"edgediff optimize {model} --force" in str(info.value) and "re-export" not in str(info.value)


def test_info_without_onnxruntime_says_it_once(model, monkeypatch):
    from edgediff.runtime import engine

    def missing(kind):
        raise EngineUnavailableError("engine 'onnxruntime' cannot be imported (No module named 'onnxruntime'); "
                                     "install its extra")  # fmt: skip

    monkeypatch.setattr(engine, "engine_class", missing)
    code, output = run_cli("info", model)
    assert code == 1 and output.count("cannot be imported") == 1, output


# ---- the folder's other config files, through the folder check ------------------------------
@pytest.mark.parametrize(
    "rel,changes,needle",
    [
        ("scheduler/scheduler_config.json", dict(num_train_timesteps=0), "num_train_timesteps=0"),
        ("scheduler/scheduler_config.json", dict(beta_start=-1), "beta_start=-1"),
        ("scheduler/scheduler_config.json", dict(beta_end="0.012"), "beta_end='0.012'"),
        ("scheduler/scheduler_config.json", dict(beta_end=1.5), "beta_end=1.5"),
        ("scheduler/scheduler_config.json", dict(trained_betas=[0.1, 0.2]), "trained_betas"),
        ("scheduler/scheduler_config.json", dict(steps_offset="1"), "steps_offset='1'"),
        ("tokenizer/tokenizer_config.json", dict(model_max_length=0), "model_max_length"),
        ("tokenizer/tokenizer_config.json", dict(model_max_length=200), "model_max_length"),
        ("tokenizer/tokenizer_config.json", dict(model_max_length="abc"), "model_max_length"),
    ],
)
def test_config_files_validated_with_the_folder(model, rel, changes, needle):
    _edit_json(model / rel, **changes)
    with pytest.raises(ModelConfigError) as info:
        Pipeline.load(model)
    assert f"{rel}: " in str(info.value) and needle in str(info.value)
    assert_one_line_error(*run_cli("info", model), rel, needle)


def test_special_tokens_map_that_is_a_list(model):
    (model / "tokenizer" / "special_tokens_map.json").write_text("[]")
    with pytest.raises(ModelConfigError, match=r"tokenizer/special_tokens_map.json"):
        Pipeline.load(model)


def test_too_many_steps_from_the_cli(tmp_path):
    out = tmp_path / "o.png"
    args = ("generate", "x", "--model", MICRO, "--steps", "1500", "--scheduler", "ddim", "-o", out)
    assert_one_line_error(*run_cli(*args),
                    "exceeds the model's 1000 training timesteps")  # fmt: skip
    assert not out.exists()


def test_optimum_layout_folder_generates_without_torch(model, tmp_path):
    """Item 3: an optimum-style folder (no edgediff.json, no tokenizer.json) on the lean install's
    tokenizers: `info` loads its tokenizer and scheduler, and generate writes the image."""
    (model / "edgediff.json").unlink()
    (model / "tokenizer" / "tokenizer.json").unlink()
    code, output = run_cli("info", model, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["valid"] and report["manifest"].startswith("inferred") and report["size_multiple"] == 4
    out = tmp_path / "o.png"
    code, output = run_cli("generate", "a red circle", "--model", model, "--steps", "2", "-o", out, "--seed", "1")
    assert code == 0 and out.is_file(), output
    ref = Pipeline.load(MICRO)("a red circle", num_inference_steps=2, seed=1).images[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(ref))
