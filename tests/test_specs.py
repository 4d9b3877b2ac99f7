"""The I/O contract (runtime/specs.py) is the one source of names, shapes, guidance doubling, tolerances and
component lists: a family or sub-model added to its tables is picked up by ModelFolder, TensorRT's profiles,
`edgediff optimize`'s probes, bench and export's dummy inputs; no consumer keeps its own copy of 77 or 768.
Also the one tokenizer-length rule, the manifest's I/O checked against the contract, and the folder swap."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tokenize
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgediff.engines import tensorrt_build
from edgediff.engines import trt_plans as plans
from edgediff.runtime import files, specs
from edgediff.runtime.errors import ManifestError, ModelFolderError
from edgediff.runtime.model_folder import ModelFolder
from edgediff.runtime.specs import F32, FAMILIES, SUBMODELS, SubmodelSpec, TensorSpec
from edgediff.runtime.tokenizer import ClipTokenizer

ROOT = Path(__file__).resolve().parent.parent
MICRO = Path(__file__).parent / "fixtures" / "micro-sd1"  # latent 16x16 (32 px), D 16, vocabulary 672


def _micro(tmp_path, **manifest) -> Path:
    folder = tmp_path / "micro"
    shutil.copytree(MICRO, folder)
    if manifest:
        _edit_manifest(folder, lambda m: m.update(manifest))
    return folder


def _edit_manifest(folder: Path, change) -> None:
    m = json.loads((folder / "edgediff.json").read_text())
    change(m)
    (folder / "edgediff.json").write_text(json.dumps(m))


# ------------------------------------------------------------------------------ the tables themselves


def test_every_symbol_is_documented_and_guidance_doubles_whole_batches():
    for spec in SUBMODELS.values():
        for t in (*spec.inputs, *spec.outputs):
            assert all(isinstance(d, int) or d in specs.SYMBOLS for d in t.shape), (spec.name, t)
        with_batch = {t.name for t in spec.inputs if "B" in t.shape}
        assert set(spec.guidance_doubled) in (set(), with_batch), spec.name  # one batch axis per model
        assert set(spec.tolerance) == {"fp32", "fp16"}
    for family in FAMILIES.values():
        assert set(family.required) <= set(family.components) <= set(SUBMODELS), family.name
        assert {"S", "D", "C"} <= set(family.defaults)
    assert specs.family_for("gelu") == "sd2" and specs.family_for("quick_gelu") == specs.family_for(None) == "sd1"


def test_separate_in_and_out_channels():
    """An inpainting UNet takes 9 channels and returns 4: the contract has a symbol for each side."""
    unet = SUBMODELS["unet"].for_model()
    symbols = specs.resolve_symbols({"C": 4, "C_in": 9, "S": 77, "D": 8}, 1, (8, 8), 8)
    assert unet.input_shapes(symbols)["sample"] == (1, 9, 8, 8)
    assert unet.outputs[0].concrete(symbols) == (1, 4, 8, 8)
    assert unet.dynamic_axes()["sample"][1] == "C_in" and unet.dynamic_axes()["out_sample"][1] == "C_out"


def test_dummy_inputs_follow_the_contract():
    symbols = specs.resolve_symbols({"C": 4, "S": 77, "D": 8, "V": 50}, 3, (4, 6), 8)
    rng = np.random.default_rng(0)
    ids = specs.dummy_inputs(SUBMODELS["text_encoder"], symbols, rng, guidance=True)["input_ids"]
    assert ids.shape == (6, 77) and ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < 50
    unet = specs.dummy_inputs(SUBMODELS["unet"].for_model(), symbols, rng)
    assert unet["sample"].shape == (3, 4, 4, 6) and unet["encoder_hidden_states"].shape == (3, 77, 8)
    assert unet["timestep"].shape == () and unet["timestep"].dtype == np.float32 and 0 <= unet["timestep"] < 1000
    image = specs.dummy_inputs(SUBMODELS["vae_encoder"], symbols, rng)["sample"]
    assert image.shape == (3, 3, 32, 48) and -1 <= image.min() and image.max() <= 1
    with pytest.raises(ModelFolderError, match=r"symbol\(s\) \['D'\] have no value"):
        SUBMODELS["unet"].for_model().input_shapes({k: v for k, v in symbols.items() if k != "D"})


# ------------------------------------------------------------------------------ one table, every consumer

FAKE_UNET = SubmodelSpec(
    "fake_unet",
    inputs=(TensorSpec("sample", F32, ("B", "C_in", "h", "w")), TensorSpec("text_embeds", F32, ("B", "P"))),
    outputs=(TensorSpec("out_sample", F32, ("B", "C_out", "h", "w")),),
    source="unet",
    guidance_doubled=("sample", "text_embeds"),
)


@pytest.fixture
def fake_family(monkeypatch):
    """A family whose extra component has an input of a new symbol P, added to the tables only."""
    sd1 = FAMILIES["sd1"]
    family = dataclasses.replace(
        sd1,
        name="fake",
        text_hidden_act="fake_act",
        components=(*sd1.components, "fake_unet"),
        defaults={**sd1.defaults, "P": 12},
    )
    monkeypatch.setitem(SUBMODELS, "fake_unet", FAKE_UNET)
    monkeypatch.setitem(FAMILIES, "fake", family)
    return family


def test_a_family_added_to_the_table_reaches_tensorrt_optimize_and_bench(fake_family, tmp_path):
    mf = ModelFolder.open(_micro(tmp_path, family="fake"))
    assert mf.family is fake_family and mf.model_symbols()["P"] == 12
    facts = tensorrt_build.model_facts(mf)
    [profile] = plans.build_profiles("fake_unet", list(FAKE_UNET.inputs), facts, plans.ProfileOptions())
    assert profile == {"sample": ((2, 4, 16, 16),) * 3, "text_embeds": ((2, 12),) * 3}  # doubled: the contract says
    [unguided] = plans.build_profiles("fake_unet", list(FAKE_UNET.inputs), facts, plans.ProfileOptions(guidance=False))
    assert unguided["text_embeds"] == ((1, 12),) * 3
    from edgediff.engines.ort_optimize import _probe_shapes

    assert _probe_shapes(mf, "fake_unet") == {"sample": (2, 4, 16, 16), "text_embeds": (2, 12)}
    assert FAKE_UNET.input_shapes(mf.symbols(3, 64, 32), guidance=True) == {"sample": (6, 4, 32, 16),
                                                                             "text_embeds": (6, 12)}  # fmt: skip


def test_a_required_component_added_to_the_table_is_required(fake_family, tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "fake", dataclasses.replace(fake_family, required=fake_family.components))
    with pytest.raises(ModelFolderError, match=r"fake_unet/model\.onnx is missing"):
        ModelFolder.open(_micro(tmp_path, family="fake"))
    assert ModelFolder.open(MICRO).required_components == ("text_encoder", "unet", "vae_decoder")  # sd1: unchanged


def test_a_family_added_to_the_table_reaches_export_dummy_inputs(fake_family):
    pytest.importorskip("torch", reason="export needs torch")
    from edgediff.export import onnx_export

    cfg = SimpleNamespace
    pipe = SimpleNamespace(
        unet=SimpleNamespace(config=cfg(sample_size=8, in_channels=9, out_channels=4, cross_attention_dim=16)),
        vae=SimpleNamespace(config=cfg(latent_channels=4, block_out_channels=[8, 8])),
        text_encoder=SimpleNamespace(
            config=cfg(hidden_act="fake_act", vocab_size=50, max_position_embeddings=77, hidden_size=16)
        ),
        tokenizer=SimpleNamespace(model_max_length=int(1e30)),  # unset: the tokenizer's rule gives CLIP's 77
    )
    assert onnx_export.family_of(pipe) == "fake"
    inputs = onnx_export.dummy_inputs(pipe, "fake_unet", batch=2)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {"sample": (2, 9, 8, 8), "text_embeds": (2, 12)}
    ids = onnx_export.dummy_inputs(pipe, "text_encoder", batch=1)["input_ids"]
    assert tuple(ids.shape) == (1, 77) and int(ids.max()) < 50


def test_bench_unet_shapes_come_from_the_contract():
    from edgediff.runtime.bench import _unet_shapes

    pipe = SimpleNamespace(folder=ModelFolder.open(MICRO))
    params = {"width": 48, "height": 32}
    assert _unet_shapes(pipe, params, 2, 7.5) == {"sample": [4, 4, 16, 24], "timestep": [],
                                                  "encoder_hidden_states": [4, 77, 16]}  # fmt: skip
    assert _unet_shapes(pipe, params, 2, 1.0)["sample"][0] == 2  # no guidance: no doubled batch


def test_no_hard_coded_text_length_or_width_outside_the_contract():
    """No literal 77 or 768 in runtime/, engines/ or export/ code except runtime/specs.py (comments and strings
    are free to mention them)."""
    found = []
    for top in ("runtime", "engines", "export"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == ROOT / "runtime" / "specs.py":
                continue
            for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
                if tok.type == tokenize.NUMBER and tok.string in ("77", "768"):
                    found.append(f"{path.relative_to(ROOT)}:{tok.start[0]}")
    assert found == []


def test_the_grep_would_see_one():
    """Negative control for the test above: the same scan finds a literal in a line of code."""
    toks = tokenize.generate_tokens(io.StringIO("ids = tok(x, max_length=77)\n").readline)
    assert [t.string for t in toks if t.type == tokenize.NUMBER] == ["77"]


# ------------------------------------------------------------------------------ one tokenizer-length rule


@pytest.mark.parametrize(("config_value", "manifest_value", "want"), [(77, 77, 77), (1e30, 10**30, 77), (64, 77, 64)])
def test_one_max_length_rule_for_tokenizer_and_tensorrt(tmp_path, config_value, manifest_value, want):
    """TensorRT's profile length is what the tokenizer feeds, whatever the manifest's record says (the old TensorRT
    rule took the manifest's 10**30 as the length)."""
    folder = _micro(tmp_path, tokenizer={"pad_token": "<|endoftext|>", "max_length": manifest_value})
    cfg = folder / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": config_value}))
    mf = ModelFolder.open(folder)
    assert mf.text_length == want == ClipTokenizer(folder / "tokenizer", mf.text_max_positions).max_length
    assert tensorrt_build.model_facts(mf).text_length == want
    assert plans.symbol_ranges("unet", tensorrt_build.model_facts(mf), plans.ProfileOptions())["S"] == (want,) * 3


def test_text_encoder_positions_bound_the_length(tmp_path):
    """Unset model_max_length with a 64-position text encoder: 64 everywhere, the pipeline's tokenizer included."""
    from edgediff.runtime import Pipeline

    folder = _micro(tmp_path)
    cfg = folder / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "model_max_length"}))
    te = folder / "text_encoder" / "config.json"
    te.write_text(json.dumps({**json.loads(te.read_text()), "max_position_embeddings": 64}))
    mf = ModelFolder.open(folder)
    assert mf.text_length == 64 and mf.symbols()["S"] == 64
    with Pipeline.load(folder, low_memory=True) as pipe:
        assert pipe.tokenizer.max_length == 64


