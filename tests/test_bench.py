"""`edgediff bench` output (table and JSON schema), the low-memory mode, ONNX Runtime session
settings and the FLOP counter. Nothing here depends on a timing's value: only on its presence,
its type and the structure around it."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import needs_torch

from edgediff.runtime import Pipeline
from edgediff.runtime.bench import STAGES, format_table, run_bench
from edgediff.runtime.cli import main
from edgediff.runtime.errors import InvalidArgumentError

SUMMARY_KEYS = {"median", "p90", "p99", "mean", "min", "max", "n"}


def _check_schema(report, steps, runs, unet_batch):
    assert report["schema"] == 1
    m = report["machine"]
    assert {"cpu", "arch", "logical_cpus", "usable_cpus", "flags", "memory_bytes", "os", "python", "libraries"} <= set(m)
    assert "onnxruntime" in m["libraries"] and "numpy" in m["libraries"]
    s = report["settings"]
    assert s["steps"] == steps and s["runs"] == runs and s["unet_batch"] == unet_batch
    assert set(report["load"]) == {"total", "text_encoder", "unet", "vae_decoder"}
    assert all(isinstance(v, float) and v > 0 for v in report["load"].values())
    assert report["cold_run"]["total"] > 0
    assert set(report["stages"]) == set(STAGES)
    for stage in STAGES:
        st = report["stages"][stage]
        assert set(st) == SUMMARY_KEYS and st["n"] == runs and st["median"] >= 0
    assert report["unet_call"]["n"] == steps * runs
    assert report["unet_call"]["min"] <= report["unet_call"]["median"] <= report["unet_call"]["p99"]
    # the loop is UNet calls plus host time, by construction of the two numbers
    st = report["stages"]
    assert st["host"]["median"] < st["denoise"]["median"]
    assert 0 <= report["host_fraction"] < 1
    assert report["steps_per_second"] == pytest.approx(steps / st["denoise"]["median"])
    assert report["peak_rss_bytes"] > 50 * 2**20


def test_bench_json_schema_on_embedded_model():
    result = CliRunner().invoke(main, ["bench", "--steps", "3", "--runs", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    _check_schema(report, steps=3, runs=2, unet_batch=2)
    assert report["settings"]["width"] == 64 and report["settings"]["scheduler"] == "dpmpp_2m"


def test_bench_table_and_output_file(tmp_path):
    out = tmp_path / "r" / "bench.json"
    args = ["bench", "--steps", "2", "--runs", "1", "--warmup", "0", "--guidance", "1", "--threads", "1", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for label in ("machine", "libraries", "load", "cold run", "UNet call", "host/step", "steps/s", "peak RSS"):
        assert label in result.output
    report = json.loads(out.read_text())
    _check_schema(report, steps=2, runs=1, unet_batch=1)  # guidance 1: no unconditional half
    assert report["settings"]["threads"] == 1
    assert format_table(report).splitlines()[0].startswith("model")


@pytest.mark.parametrize("bad", [{"runs": 0}, {"warmup": -1}, {"batch": 0}, {"steps": 0}])
def test_bench_rejects_bad_counts(bad):
    with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
        run_bench(**bad)


def test_low_memory_mode_same_image_and_releases_engines():
    kwargs = {"num_inference_steps": 4, "seed": 3, "guidance_scale": 5.0}
    with Pipeline.load() as pipe:
        normal = pipe("a green square at the top, red background", **kwargs)
    pipe = Pipeline.load(low_memory=True)
    assert pipe.engines == {}
    low = pipe("a green square at the top, red background", **kwargs)
    assert pipe.engines == {}  # nothing stays loaded between calls
    assert np.array_equal(np.asarray(low.images[0]), np.asarray(normal.images[0]))
    assert {"load_text_encoder", "load_unet", "load_vae_decoder"} <= set(low.timings)
    assert len(low.unet_calls) == 4


@pytest.mark.parametrize(
    "options",
    [{"optimization": "disable"}, {"optimization": "basic", "threads": 1}, {"prepack": False},
     {"mem_arena": False, "mem_pattern": False}, {"io_binding": True}],  # fmt: skip
)
def test_session_settings_keep_the_image(options):
    """Every ONNX Runtime setting changes speed or memory, never the result (fp32: within 1/255)."""
    kwargs = {"num_inference_steps": 3, "seed": 5}
    with Pipeline.load() as pipe:
        ref = np.asarray(pipe("a white cross on the left, blue background", **kwargs).images[0], dtype=np.int16)
    with Pipeline.load(**options) as pipe:
        got = np.asarray(pipe("a white cross on the left, blue background", **kwargs).images[0], dtype=np.int16)
    assert np.abs(got - ref).max() <= 1


def test_bad_session_settings_are_named():
    with pytest.raises(InvalidArgumentError, match="optimization must be one of"):
        Pipeline.load(optimization="fast")
    with pytest.raises(InvalidArgumentError, match="threads"):
        Pipeline.load(threads=0)


def test_io_binding_keeps_frozen_inputs_and_copies_changed_ones():
    from edgediff.engines.onnxruntime import OrtEngine
    from edgediff.runtime.pipeline import embedded_model_path

    eng = OrtEngine(embedded_model_path() / "text_encoder" / "model.onnx", io_binding=True)
    ids = np.zeros((1, 77), dtype=np.int32)
    ids.flags.writeable = False
    first = eng.run({"input_ids": ids})["last_hidden_state"]
    cached = eng._bound["input_ids"][1]
    assert np.array_equal(eng.run({"input_ids": ids})["last_hidden_state"], first)
    assert eng._bound["input_ids"][1] is cached  # the same frozen array is not copied again
    other = np.ones((1, 77), dtype=np.int32)  # writeable: copied every call, never cached
    assert not np.array_equal(eng.run({"input_ids": other})["last_hidden_state"], first)
    assert eng._bound["input_ids"][1] is cached


@needs_torch
def test_flop_count_matches_torch_flop_counter(tiny_source, tiny_export):
    """Our count from the ONNX graph equals PyTorch's FlopCounterMode on the same UNet and shapes
    (both count Conv and matrix products as 2 FLOP per multiply-add). The plain attention processor
    makes the attention products visible to the counter (its CPU SDPA kernel is not counted)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from edgediff.runtime.flops import count_flops

    unet = UNet2DConditionModel.from_pretrained(tiny_source("sd1"), subfolder="unet").eval()
    unet.set_attn_processor(AttnProcessor())
    sample = torch.randn(3, unet.config.in_channels, 8, 12)
    hidden = torch.randn(3, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(10.0), hidden)
    ours = count_flops(tiny_export("sd1") / "unet" / "model.onnx",
                       {"sample": list(sample.shape), "timestep": [], "encoder_hidden_states": list(hidden.shape)})  # fmt: skip
    assert ours["uncounted"] == []
    assert ours["total"] == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_low_memory_mode_fails_at_load_for_a_missing_engine():
    from edgediff.runtime.errors import EngineUnavailableError

    with pytest.raises(EngineUnavailableError, match="unknown engine 'nope'"):
        Pipeline.load(engine="nope", low_memory=True)
