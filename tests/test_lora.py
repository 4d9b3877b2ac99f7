"""LoRAs applied at load time (issue 17), against diffusers: the same LoRA files loaded with ``load_lora_weights``
and fused with ``fuse_lora(lora_scale=s)``, the same seed, images within 1/255. The LoRAs are peft adapters on
the tiny models (tests/lora_maker.py: every up factor random, so a LoRA that is not applied shows), with
linear and convolution layers (LoCon) on the UNet and the text encoder(s), in kohya and diffusers formats."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil

import numpy as np
import pytest

from conftest import needs_torch

NO_PEFT = importlib.util.find_spec("peft") is None
pytestmark = [needs_torch, pytest.mark.skipif(NO_PEFT, reason="needs peft (the dev-torch extra): it makes the LoRAs")]

PROMPT = "a red circle on a blue background"
CALL = dict(num_inference_steps=4, height=64, width=64, seed=3, scheduler="euler")


def _images(pipe, **kw):
    from lora_maker import as_array

    return as_array(pipe(PROMPT, **{**CALL, **kw}).images)


def _reference(source, files_and_scales, pipeline_class=None, **kw):
    from lora_maker import fused_pipeline
    from parity import diffusers_images

    ref = fused_pipeline(source, files_and_scales, pipeline_class)
    call = {k: v for k, v in {**CALL, **kw}.items() if k not in ("seed", "scheduler")}
    return diffusers_images(ref, (kw.get("scheduler") or CALL["scheduler"]), CALL["seed"], prompt=PROMPT, **call)


def _max_diff(a, b, label: str = "") -> int:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    if label:  # the figures the closing note quotes (pytest -s shows them)
        print(f"{label}: max {int(diff.max())}/255, mean {float(diff.mean()):.4f}/255")
    return int(diff.max())


@pytest.fixture(scope="module")
def sd1(tiny_source, tiny_export, tmp_path_factory):
    """The tiny SD1 source and export, and LoRA files made on it."""
    import lora_maker as lm

    src, folder = tiny_source("sd1"), tiny_export("sd1")
    out = tmp_path_factory.mktemp("loras")
    a = lm.make_lora(src, components=("unet", "text_encoder"), seed=1)
    b = lm.make_lora(src, components=("unet",), conv=False, rank=2, alpha=1.0, seed=2)
    files = {
        "a_kohya": lm.save_kohya(a, out / "a_kohya.safetensors"),
        "a_diffusers": lm.save_diffusers(a, out / "a_diffusers.safetensors"),
        "a_bf16": lm.save_kohya(a, out / "a_bf16.safetensors", bf16=True),
        "a_no_alpha": lm.save_diffusers(a, out / "a_no_alpha.safetensors", metadata=False),
        "b_kohya": lm.save_kohya(b, out / "b_kohya.safetensors"),
    }
    return src, folder, files


@pytest.fixture(scope="module")
def base_pipe(sd1):
    from edgediff.runtime import Pipeline

    with Pipeline.load(sd1[1]) as pipe:
        yield pipe


@pytest.mark.parametrize("fmt", ["a_kohya", "a_diffusers"])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_one_lora_equals_diffusers_fuse_lora(sd1, fmt, scale):
    from edgediff.runtime import Pipeline

    src, folder, files = sd1
    want = _reference(src, [(files[fmt], scale)])
    with Pipeline.load(folder, loras=[(files[fmt], scale)]) as pipe:
        got = _images(pipe)
    assert _max_diff(got, want, f"one LoRA {fmt} at {scale}") <= 1, fmt
    assert _max_diff(_reference(src, []), want) > 10  # the LoRA does change the image


def test_two_loras_add_up_as_in_diffusers(sd1):
    from edgediff.runtime import Pipeline

    src, folder, files = sd1
    loras = [(files["a_diffusers"], 0.8), (files["b_kohya"], -0.6)]
    want = _reference(src, loras)
    with Pipeline.load(folder, loras=loras) as pipe:
        got = _images(pipe)
    assert _max_diff(got, want, "two LoRAs (diffusers 0.8 + kohya -0.6)") <= 1
    assert _max_diff(_reference(src, loras[:1]), want) > 5  # the second LoRA counts


def test_every_format_decodes_to_the_same_merged_weights(sd1):
    from edgediff.runtime.lora_apply import as_loras, merged_weights
    from edgediff.runtime.model_folder import ModelFolder

    _, folder, files = sd1
    mf = ModelFolder.open(folder)
    kohya = merged_weights(mf, as_loras([(files["a_kohya"], 0.7)]))
    diffusers = merged_weights(mf, as_loras([(files["a_diffusers"], 0.7)]))
    assert set(kohya) == {"unet", "text_encoder"} and kohya["unet"]
    for component in kohya:
        assert kohya[component].keys() == diffusers[component].keys()
        for name in kohya[component]:
            np.testing.assert_array_equal(kohya[component][name], diffusers[component][name])
    bf16 = merged_weights(mf, as_loras([(files["a_bf16"], 0.7)]))
    for name, value in kohya["unet"].items():  # bf16 factors: the same merge within bf16's rounding
        np.testing.assert_allclose(bf16["unet"][name], value, atol=2e-3, rtol=0)
    # a diffusers file without metadata means alpha = rank (scale 1 instead of alpha/rank = 2)
    half = merged_weights(mf, as_loras([(files["a_kohya"], 0.35)]))
    no_alpha = merged_weights(mf, as_loras([(files["a_no_alpha"], 0.7)]))
    for name, value in half["unet"].items():
        np.testing.assert_allclose(no_alpha["unet"][name], value, atol=1e-6, rtol=1e-6)


def test_scale_zero_and_removal_give_the_base_image_exactly(sd1, base_pipe):
    from edgediff.runtime import Pipeline

    _, folder, files = sd1
    base = _images(base_pipe)
    with Pipeline.load(folder, loras=[(files["a_kohya"], 0.0)]) as pipe:
        assert np.array_equal(_images(pipe), base)
    with Pipeline.load(folder, loras=[(files["a_kohya"], 1.0)]) as pipe:
        assert not np.array_equal(_images(pipe), base)
        assert pipe.set_loras([]) == ["text_encoder", "unet"]
        assert np.array_equal(_images(pipe), base)


def test_switching_equals_a_fresh_load_and_recreates_only_what_changes(sd1):
    from edgediff.runtime import Pipeline

    _, folder, files = sd1
    with Pipeline.load(folder, loras=[(files["b_kohya"], 1.0)]) as fresh:
        want_b = _images(fresh)
    with Pipeline.load(folder, loras=[(files["a_kohya"], 0.7)]) as pipe:
        vae = pipe.engines["vae_decoder"]
        text = pipe.engines["text_encoder"]
        changed = pipe.set_loras([(files["b_kohya"], 1.0)])  # a UNet-only LoRA in place of a UNet + text one
        assert changed == ["text_encoder", "unet"] and pipe.engines["vae_decoder"] is vae
        assert np.array_equal(_images(pipe), want_b)
        text = pipe.engines["text_encoder"]
        assert pipe.set_loras([(files["b_kohya"], 0.5)]) == ["unet"]  # a new strength: the UNet only
        assert pipe.engines["text_encoder"] is text
        assert pipe.set_loras([(files["b_kohya"], 0.5)]) == []  # the same: nothing re-created
        assert pipe.loras == [(str(files["b_kohya"]), 0.5)]


def test_a_bad_lora_in_set_loras_leaves_the_pipeline_as_it_was(sd1, tmp_path):
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import InvalidArgumentError

    _, folder, files = sd1
    with Pipeline.load(folder, loras=[(files["a_kohya"], 0.7)]) as pipe:
        before = _images(pipe)
        unet = pipe.engines["unet"]
        with pytest.raises(InvalidArgumentError, match="finite"):
            pipe.set_loras([(files["b_kohya"], math.nan)])
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(files["b_kohya"].read_bytes()[:200])
        with pytest.raises(InvalidArgumentError, match=r"truncated or corrupt|not a safetensors"):
            pipe.set_loras([(broken, 1.0)])
        assert pipe.engines["unet"] is unet and np.array_equal(_images(pipe), before)


def test_provenance_in_the_png_and_from_png_regenerates(sd1, tmp_path):
    from click.testing import CliRunner

    from edgediff.runtime import parameters
    from edgediff.runtime.cli import main

    _, folder, files = sd1
    out = tmp_path / "a.png"
    args = ["generate", PROMPT, "--model", str(folder), "-o", str(out), "--steps", "4", "--width", "64",
            "--height", "64", "--seed", "3", "--scheduler", "euler", "--lora", f"{files['a_kohya']}:0.7",
            "--lora", str(files["b_kohya"])]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(out) as im:
        text, record = im.text["parameters"], json.loads(im.text["edgediff"])
    assert text.splitlines()[0] == f"{PROMPT} <lora:a_kohya:0.7> <lora:b_kohya:1>"
    assert 'Lora hashes: "a_kohya: ' in text and ", b_kohya: " in text
    assert [(lora["name"], lora["scale"]) for lora in record["loras"]] == [("a_kohya", 0.7), ("b_kohya", 1.0)]
    parsed = parameters.parse_parameters_text(text)
    assert parsed["prompt"] == PROMPT and [x["name"] for x in parsed["loras"]] == ["a_kohya", "b_kohya"]
    assert parsed["loras"][0]["hash"] == record["loras"][0]["hash"]
    again = tmp_path / "b.png"
    r = CliRunner().invoke(main, ["generate", "--from-png", str(out), "--model", str(folder), "-o", str(again)])
    assert r.exit_code == 0, r.output
    with Image.open(out) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # the text alone has no file paths: it names the LoRA to give
    params = tmp_path / "a.txt"
    params.write_text(text)
    r = CliRunner().invoke(main, ["generate", "--params", str(params), "--model", str(folder), "-o", str(again)])
    assert r.exit_code != 0 and "LoRA 'a_kohya' at 0.7" in r.output and "--lora FILE:0.7" in r.output


def test_cli_lora_on_bench(sd1):
    from click.testing import CliRunner

    from edgediff.runtime.cli import main

    _, folder, files = sd1
    r = CliRunner().invoke(main, ["bench", str(folder), "--steps", "2", "--runs", "1", "--warmup", "0", "--width",
                                  "64", "--height", "64", "--json", "--lora", f"{files['b_kohya']}:0.5"])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{") :])
    assert report["settings"]["engine_options"]["loras"] == [[str(files["b_kohya"]), 0.5]]


def test_openvino_applies_the_same_merged_weights(sd1):
    pytest.importorskip("openvino")
    from edgediff.runtime import Pipeline

    src, folder, files = sd1
    want = _reference(src, [(files["a_kohya"], 0.8)])
    with Pipeline.load(folder, engine="openvino", loras=[(files["a_kohya"], 0.8)]) as pipe:
        assert _max_diff(_images(pipe), want, "OpenVINO f32, kohya 0.8") <= 1
        _images(pipe, height=32, width=32)  # static shapes: a new size reads the graph again, LoRA included
        assert _max_diff(_images(pipe), want) <= 1


def test_saved_cpu_variant_is_bypassed_and_int8_refused(sd1, tmp_path, caplog):
    pytest.importorskip("onnx")
    from edgediff.engines.ort_optimize import optimize_folder
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import InvalidArgumentError

    src, folder, files = sd1
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    optimize_folder(copy)
    want = _reference(src, [(files["a_kohya"], 0.8)])
    with caplog.at_level(logging.INFO, "edgediff.engines.onnxruntime"):
        with Pipeline.load(copy, loras=[(files["a_kohya"], 0.8)]) as pipe:
            assert "ort-cpu" not in str(pipe.engines["unet"].model_file)
            assert _max_diff(_images(pipe), want) <= 1
    assert "not the saved CPU variant" in caplog.text
    with pytest.raises(InvalidArgumentError, match="int8 variant"):
        Pipeline.load(copy, loras=[(files["a_kohya"], 0.8)], cpu_variant="int8")


def test_lcm_lora_with_the_lcm_scheduler_equals_diffusers(sd1):
    """An LCM-LoRA is a LoRA: applied to an SD 1.x model and run with the LCM scheduler, 4 steps, guidance 1."""
    from edgediff.runtime import Pipeline

    src, folder, files = sd1
    kw = dict(scheduler="lcm", guidance_scale=1.0, num_inference_steps=4)
    want = _reference(src, [(files["a_diffusers"], 1.0)], **kw)
    with Pipeline.load(folder, loras=[(files["a_diffusers"], 1.0)]) as pipe:
        assert _max_diff(_images(pipe, **kw), want, "LCM-LoRA recipe (lcm, 4 steps, guidance 1)") <= 1


def test_sdxl_lora_on_the_unet_and_both_text_encoders(tiny_source, tiny_export, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    import lora_maker as lm
    from edgediff.runtime import Pipeline

    src, folder = tiny_source("sdxl"), tiny_export("sdxl")
    lora = lm.make_lora(src, components=("unet", "text_encoder", "text_encoder_2"), seed=4)
    kohya = lm.save_kohya(lora, tmp_path / "xl.safetensors", sdxl_te1=True)
    sgm = lm.save_kohya(lora, tmp_path / "xl_sgm.safetensors", sdxl_te1=True, sgm=True)
    diffusers_file = lm.save_diffusers(lora, tmp_path / "xl_diffusers.safetensors")
    want = _reference(src, [(diffusers_file, 0.9)], StableDiffusionXLPipeline)
    # diffusers reads the SGM-named file by its own renaming rules: the same image proves ours agree
    assert _max_diff(_reference(src, [(sgm, 0.9)], StableDiffusionXLPipeline), want) <= 1
    assert "input_blocks" in sgm.read_bytes()[:20000].decode("latin-1")
    for f in (kohya, sgm, diffusers_file):
        with Pipeline.load(folder, loras=[(f, 0.9)]) as pipe:
            assert sorted(pipe._weights) == ["text_encoder", "text_encoder_2", "unet"]
            assert _max_diff(_images(pipe), want, f"SDXL {f.name} at 0.9") <= 1, f.name
    assert _max_diff(_reference(src, [], StableDiffusionXLPipeline), want) > 5


# -- bad input ---------------------------------------------------------------------------------------------
def test_an_sdxl_lora_on_an_sd1_model_is_refused(sd1, tiny_source, tmp_path):
    import lora_maker as lm
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import InvalidArgumentError

    _, folder, _ = sd1
    xl = lm.make_lora(tiny_source("sdxl"), components=("unet", "text_encoder_2"), seed=5)
    with pytest.raises(InvalidArgumentError, match=r"for text_encoder_2, which the model .* does not have.*SDXL"):
        Pipeline.load(folder, loras=[lm.save_kohya(xl, tmp_path / "xl.safetensors")])
    unet_only = lm.make_lora(tiny_source("sdxl"), components=("unet",), seed=5)
    with pytest.raises(InvalidArgumentError, match=r"another model architecture: \d+ of \d+ modules match"):
        Pipeline.load(folder, loras=[lm.save_kohya(unet_only, tmp_path / "xl_unet.safetensors")])


def test_unmatched_modules_warn_with_a_count_and_strict_refuses(sd1, tmp_path, caplog):
    from safetensors.numpy import load_file, save_file

    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import InvalidArgumentError

    _, folder, files = sd1
    tensors = load_file(str(files["b_kohya"]))
    some = next(k for k in tensors if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):  # one module of a layer this model lacks
        tensors[f"lora_unet_down_blocks_9_attentions_0_proj_in.{part}"] = tensors[f"{some}.{part}"]
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial))
    with caplog.at_level(logging.WARNING, "edgediff.runtime.lora_apply"):
        Pipeline.load(folder, loras=[partial]).close()
    assert "1 of its" in caplog.text and "down_blocks_9_attentions_0_proj_in" in caplog.text
    with pytest.raises(InvalidArgumentError, match="strict=True"):
        Pipeline.load(folder, loras=[partial], lora_strict=True)


def test_bad_scales_and_files_are_refused_by_name(sd1, tmp_path):
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import InvalidArgumentError

    _, folder, files = sd1
    for scale in (math.inf, math.nan, "0.5", True):
        with pytest.raises(InvalidArgumentError, match="finite number"):
            Pipeline.load(folder, loras=[(files["a_kohya"], scale)])
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        Pipeline.load(folder, loras=[tmp_path / "missing.safetensors"])
    with pytest.raises(InvalidArgumentError, match="pickled"):
        Pipeline.load(folder, loras=[tmp_path / "old.ckpt"])


def test_missing_or_stale_weights_map_names_the_command(sd1, tmp_path):
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import ModelFolderError

    _, folder, files = sd1
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    from edgediff.export import _record_components

    (copy / "text_encoder" / "weights_map.json").unlink()
    _record_components(copy, ["text_encoder"], None, {})  # as a folder exported without maps
    with pytest.raises(ModelFolderError, match=r"no weights_map.json.*edgediff weights-map"):
        Pipeline.load(copy, loras=[files["a_kohya"]])
    Pipeline.load(copy, loras=[files["b_kohya"]]).close()  # a UNet-only LoRA needs only the UNet's map
    map_file = copy / "unet" / "weights_map.json"
    record = json.loads(map_file.read_text())
    record["model"]["sha1"] = "0" * 40  # made on another graph than this model.onnx
    map_file.write_text(json.dumps(record, indent=1) + "\n")
    with pytest.raises(ModelFolderError, match=r"another version of model.onnx.*edgediff weights-map"):
        Pipeline.load(copy, loras=[files["b_kohya"]])


def test_weights_map_command_makes_an_old_folder_lora_ready(sd1, tmp_path):
    """A folder exported before the weights maps (weights inline, no map) gets them from its source once."""
    import onnx
    from click.testing import CliRunner

    from edgediff.runtime import Pipeline
    from edgediff.runtime.cli import main
    from edgediff.runtime.model_folder import ModelFolder

    src, folder, files = sd1
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    for component in ("unet", "text_encoder"):  # as older exports wrote them: one file, weights inline
        path = old / component / "model.onnx"
        model = onnx.load(str(path))
        (old / component / "weights_map.json").unlink()
        (old / component / "model.onnx_data").unlink()
        onnx.save_model(model, str(path))
    from edgediff.export import _record_components

    _record_components(old, ["unet", "text_encoder"], None, {})
    ready = lambda: json.loads(CliRunner().invoke(main, ["info", str(old), "--no-verify", "--json"]).output)  # noqa: E731
    assert ready()["lora_ready"] is False
    assert "edgediff weights-map" in CliRunner().invoke(main, ["info", str(old), "--no-verify"]).output
    r = CliRunner().invoke(main, ["weights-map", str(old), str(src)])
    assert r.exit_code == 0, r.output
    assert "unet: " in r.output and "weights mapped" in r.output and ready()["lora_ready"] is True
    assert ModelFolder.open(old).verify() == []  # the manifest records the rewritten files
    with Pipeline.load(old, loras=[(files["a_kohya"], 0.6)]) as a, Pipeline.load(
            folder, loras=[(files["a_kohya"], 0.6)]) as b:  # fmt: skip
        assert np.array_equal(_images(a), _images(b))
    r = CliRunner().invoke(main, ["weights-map", str(old), str(tmp_path / "nothing")])
    assert r.exit_code != 0


def test_fp16_export_merges_in_fp16(tiny_export, tiny_source, tmp_path):
    import lora_maker as lm
    from edgediff.runtime.lora_apply import as_loras, merged_weights
    from edgediff.runtime.model_folder import ModelFolder

    src = tiny_source("sd1")
    mf16, mf32 = ModelFolder.open(tiny_export("sd1", fp16=True)), ModelFolder.open(tiny_export("sd1"))
    loras = as_loras([(lm.save_kohya(lm.make_lora(src, seed=6), tmp_path / "l.safetensors"), 0.8)])
    w16, w32 = merged_weights(mf16, loras)["unet"], merged_weights(mf32, loras)["unet"]
    assert w16.keys() == w32.keys()
    for name, value in w16.items():
        assert value.dtype == np.float16
        np.testing.assert_allclose(value.astype(np.float32), w32[name], atol=2e-3, rtol=2e-3)


def test_an_optimum_folder_gets_its_maps_and_applies_loras_as_diffusers(sd1, tmp_path):
    """optimum's exporter writes no weights maps: `edgediff weights-map` makes them from the source, once."""
    pytest.importorskip("optimum.exporters.onnx")
    from optimum.exporters.onnx import main_export

    from edgediff.export import write_weights_maps
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import ModelFolderError

    src, _, files = sd1
    out = tmp_path / "optimum-sd1"
    main_export(str(src), out, task="text-to-image", do_validation=False)
    with pytest.raises(ModelFolderError, match="edgediff weights-map"):
        Pipeline.load(out, loras=[files["a_kohya"]])
    assert set(write_weights_maps(out, src)) == {"unet", "text_encoder"}
    want = _reference(src, [(files["a_kohya"], 0.8)])
    with Pipeline.load(out, loras=[(files["a_kohya"], 0.8)]) as pipe:
        assert _max_diff(_images(pipe), want) <= 1
