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


@needs_torch
@pytest.mark.parametrize("fp16", [False, True])
def test_the_maps_offsets_read_back_every_initializer(tiny_export, fp16):
    """The round trip the runtime relies on: each float initializer of a LoRA target, read through the map's offsets
    into model.onnx_data (numpy only, as the runtime reads it), equals onnx's own value; the map is tied to its
    graph by model.onnx's sha1."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    from edgediff.runtime.lora_apply import WeightsMap

    folder = tiny_export("sd1", fp16=fp16)
    for component in ("unet", "text_encoder"):
        path = folder / component / "model.onnx"
        graph = onnx.load(str(path))
        wmap = WeightsMap.load(component, path, folder)
        m = json.loads((folder / component / weights_map.MAP_FILE).read_text())
        assert m["model"]["sha1"] == hashlib.sha1(path.read_bytes()).hexdigest()
        kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        floats = [t for t in graph.graph.initializer if t.data_type in kinds]
        assert {t.name for t in floats} == set(wmap.initializers)
        for t in floats:
            np.testing.assert_array_equal(wmap.base(t.name), numpy_helper.to_array(t))
        if fp16 and component == "unet":
            assert any(wmap.base(e["initializer"]).dtype == np.float16 for e in m["weights"].values())


def test_externalize_moves_inline_weights_and_keeps_their_values(tmp_path):
    """An inline model (as older exports wrote small graphs) gets every initializer into model.onnx_data; running it
    gives the same output."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")])  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((2, 4)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert weights_map.externalize(path) and not weights_map.externalize(path)  # the second time: nothing to move
    assert (tmp_path / weights_map.DATA_FILE).is_file()
    after = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, before)
    record, table = weights_map.storage(path)
    assert set(table) == {"w"} and table["w"]["shape"] == [4, 3] and record["data"] == weights_map.DATA_FILE
