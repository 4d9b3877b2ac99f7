"""The export's LoRA weights map (``<component>/weights_map.json``, export/weights_map.py): every diffusers weight
of rank >= 2 of the UNet and the text encoders is found in the ONNX graph by value, transposed where torch's
exporter transposed it, and the map holds for the fp16 export too. Issue 17's merge applies LoRAs through it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import needs_torch
from edgediff.export import weights_map


def test_ambiguous_tensors_are_left_out_not_guessed():
    params = {"a.weight": ("d1", "t1", [2, 3]), "b.weight": ("d2", "t2", [3, 2]), "zero1": ("z", "z", [2, 2]),
              "zero2": ("z", "z", [2, 2]), "gone": ("x", None, [2, 2, 1, 1])}  # fmt: skip
    initializers = {"d1": ["init_a"], "t2": ["onnx::MatMul_7"], "z": ["zeros"]}
    m = weights_map.build(params, initializers)
    assert m["weights"] == {
        "a.weight": {"initializer": "init_a", "transposed": False, "shape": [2, 3]},
        "b.weight": {"initializer": "onnx::MatMul_7", "transposed": True, "shape": [3, 2]},
    }
    assert m["ambiguous"] == ["zero1", "zero2"] and m["format"] == weights_map.FORMAT


@needs_torch
@pytest.mark.parametrize("variant,components", [("sd1", ("unet", "text_encoder")),
                                                ("sdxl", ("unet", "text_encoder", "text_encoder_2"))])  # fmt: skip
def test_every_weight_is_mapped_to_its_initializer_by_value(tiny_source, tiny_export, variant, components):
    import onnx
    from diffusers import DiffusionPipeline
    from onnx import numpy_helper

    folder = tiny_export(variant)
    pipe = DiffusionPipeline.from_pretrained(tiny_source(variant), local_files_only=True)
    manifest = json.loads((folder / "edgediff.json").read_text())
    for component in components:
        m = json.loads((folder / component / weights_map.MAP_FILE).read_text())
        assert f"{component}/{weights_map.MAP_FILE}" in manifest["files"]  # recorded and hashed like the rest
        state = {k: v for k, v in getattr(pipe, component).state_dict().items() if v.ndim >= 2}
        assert set(m["weights"]) | set(m["ambiguous"]) == set(state), component
        assert len(m["weights"]) >= len(state) - 2  # (random weights: at most a degenerate pair is ambiguous)
        graph = onnx.load(str(folder / component / "model.onnx"))
        inits = {t.name: t for t in graph.graph.initializer}
        transposed = 0
        for name, entry in m["weights"].items():
            value = numpy_helper.to_array(inits[entry["initializer"]])
            torch_value = state[name].detach().float().numpy()
            np.testing.assert_array_equal(value.T if entry["transposed"] else value, torch_value)
            transposed += entry["transposed"]
        if component == "unet":
            assert transposed > 0  # the exporter's MatMul weights ([in, out]) are found transposed


@needs_torch
def test_fp16_export_keeps_a_valid_map(tiny_export):
    import onnx

    folder = tiny_export("sd1", fp16=True)
    m = json.loads((folder / "unet" / weights_map.MAP_FILE).read_text())
    names = {
        t.name for t in onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False).graph.initializer
    }
    assert m["weights"] and all(e["initializer"] in names for e in m["weights"].values())
