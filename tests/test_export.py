"""The export stage: components equal their PyTorch originals, the manifest describes the folder,
fp16, atomic writes, and validation that reports every mismatch at once."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import needs_torch

from edgediff.runtime import ExportError, ExportValidationError, ModelFolder, Pipeline
from edgediff.runtime.model_folder import sha256_file

pytestmark = needs_torch


def _session(folder, name):
    return ort.InferenceSession(str(folder / name / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_components_match_pytorch(variant, tiny_export, diffusers_pipe):
    """Independent of the exporter's own check: diffusers' modules called directly, new inputs,
    batch 3 and a non-square latent. Tolerance: max|diff| <= 1e-4 + 1e-3 * max|ref| (fp32)."""
    import torch

    folder, pipe = tiny_export(variant), diffusers_pipe(variant)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (3, 77), generator=g)
    sample = torch.randn(3, 4, 8, 12, generator=g)
    ehs = torch.randn(3, 77, pipe.unet.config.cross_attention_dim, generator=g)
    image = torch.rand(3, 3, 16, 24, generator=g) * 2 - 1
    with torch.inference_mode():
        te = pipe.text_encoder(ids)
        ref = {
            "text_encoder": [te.last_hidden_state, te.pooler_output],
            "unet": [pipe.unet(sample, torch.tensor(421.37), ehs).sample],
            "vae_decoder": [pipe.vae.decode(sample).sample],
            "vae_encoder": [pipe.vae.encode(image).latent_dist.parameters],
        }
    feeds = {
        "text_encoder": {"input_ids": ids.numpy().astype(np.int32)},
        "unet": {"sample": sample.numpy(), "timestep": np.array(421.37, np.float32), "encoder_hidden_states": ehs.numpy()},
        "vae_decoder": {"latent_sample": sample.numpy()},
        "vae_encoder": {"sample": image.numpy()},
    }
    for name, want in ref.items():
        got = _session(folder, name).run(None, feeds[name])
        for w, o in zip(want, got):
            w = w.numpy()
            assert o.shape == w.shape, name
            err = np.abs(o - w).max()
            assert err <= 1e-4 + 1e-3 * np.abs(w).max(), f"{name}: max|diff| {err}"


def test_manifest_describes_the_folder(tiny_export):
    folder = tiny_export("sd2")
    m = json.loads((folder / "edgediff.json").read_text())
    assert m["family"] == "sd2" and m["prediction_type"] == "v_prediction"
    assert m["vae_scaling_factor"] == pytest.approx(0.18215)
    assert (m["latent_channels"], m["vae_downscale"], m["native_size"]) == (4, 2, [32, 32])
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    unet = m["components"]["unet"]
    assert unet["precision"] == "fp32"
    assert [t["name"] for t in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["inputs"][1] == {"name": "timestep", "dtype": "float32", "shape": []}
    assert {"torch", "diffusers", "onnx", "onnxruntime"} <= set(m["tools"])
    assert m["tokenizer"]["pad_token"] == "!"
    for rel, info in m["files"].items():
        assert sha256_file(folder / rel) == info["sha256"], rel
    assert "tokenizer/tokenizer.json" in m["files"] and "unet/model.onnx" in m["files"]
    assert ModelFolder.open(folder).verify() == []


def test_fp16_export(tiny_export):
    """fp16 components validate within the fp16 tolerance (atol 1e-2 + rtol 2e-2); the timestep
    input stays fp32; images stay close to the fp32 export (mean |diff| < 2/255)."""
    f32, f16 = tiny_export("sd1"), tiny_export("sd1", fp16=True)
    m = json.loads((f16 / "edgediff.json").read_text())
    for name, comp in m["components"].items():
        assert comp["precision"] in ("fp16", "fp32"), name
        if comp["precision"] == "fp32":
            assert name == "vae_decoder" and "kept fp32" in comp["note"]
    assert m["components"]["unet"]["precision"] == "fp16"
    assert (f16 / "unet" / "model.onnx").stat().st_size < 0.6 * (f32 / "unet" / "model.onnx").stat().st_size
    assert next(t for t in m["components"]["unet"]["inputs"] if t["name"] == "timestep")["dtype"] == "float32"
    a = np.asarray(Pipeline.load(f32)("a cat", num_inference_steps=4, seed=3).images[0], dtype=np.int16)
    b = np.asarray(Pipeline.load(f16)("a cat", num_inference_steps=4, seed=3).images[0], dtype=np.int16)
    assert np.abs(a - b).mean() < 2.0


def test_force_replaces_and_interrupt_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    from edgediff.export import export_model
    from edgediff.export import validate

    out = tmp_path / "model"
    (out / "unet").mkdir(parents=True)  # an (old) ONNX model folder: what --force may replace
    (out / "unet" / "model.onnx").write_bytes(b"old")
    (out / "model_index.json").write_text("{}")
    (out / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="already exists"):
        export_model(tiny_source("sd1"), out)
    export_model(tiny_source("sd1"), out, force=True)
    assert not (out / "old.txt").exists() and (out / "edgediff.json").exists()

    calls = []
    real = validate.check_component

    def interrupted(pipe, name, *a, **k):
        calls.append(name)
        if name == "vae_decoder":
            raise KeyboardInterrupt
        return real(pipe, name, *a, **k)

    monkeypatch.setattr("edgediff.export.validate.check_component", interrupted)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_source("sd1"), fresh)
    assert calls == ["text_encoder", "unet", "vae_decoder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no OUT, no partial folder
    # and an interrupted --force keeps the old folder intact
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_source("sd1"), out, force=True)
    assert ModelFolder.open(out).verify() == []


def test_validation_reports_every_mismatch(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("edgediff.export.validate").export.validate.TOLERANCES, "fp32", (0.0, 0.0))
    from edgediff.export import export_model

    with pytest.raises(ExportValidationError) as info:
        export_model(tiny_source("sd1"), tmp_path / "out")
    failed = {f.split(".")[0] for f in info.value.failures}
    assert {"unet", "vae_decoder"} <= failed  # several components in one error
    assert "PSNR" in str(info.value) and not (tmp_path / "out").exists()


def test_large_models_use_one_external_data_file(tiny_source, tmp_path, monkeypatch):
    """Components over the protobuf limit are saved with one external-data file (limit lowered here)."""

    from edgediff.export import onnx_export

    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 64 << 20)  # every model counts as "large"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_source("sd1"), safety_checker=None, requires_safety_checker=False)
    path = onnx_export.export_component(pipe, "unet", tmp_path / "unet")
    files = sorted(p.name for p in (tmp_path / "unet").iterdir())
    assert files == ["model.onnx", "model.onnx_data"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["sample", "timestep", "encoder_hidden_states"]