# ------------------------------------------------------------------------------ the manifest's I/O vs the contract


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda c: c["unet"]["inputs"][0].update(name="x"), r"components\.unet\.inputs are \['x'"),
        (
            lambda c: c["vae_decoder"]["outputs"][0].update(shape=["B", 4, "H", "W"]),
            r"components\.vae_decoder\.outputs: 'sample' is float32 \['B', 4, 'H', 'W'\], "
            r"the I/O contract says float32 "
            r"\['B', 3, 'H', 'W'\]",
        ),
        (
            lambda c: c["unet"]["inputs"][2].update(shape=["B", "S"]),
            r"'encoder_hidden_states' is float32 \['B', 'S'\]",
        ),
        (lambda c: c["text_encoder"]["inputs"][0].update(dtype="float32"), r"'input_ids' is float32"),
        (lambda c: c["unet"].update(outputs="out_sample"), r"components\.unet\.outputs must be a list"),
    ],
)
def test_manifest_io_that_disagrees_with_the_contract_is_refused(tmp_path, change, needle):
    folder = _micro(tmp_path)
    _edit_manifest(folder, lambda m: change(m["components"]))
    with pytest.raises(ManifestError, match=needle):
        ModelFolder.open(folder)


def test_manifest_io_the_contract_allows(tmp_path):
    """fp16 for fp32, int64 ids, a static export's fixed sizes, other symbol names, a 1-D timestep: all accepted."""
    folder = _micro(tmp_path)

    def change(c):
        c["unet"]["inputs"][0].update(dtype="float16", shape=[2, 4, 16, 16])
        c["unet"]["inputs"][1].update(shape=[1])
        c["unet"]["outputs"][0].update(shape=["batch", "channels", "height", "width"])
        c["text_encoder"]["inputs"][0].update(dtype="int64")

    _edit_manifest(folder, lambda m: change(m["components"]))
    assert ModelFolder.open(folder).components


