"""`edgediff optimize`: ONNX Runtime CPU variants (fused attention, saved optimised graph) are
used only where their key matches, and give the image the exported graph gives."""

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff.runtime import Pipeline
from edgediff.runtime.cli import main
from edgediff.runtime.errors import ModelFolderError
from edgediff.runtime.pipeline import embedded_model_path
from shapes_check import MINIMUM, fidelity, passes  # tests/ is on sys.path (pytest rootdir import mode)

pytest.importorskip("onnx", reason="edgediff optimize needs the onnx package (dev extra)")


@pytest.fixture(scope="module")
def optimized_copy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opt") / "shapes"
    shutil.copytree(embedded_model_path(), folder)
    result = CliRunner().invoke(main, ["optimize", str(folder)])
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_attention_is_fused_despite_numpy2(optimized_copy):
    """ONNX Runtime's UNet attention fusion crashes under numpy >= 2.4 without our fix; with it,
    every attention of the embedded UNet (self and cross) becomes MultiHeadAttention on separate
    Q, K, V, the form whose CPU kernel is flash attention; no packed-QKV ``Attention`` op is left,
    and no unfused Softmax."""
    import onnx

    folder, output = optimized_copy
    unet_line = next(line for line in output.splitlines() if line.startswith("unet:"))
    assert "MultiHeadAttention" in unet_line, output
    source = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
    n_softmax = sum(node.op_type == "Softmax" for node in source.graph.node)
    assert n_softmax > 0
    graph = onnx.load(str(folder / "ort-cpu" / "unet" / "model.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    mha = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    assert len(mha) == n_softmax and "Attention" not in ops and "Softmax" not in ops, sorted(set(ops))
    assert all(len(node.input) >= 3 and all(node.input[:3]) for node in mha)  # query, key, value each given


def test_variant_used_and_same_image(optimized_copy):
    folder, _ = optimized_copy
    kwargs = {"num_inference_steps": 4, "seed": 11}
    with Pipeline.load(folder) as pipe:
        assert "ort-cpu" in str(pipe.engines["unet"].model_file)
        fast = np.asarray(pipe("a yellow diamond on the right, purple background", **kwargs).images[0], np.int16)
    with Pipeline.load(folder, cpu_variant="off") as pipe:
        assert "ort-cpu" not in str(pipe.engines["unet"].model_file)
        plain = np.asarray(pipe("a yellow diamond on the right, purple background", **kwargs).images[0], np.int16)
    assert np.abs(fast - plain).max() <= 1


def test_second_run_skips_and_stale_variant_is_ignored(optimized_copy, tmp_path, caplog):
    folder, _ = optimized_copy
    again = CliRunner().invoke(main, ["optimize", str(folder), "--component", "vae_decoder"])
    assert again.exit_code == 0 and "up to date" in again.output
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    source = copy / "unet" / "model.onnx"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # "re-exported"
    with Pipeline.load(copy) as pipe:
        assert "ort-cpu" not in str(pipe.engines["unet"].model_file)
        assert "ort-cpu" in str(pipe.engines["text_encoder"].model_file)
    assert "ignoring the optimised variant" in caplog.text


def test_unknown_component_is_named(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(embedded_model_path(), folder)
    result = CliRunner().invoke(main, ["optimize", str(folder), "--component", "vae_encoderx"])
    assert result.exit_code == 1 and "vae_encoderx" in result.output
    assert not (folder / "ort-cpu").exists() or not any((folder / "ort-cpu").iterdir())


@pytest.fixture(scope="module")
def int8_copy(optimized_copy):
    folder, _ = optimized_copy
    result = CliRunner().invoke(main, ["optimize", str(folder), "--int8"])
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_int8_variant_is_opt_in_quantised_and_keeps_fidelity(int8_copy):
    """``--int8`` makes an int8 UNet (dynamic int8 MatMuls) that is used only when asked for; it
    changes the image, but the trained embedded model still draws what the prompts say."""
    import onnx

    folder, output = int8_copy
    assert "unet:" in output and "text_encoder:" not in output, output  # the UNet only, by default
    graph = onnx.load(str(folder / "ort-cpu-int8" / "unet" / "model.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "DynamicQuantizeMatMul" in ops, sorted(ops)
    assert "MultiHeadAttention" in ops  # quantised after the fusions, not instead of them
    with Pipeline.load(folder) as pipe:  # not used unless asked for
        assert "ort-cpu-int8" not in str(pipe.engines["unet"].model_file)
    with Pipeline.load(folder, cpu_variant="int8") as pipe:
        assert "ort-cpu-int8" in str(pipe.engines["unet"].model_file)
        assert "ort-cpu" in str(pipe.engines["vae_decoder"].model_file)  # fp32 variant where no int8 one
        result = fidelity(pipe)
    assert passes(result), {k: result[k] for k in MINIMUM}


def test_int8_without_the_variant_names_the_command(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(embedded_model_path(), folder)
    with pytest.raises(ModelFolderError, match=r"optimize .* --int8"):
        Pipeline.load(folder, cpu_variant="int8")
    result = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(folder), "--int8",
                                       "-o", str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 1 and "--int8" in result.output and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("key", ["cpu_variant", "optimized"])
def test_recorded_int8_choice_is_used_again(tmp_path, key):
    """A record's engine_options choose the int8 UNet again, under the option's name and under the name
    records written before the rename carry ("optimized"): without the variant, the int8 error."""
    import json

    from cli_check import assert_one_line_error, run_cli

    folder = tmp_path / "m"
    shutil.copytree(embedded_model_path(), folder)
    with Pipeline.load(folder) as pipe:
        record = pipe("a red circle", num_inference_steps=2, seed=1).parameters
    assert record["engine_options"] == {}  # the default choice is not recorded
    record["engine_options"] = {key: "int8"}
    (tmp_path / "p.json").write_text(json.dumps(record))
    out = tmp_path / "x.png"
    assert_one_line_error(*run_cli("generate", "--params", tmp_path / "p.json", "--model", folder, "-o", out),
                          "no int8 variant", "--int8")  # fmt: skip
    assert not out.exists()


def test_generate_suggests_optimize_until_it_is_done(tmp_path, monkeypatch):
    import edgediff.runtime.cli as cli

    monkeypatch.setattr(cli, "_HINT_MIN_BYTES", 0)  # the embedded UNet stands in for a real, large one
    folder = tmp_path / "m"
    shutil.copytree(embedded_model_path(), folder)
    args = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "-o", str(tmp_path / "x.png")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and f"edgediff optimize {folder}" in first.output
    assert CliRunner().invoke(main, ["optimize", str(folder), "--component", "unet"]).exit_code == 0
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and "tip:" not in second.output
