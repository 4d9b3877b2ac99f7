"""LoRAs on TensorRT, on CPU, against the strict stand-in of test_trt_runtime_fake.py extended with TensorRT's
``Refitter``: ``edgediff build --refit`` sets the REFIT flag and keys the plan apart; a plan built without it is
refused with the rebuild command; the engine refits exactly the LoRA-merged initializers under their ONNX names
(the weights map's), cast to the prototype's dtype, supplies the base value of every weight TensorRT asks for
besides (``get_missing_weights``) from model.onnx_data, and refuses a refit TensorRT reports as failed. What it
proves is our side of the API; a real refit runs only in the GPU tests."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff.engines import tensorrt as trt_engine
from edgediff.engines import tensorrt_build
from edgediff.engines import trt_plans as plans
from edgediff.runtime.errors import PlanError
from edgediff.runtime.lora_apply import WeightsMap, as_loras, merged_weights
from edgediff.runtime.model_folder import ModelFolder
from golden_cases import LORA_FILE
from test_trt_runtime_fake import MICRO, FakeCudart, make_fake_trt

FIXTURES = MICRO.parent


class FakeRefitter:
    """TensorRT's Refitter as the docs describe it: weights by ONNX initializer name, a prototype per weight,
    missing weights that must be supplied too, and refit_cuda_engine() -> bool."""

    log: list = []

    def __init__(self, engine, logger):
        self.engine, self.set = engine, {}
        FakeRefitter.log.append(self)

    def get_all_weights(self):
        return list(self.engine.weights)

    def get_weights_prototype(self, name):
        shape, dtype = self.engine.weights[name]
        return SimpleNamespace(dtype=np.dtype(dtype), size=int(np.prod(shape)))

    def set_named_weights(self, name, weights):
        assert name in self.engine.weights, name
        self.set[name] = np.array(weights.array)  # copied here: the caller must keep it alive only until refit
        return True

    def get_missing_weights(self):
        return [n for n in self.engine.combined if n not in self.set]

    def refit_cuda_engine(self):
        assert not self.get_missing_weights(), "refit with weights missing"
        self.refitted = True
        return self.engine.refit_ok


def _fake(tmp_path, monkeypatch, refit_ok=True):
    import shutil

    cudart = FakeCudart()
    trt = make_fake_trt(cudart)
    trt.BuilderFlag = SimpleNamespace(FP16="fp16", REFIT="refit")
    trt.Refitter = FakeRefitter
    trt.Weights = lambda array: SimpleNamespace(array=array)
    original = trt.Runtime

    class Runtime(original):
        def deserialize_cuda_engine(self, data):
            engine = super().deserialize_cuda_engine(data)
            recipe = json.loads(data)
            engine.refittable = recipe.get("refit", False)
            engine.weights = recipe.get("weights", {})
            engine.combined = recipe.get("combined", [])
            engine.refit_ok = refit_ok
            return engine

    trt.Runtime = Runtime
    builder = trt.Builder

    class Builder(builder):
        def build_serialized_network(self, network, config):
            recipe = json.loads(super().build_serialized_network(network, config))
            if "refit" in config.flags:  # every float initializer refittable, under its ONNX name
                table = json.loads((model / "unet" / "weights_map.json").read_text())["initializers"]
                recipe["refit"] = True
                recipe["weights"] = {n: (info["shape"], info["dtype"]) for n, info in table.items()}
                recipe["combined"] = [n for n in table if n.endswith(".bias")][:2]  # e.g. a conv's bias
            return json.dumps(recipe).encode()

    trt.Builder = Builder
    for module in (trt_engine, tensorrt_build):
        monkeypatch.setattr(module, "import_cudart", lambda: cudart)
        monkeypatch.setattr(module, "import_tensorrt", lambda: trt)
    model = tmp_path / "model"
    shutil.copytree(MICRO, model)
    FakeRefitter.log = []
    return SimpleNamespace(cudart=cudart, trt=trt, model=model, onnx=model / "unet" / "model.onnx")


def _build(fake, refit):
    [result] = tensorrt_build.build_model(fake.model, ["unet"], plans.ProfileOptions(), opt_level=2, refit=refit)
    return result


def _merged(fake, scale=0.8):
    return merged_weights(ModelFolder.open(fake.model), as_loras([(FIXTURES / LORA_FILE, scale)]))["unet"]


def test_refit_build_is_flagged_and_keyed_apart(tmp_path, monkeypatch):
    fake = _fake(tmp_path, monkeypatch)
    plain = _build(fake, refit=False)
    assert "refit" not in fake.trt.built[-1][1].flags
    refittable = _build(fake, refit=True)
    assert "refit" in fake.trt.built[-1][1].flags and refittable.key != plain.key
    assert plans.read_build_json(refittable.path).build["refittable"] is True


def test_lora_on_a_plain_plan_is_refused_with_the_rebuild_command(tmp_path, monkeypatch):
    fake = _fake(tmp_path, monkeypatch)
    _build(fake, refit=False)
    with pytest.raises(PlanError, match=r"built without --refit.*edgediff build .* --refit --force"):
        trt_engine.TrtEngine(fake.onnx, component="unet", weights=_merged(fake))
    assert not fake.cudart.device and not fake.cudart.host


def test_refit_sets_the_merged_weights_by_onnx_name_and_the_missing_ones_from_base(tmp_path, monkeypatch):
    fake = _fake(tmp_path, monkeypatch)
    _build(fake, refit=True)
    weights = _merged(fake)
    assert weights  # the committed LoRA changes UNet initializers
    with trt_engine.TrtEngine(fake.onnx, component="unet", weights=weights):
        pass
    [refitter] = FakeRefitter.log
    assert refitter.refitted
    base = WeightsMap.load("unet", fake.onnx, fake.model)
    combined = refitter.engine.combined
    assert set(refitter.set) == set(weights) | set(combined)
    for name, value in weights.items():
        np.testing.assert_array_equal(refitter.set[name], value)
    for name in combined:  # the base values, read from model.onnx_data
        np.testing.assert_array_equal(refitter.set[name], base.base(name))
    assert not fake.cudart.device and not fake.cudart.host


def test_a_failed_refit_is_an_error_and_frees_everything(tmp_path, monkeypatch):
    fake = _fake(tmp_path, monkeypatch, refit_ok=False)
    _build(fake, refit=True)
    with pytest.raises(PlanError, match="could not refit"):
        trt_engine.TrtEngine(fake.onnx, component="unet", weights=_merged(fake))
    assert not fake.cudart.device and not fake.cudart.host


def test_build_cli_has_refit(tmp_path, monkeypatch):
    from edgediff.runtime.cli import main

    fake = _fake(tmp_path, monkeypatch)
    r = CliRunner().invoke(main, ["build", str(fake.model), "--component", "unet", "--refit"])
    assert r.exit_code == 0, r.output
    assert "refit" in fake.trt.built[-1][1].flags
