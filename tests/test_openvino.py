"""The OpenVINO engine (engine="openvino"): the same engine contract as ONNX Runtime (feeds, dtypes, errors),
its f32 images equal ONNX Runtime's within 1/255, bf16 is opt-in and keeps the embedded model's fidelity, and
its compiled-model cache is keyed and rebuilt when stale. Torch-free: runs in the lean stage on the committed
micro models and the embedded model; the torch-side cases (tiny exports of every family) run in the full stage."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="needs the openvino extra: pip install 'edgediff[openvino]'")

from cli_check import assert_one_line_error, run_cli  # tests/ is on sys.path
from conftest import needs_torch
from edgediff.engines import openvino as ove
from edgediff.engines.onnxruntime import OrtEngine
from edgediff.runtime import Pipeline
from edgediff.runtime.errors import (
    EngineInputError,
    EngineRunError,
    EngineUnavailableError,
    InvalidArgumentError,
    ModelFolderError,
)
from edgediff.runtime.pipeline import embedded_model_path
from shapes_check import fidelity, passes

FIXTURES = Path(__file__).parent / "fixtures"
MICRO = FIXTURES / "micro-sd1"


@pytest.fixture
def micro(tmp_path):
    """A writable copy of the micro model (the engine writes its compiled-model cache into the folder)."""
    dst = tmp_path / "micro-sd1"
    shutil.copytree(MICRO, dst, ignore=shutil.ignore_patterns("openvino-cache", "ort-cpu*"))
    return dst


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


# ---- the engine contract, both engines side by side -------------------------------------------------
@pytest.fixture(params=["onnxruntime", "openvino"])
def text_encoder(request, micro):
    path = micro / "text_encoder" / "model.onnx"
    cls = OrtEngine if request.param == "onnxruntime" else ove.OvEngine
    eng = cls(path, component="text_encoder")
    yield eng
    eng.close()


def test_feed_errors_name_the_tensor(text_encoder):
    with pytest.raises(EngineInputError, match=r"missing \['input_ids'\].*unexpected \['ids'\]"):
        text_encoder.run({"ids": np.zeros((1, 77), np.int64)})
    with pytest.raises(EngineInputError, match="input 'input_ids' expects rank 2"):
        text_encoder.run({"input_ids": np.zeros((77,), np.int64)})
    with pytest.raises(EngineInputError, match="input 'input_ids' is int32 in the model, got float32"):
        text_encoder.run({"input_ids": np.zeros((1, 77), np.float32)})


def test_declared_tensors_and_outputs_match_onnxruntime(micro):
    from edgediff.runtime.model_folder import ModelFolder

    mf = ModelFolder.open(micro)
    rng = np.random.default_rng(0)
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        path = mf.component_path(component)
        ort_eng, ov_eng = OrtEngine(path, component=component), ove.OvEngine(path, component=component)
        assert list(ov_eng.inputs) == list(ort_eng.inputs) and list(ov_eng.outputs) == list(ort_eng.outputs)
        for name, spec in ort_eng.inputs.items():
            assert (ov_eng.inputs[name].dtype, ov_eng.inputs[name].rank) == (spec.dtype, spec.rank), name
        feeds = {}
        for name, shape in mf.spec(component).input_shapes(mf.symbols(), guidance=True).items():
            if np.issubdtype(ort_eng.inputs[name].dtype, np.integer):
                feeds[name] = rng.integers(0, 100, size=shape)  # int64: the engine casts to the model's int32
            else:
                feeds[name] = rng.standard_normal(shape).astype(np.float32) if shape else np.float32(500)
        a, b = ort_eng.run(feeds), ov_eng.run(feeds)
        assert list(a) == list(b), component
        for name in a:
            assert (b[name].dtype, b[name].shape) == (a[name].dtype, a[name].shape), (component, name)
            assert float(np.abs(a[name] - b[name]).max()) / (1 + float(np.abs(a[name]).max())) < 1e-4, component
        ort_eng.close()
        ov_eng.close()


def test_closed_engine_refuses_to_run(micro):
    eng = ove.OvEngine(micro / "text_encoder" / "model.onnx", component="text_encoder")
    eng.close()
    with pytest.raises(EngineRunError, match="closed"):
        eng.run({"input_ids": np.zeros((1, 77), np.int32)})


# ---- images -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["micro-sd1", "micro-sd2", "micro-sdxl"])
@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_f32_image_equals_onnxruntime(fixture, shapes, tmp_path):
    folder = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, folder, ignore=shutil.ignore_patterns("openvino-cache", "ort-cpu*"))
    call = dict(prompt=["a red circle", "a blue square"], num_inference_steps=4, seed=5)
    with Pipeline.load(folder) as pipe:
        ref = _pixels(pipe(**call))
    with Pipeline.load(folder, engine="openvino", shapes=shapes) as pipe:
        result = pipe(**call)
    assert np.abs(_pixels(result) - ref).max() <= 1
    assert result.parameters["engine"] == "openvino"
    assert result.parameters["engine_options"] == {"device": "CPU", "precision": "f32"}


def test_img2img_and_inpainting_equal_onnxruntime(micro):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    for extra in ({"image": image, "strength": 0.6}, {"image": image, "mask_image": mask}):
        call = dict(prompt="a green triangle", num_inference_steps=4, seed=2, **extra)
        with Pipeline.load(micro) as pipe:
            ref = _pixels(pipe(**call))
        with Pipeline.load(micro, engine="openvino") as pipe:
            assert np.abs(_pixels(pipe(**call)) - ref).max() <= 1


def test_static_shapes_recompile_for_a_new_size(micro):
    with Pipeline.load(micro, engine="openvino") as pipe:
        small = pipe("a red circle", num_inference_steps=2, seed=1, width=32, height=32)
        large = pipe("a red circle", num_inference_steps=2, seed=1, width=48, height=40)
    assert small.images[0].size == (32, 32) and large.images[0].size == (48, 40)


def pipe_unet_precision(folder, precision=None) -> object:
    """The inference precision the UNet was compiled with (OpenVINO's own property)."""
    options = {"precision": precision} if precision else {}
    path = (embedded_model_path() if folder is None else folder) / "unet" / "model.onnx"
    eng = ove.OvEngine(path, component="unet", shapes="dynamic", cache=False, **options)
    try:
        return eng.compiled_model.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16
    finally:
        eng.close()


def test_precision_is_set_explicitly(micro):
    assert pipe_unet_precision(micro) == "f32"  # never OpenVINO's bf16 default on a bf16 CPU


HAS_BF16 = ove._cpu_has_bf16() and "BF16" in ove.core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512_BF16/AMX: bf16 is refused here (tested below)")
def test_bf16_is_opt_in_and_keeps_the_embedded_models_fidelity():
    with Pipeline.load(None, engine="openvino", precision="bf16") as pipe:
        result = fidelity(pipe)
        assert passes(result), result
        one = pipe("a red circle", num_inference_steps=2, seed=0)
    assert one.parameters["engine_options"]["precision"] == "bf16"
    assert pipe_unet_precision(None, "bf16") == "bf16"


# ---- bad input ----------------------------------------------------------------------------------------
def test_unknown_device_lists_the_ones_it_has(micro):
    with pytest.raises(EngineUnavailableError, match=r"no device 'NPU7'.*it has CPU"):
        ove.OvEngine(micro / "unet" / "model.onnx", component="unet", device="NPU7")


def test_bf16_without_bf16_hardware_is_refused(micro, monkeypatch):
    monkeypatch.setattr(ove, "_cpu_has_bf16", lambda: False)
    with pytest.raises(InvalidArgumentError, match=r"precision 'bf16'.*AVX512_BF16 or AMX.*emulate.*precision='f32'"):
        ove.OvEngine(micro / "unet" / "model.onnx", component="unet", precision="bf16")
    with pytest.raises(InvalidArgumentError, match="precision must be one of f32, bf16, f16"):
        ove.OvEngine(micro / "unet" / "model.onnx", component="unet", precision="fp8")


def test_onnxruntime_options_are_refused_with_the_openvino_name(micro):
    with pytest.raises(InvalidArgumentError, match=r"ONNX Runtime option.*device="):
        Pipeline.load(micro, engine="openvino", providers=["CPUExecutionProvider"])


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    monkeypatch.delitem(sys.modules, "edgediff.engines.openvino")
    from edgediff.runtime.engine import engine_class

    with pytest.raises(EngineUnavailableError, match=r"edgediff\[openvino\]"):
        engine_class("openvino")


def test_damaged_model_is_a_folder_error(micro):
    (micro / "unet" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFolderError, match=r"OpenVINO cannot read.*re-export"):
        ove.OvEngine(micro / "unet" / "model.onnx", component="unet")


def test_int8_without_the_variant_names_the_command(micro):
    with pytest.raises(ModelFolderError, match=r"edgediff optimize .* --int8 static"):
        Pipeline.load(micro, engine="openvino", cpu_variant="int8")


# ---- the compiled-model cache ---------------------------------------------------------------------------
def test_cache_is_keyed_and_rebuilt_when_stale(micro):
    path = micro / "vae_decoder" / "model.onnx"
    feeds = {"latent_sample": np.zeros((1, 4, 8, 8), np.float32)}
    eng = ove.OvEngine(path, component="vae_decoder", cache=True)
    first = eng.run(feeds)["sample"]
    eng.close()
    folder = micro / ove.CACHE_DIR / "vae_decoder"
    key = json.loads((folder / ove.KEY_FILE).read_text())
    assert key["precision"] == "f32" and key["device"] == "CPU" and key["openvino"] and "model.onnx" in key["source"]
    blobs = [p for p in folder.iterdir() if p.name != ove.KEY_FILE]
    assert blobs, "OpenVINO wrote no compiled model into the cache"
    marker = folder / "stale-marker"
    marker.write_text("x")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the model file changed: the key no longer matches
    eng = ove.OvEngine(path, component="vae_decoder", cache=True)
    again = eng.run(feeds)["sample"]
    eng.close()
    assert not marker.exists(), "a stale cache was used instead of rebuilt"
    assert json.loads((folder / ove.KEY_FILE).read_text())["source"] != key["source"]
    np.testing.assert_array_equal(first, again)


def test_read_only_folder_caches_elsewhere(micro, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_access = os.access
    monkeypatch.setattr(ove.os, "access", lambda p, mode: False if Path(p) == micro else real_access(p, mode))
    folder = ove.cache_folder(micro / "unet" / "model.onnx", "unet")
    assert str(folder).startswith(str(tmp_path / "xdg" / "edgediff" / "openvino"))


def test_cache_off_writes_nothing(micro):
    for cache in (False, None):  # None: the default, off on the CPU
        eng = ove.OvEngine(micro / "unet" / "model.onnx", component="unet", cache=cache)
        eng.run({"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.float32(1),
                 "encoder_hidden_states": np.zeros((2, 77, 16), np.float32)})  # fmt: skip
        eng.close()
    assert not (micro / ove.CACHE_DIR).exists()


# ---- CLI --------------------------------------------------------------------------------------------------
def test_cli_generate_and_regenerate_on_openvino(micro, tmp_path):
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    code, text = run_cli("generate", "a red circle", "--model", micro, "--engine", "openvino", "--steps", "3",
                         "--seed", "4", "-o", out)  # fmt: skip
    assert code == 0, text
    from edgediff.runtime import parameters

    record = parameters.read_png_parameters(out)
    assert record["engine"] == "openvino" and record["engine_options"]["precision"] == "f32"
    code, text = run_cli("generate", "--from-png", out, "--model", micro, "-o", again)
    assert code == 0, text
    assert parameters.read_png_parameters(again)["engine"] == "openvino"
    assert out.read_bytes() == again.read_bytes()


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--precision", "bf16"], ["--precision is an OpenVINO option", "--engine openvino"]),
        (["--device", "GPU"], ["--device is an OpenVINO option"]),
        (["--engine", "openvino", "--provider", "CPUExecutionProvider"], ["--provider is an ONNX Runtime option"]),
        (["--engine", "openvino", "--device", "XPU"], ["no device 'XPU'", "it has CPU"]),
    ],
)
def test_cli_engine_flag_errors(micro, tmp_path, args, needles):
    out = tmp_path / "o.png"
    assert_one_line_error(*run_cli("generate", "x", "--model", micro, "-o", out, *args), *needles)
    assert not out.exists()