def test_a_diffusers_folder_of_another_pipeline_names_what_edgediff_exports(tmp_path):
    src = tmp_path / "sd3"
    (src / "unet").mkdir(parents=True)
    (src / "vae").mkdir()
    (src / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelFolderError, match=r"StableDiffusion3Pipeline .*does not export; it exports "
                                               r"LatentConsistencyModelPipeline, StableDiffusionImg2ImgPipeline, "
                                               r"StableDiffusionInpaintPipeline, StableDiffusionPipeline, "
                                               r"StableDiffusionXLImg2ImgPipeline, .*StableDiffusionXLPipeline "
                                               r"models"):  # fmt: skip
        ModelFolder.open(src)


# ------------------------------------------------------------------------------ the folder swap


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_replace_dir_puts_the_new_folder_in_place(tmp_path):
    files.replace_dir(_folder(tmp_path / ".new", "1"), tmp_path / "out")
    assert (tmp_path / "out" / "f.txt").read_text() == "1"
    files.replace_dir(_folder(tmp_path / ".new", "2"), tmp_path / "out")
    assert (tmp_path / "out" / "f.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_interrupted_keeps_the_old_folder(tmp_path, monkeypatch):
    old, new = _folder(tmp_path / "out", "old"), _folder(tmp_path / ".new", "new")
    real = Path.rename

    def rename(self, target):
        if self == new:
            raise KeyboardInterrupt  # between the two renames
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        files.replace_dir(new, old)
    assert (old / "f.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [".new", "out"]


def test_replace_dir_reports_an_old_folder_it_cannot_delete(tmp_path, monkeypatch, caplog):
    old, new = _folder(tmp_path / "out", "old"), _folder(tmp_path / ".new", "new")
    monkeypatch.setattr(files.shutil, "rmtree", lambda *a, **k: None)
    with caplog.at_level(logging.WARNING, logger="edgediff.runtime.files"):
        files.replace_dir(new, old)
    assert (old / "f.txt").read_text() == "new"
    assert f"could not delete the replaced folder {tmp_path / f'.out.old-{os.getpid()}'}" in caplog.text