def test_info_and_bench_know_openvino(micro):
    code, text = run_cli("info", micro, "--engine", "openvino", "--json")
    assert code == 0, text
    report = json.loads(text)
    assert report["engine"] == "openvino" and report["valid"] and set(report["io"]) >= {"unet", "text_encoder"}
    code, text = run_cli("bench", micro, "--engine", "openvino", "--steps", "2", "--runs", "1", "--warmup", "0",
                         "--json")  # fmt: skip
    assert code == 0, text
    report = json.loads(text[text.index("{") :])
    assert report["settings"]["engine"] == "openvino"
    assert report["settings"]["engine_options"]["precision"] == "f32"
    if report.get("unet_flops"):  # (the lean install counts FLOPs where onnx is present)
        assert report["unet_precision"] == "f32" and report["ceiling_of"] == "numpy SGEMM (fp32)"


def test_serve_runs_on_openvino(micro, tmp_path):
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from fastapi.testclient import TestClient

    from edgediff.runtime.serve import create_app

    with TestClient(create_app([micro], engine="openvino", precision="f32"), base_url="http://127.0.0.1") as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 32, "height": 32})
        assert r.status_code == 200, r.text
        import base64

        from edgediff.runtime import parameters

        (tmp_path / "s.png").write_bytes(base64.b64decode(r.json()["images"][0]))
        assert parameters.read_png_parameters(tmp_path / "s.png")["engine"] == "openvino"  # the PNG's own record
    code, text = run_cli("serve", "--model", micro, "--precision", "bf16")
    assert_one_line_error(code, text, "--precision is an OpenVINO option")


def test_bench_sets_each_precision_against_its_own_ceiling():
    from edgediff.runtime import bench

    assert bench.unet_precision("onnxruntime", {}) == "f32"
    assert bench.unet_precision("onnxruntime", {"cpu_variant": "int8"}) == "int8"
    assert bench.unet_precision("openvino", {"precision": "bf16"}) == "bf16"
    assert bench.unet_precision("openvino", {"precision": "bf16", "cpu_variant": "int8"}) == "int8"
    ceiling = bench._precision_ceiling("openvino", {"cpu_variant": "int8"}, 1, 100.0)
    assert ceiling["unet_precision"] == "int8" and ceiling["ceiling_of"] == "OpenVINO int8 GEMM"
    assert ceiling["ceiling_gflops"] > 0
    assert ove.gemm_gflops("f32", 1, n=256, repeats=1) > 0


# ---- every family, against ONNX Runtime on the torch side's tiny exports --------------------------------------
@needs_torch
@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl", "sd1-inpaint", "sd1-lcm", "sdxl-turbo"])
def test_every_family_equals_onnxruntime(tiny_export, variant, tmp_path):
    folder = tmp_path / variant
    shutil.copytree(tiny_export(variant), folder)
    call = dict(prompt="a red circle", seed=3, num_inference_steps=2 if "turbo" not in variant else 1)
    if "inpaint" in variant:
        rng = np.random.default_rng(0)
        with Pipeline.load(folder) as p:
            h, w = p.folder.native_size
        call.update(image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask_image=np.full((h, w), 255, np.uint8))
    with Pipeline.load(folder) as pipe:
        ref = _pixels(pipe(**call))
    with Pipeline.load(folder, engine="openvino") as pipe:
        assert np.abs(_pixels(pipe(**call)) - ref).max() <= 1


def test_embedded_model_f32_passes_fidelity():
    with Pipeline.load(None, engine="openvino") as pipe:
        result = fidelity(pipe)
    assert passes(result), result
