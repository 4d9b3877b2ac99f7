"""`edgediff bench` output (table and JSON schema), the low-memory mode, ONNX Runtime session
settings and the FLOP counter. No timing threshold anywhere: the schema checks read bench's report
only (fields present, typed, consistent with the fields they are defined from); the figures are
checked against measures taken outside bench (UNet calls counted and timed at the engine, the wall
time around the call, the process's resident memory, FLOPs counted by hand and by PyTorch)."""

import json
from pathlib import Path

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
    """Schema and internal consistency only, from the report itself: every field present and typed, the
    counts equal to the settings, and the derived figures (host time, host fraction, steps/s) equal to
    the formulas bench defines them by. It proves no figure right; test_bench_figures_against_outside_measures
    checks them against measures taken outside bench."""
    assert report["schema"] == 1
    m = report["machine"]
    assert {"cpu", "arch", "logical_cpus", "usable_cpus", "flags", "memory_bytes", "os", "python", "libraries"} <= set(
        m
    )
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
    # bench's definitions: host = denoise - UNet calls, fraction = host / denoise, steps/s = steps / denoise
    st = report["stages"]
    assert st["host"]["median"] < st["denoise"]["median"]
    assert 0 <= report["host_fraction"] < 1
    assert report["host_fraction"] == pytest.approx(st["host"]["median"] / st["denoise"]["median"])
    assert report["steps_per_second"] == pytest.approx(steps / st["denoise"]["median"])
    assert isinstance(report["peak_rss_bytes"], int)


def test_bench_json_schema_on_embedded_model():
    result = CliRunner().invoke(main, ["bench", "--steps", "3", "--runs", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    _check_schema(report, steps=3, runs=2, unet_batch=2)
    assert report["settings"]["width"] == 64 and report["settings"]["scheduler"] == "dpmpp_2m"


def test_bench_table_and_output_file(tmp_path):
    out = tmp_path / "r" / "bench.json"
    args = [
        "bench",
        "--steps",
        "2",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--guidance",
        "1",
        "--threads",
        "1",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for label in ("machine", "libraries", "load", "cold run", "UNet call", "host/step", "steps/s", "peak RSS"):
        assert label in result.output
    report = json.loads(out.read_text())
    _check_schema(report, steps=2, runs=1, unet_batch=1)  # guidance 1: no unconditional half
    assert report["settings"]["threads"] == 1
    assert format_table(report).splitlines()[0].startswith("model")
    # an engine's stats(): per-call lists shown as their median, the rest as they are (TensorRT's keys)
    report["device"] = {"unet": {"compute_ms": [3.0, 1.0, 2.0], "copy_ms": [], "profile": 0}}
    assert format_table(report).splitlines()[-1] == "unet         compute_ms median 2.00, profile 0"


def _rss_bytes() -> int:
    """This process's resident memory now, from the kernel (bench reads getrusage's peak instead)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmRSS:"))) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_bench_figures_against_outside_measures(monkeypatch):
    """Each figure against a measure bench does not take: UNet calls counted and timed here, inside the engine
    (so every call bench times holds one of ours: its min/median/max are at least ours), equal to
    (1 cold + warmup + runs) x steps; the stages of a run nest inside its total, and load + cold run + the
    timed runs inside the wall time measured around run_bench; the peak RSS at least the RSS before the call."""
    import time

    from edgediff.engines.onnxruntime import OrtEngine

    calls = []
    real_run = OrtEngine.run

    def timed_run(self, feeds):
        t0 = time.perf_counter()
        out = real_run(self, feeds)
        calls.append((self.component, time.perf_counter() - t0))
        return out

    monkeypatch.setattr(OrtEngine, "run", timed_run)
    steps, warmup, runs = 3, 1, 2
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    report = run_bench(steps=steps, warmup=warmup, runs=runs, flops=False)
    wall = time.perf_counter() - t0

    unet = [d for name, d in calls if name == "unet"]
    assert len(unet) == (1 + warmup + runs) * steps  # guidance 7.5: one batch-2 call per step
    assert [name for name, _ in calls].count("text_encoder") == 1 + warmup + runs
    ours = np.asarray(unet[-runs * steps :])  # the timed runs are the last ones
    u = report["unet_call"]
    assert u["n"] == len(ours)
    assert u["min"] >= ours.min() and u["median"] >= np.median(ours) and u["max"] >= ours.max()

    mean = {k: v["mean"] for k, v in report["stages"].items()}  # means: a per-run inequality survives averaging
    assert mean["unet"] <= mean["denoise"]
    parts = ("tokenize", "text_encoder", "denoise", "vae_decoder", "postprocess", "image_encode")
    assert sum(mean[k] for k in parts) <= mean["total"]
    assert report["load"]["total"] + report["cold_run"]["total"] + runs * mean["total"] <= wall
    assert report["peak_rss_bytes"] >= rss_before


def test_flop_count_matches_a_hand_count(tmp_path):
    """count_flops on a graph small enough to count by hand (2 FLOP per multiply-add), batch from input_shapes."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgediff.runtime.flops import count_flops

    def weight(name, *shape):
        return numpy_helper.from_array(np.zeros(shape, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),  # 3 -> 4 channels, 3x3, 8x8 kept
        helper.make_node("Conv", ["c1", "w2"], ["c2"], group=2, strides=[2, 2]),  # 4 -> 6, grouped 1x1, stride 2: 4x4
        helper.make_node("Reshape", ["c2", "shape"], ["r"]),  # [B, 6, 4, 4] -> [B, 6, 16]
        helper.make_node("MatMul", ["r", "w3"], ["m"]),  # [B, 6, 16] @ [16, 5]
        helper.make_node("Flatten", ["m"], ["f"]),  # [B, 30]
        helper.make_node("Gemm", ["f", "w4"], ["y"]),  # [B, 30] @ [30, 7]
        helper.make_node("Relu", ["y"], ["out"]),  # not counted
    ]
    inits = [weight("w1", 4, 3, 3, 3), weight("w2", 6, 2, 1, 1), weight("w3", 16, 5), weight("w4", 30, 7),
             numpy_helper.from_array(np.array([0, 6, -1], np.int64), "shape")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    path = tmp_path / "hand.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    b = 3
    conv1 = 2 * (b * 4 * 8 * 8) * (3 * 3 * 3)  # each output element: Cin x kh x kw multiply-adds
    conv2 = 2 * (b * 6 * 4 * 4) * (2 * 1 * 1)  # groups of 2 input channels
    matmul = 2 * (b * 6 * 5) * 16
    gemm = 2 * (b * 7) * 30
    got = count_flops(path, {"x": [b, 3, 8, 8]})
    assert got["uncounted"] == []
    assert got["by_op"] == {"Conv": conv1 + conv2, "MatMul": matmul, "Gemm": gemm}
    assert got["total"] == conv1 + conv2 + matmul + gemm == 41472 + 1152 + 2880 + 1260


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
    [
        {"optimization": "disable"},
        {"optimization": "basic", "threads": 1},
        {"prepack": False},
        {"mem_arena": False, "mem_pattern": False},
        {"io_binding": True},
    ],
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
    with pytest.raises(InvalidArgumentError, match=r"cpu_variant must be 'auto', 'off' or 'int8', got 'fast'"):
        Pipeline.load(cpu_variant="fast")
    # the option's old name, too close to optimization=, is refused with the new one
    with pytest.raises(InvalidArgumentError, match=r"optimized= is now called cpu_variant=.*pass cpu_variant='int8'"):
        Pipeline.load(optimized="int8")


def test_host_time_leaves_the_callback_out(monkeypatch):
    """timings["host"] is the loop minus the UNet calls and minus the progress callback, which gets its own
    entry. A stand-in clock that only the callback moves (by 100 s a step) makes the split exact."""
    from types import SimpleNamespace

    from edgediff.runtime import pipeline

    now = [0.0]

    def callback(i, t, latents):
        now[0] += 100.0

    with Pipeline.load() as pipe:
        monkeypatch.setattr(pipeline, "time", SimpleNamespace(perf_counter=lambda: now[0]))
        timings = pipe("a red circle", num_inference_steps=3, seed=1, callback=callback).timings
        assert timings["denoise"] == timings["callback"] == 300.0 and timings["host"] == 0.0
        assert "callback" not in pipe("a red circle", num_inference_steps=3, seed=1).timings  # none given


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
    ours = count_flops(
        tiny_export("sd1") / "unet" / "model.onnx",
        {"sample": list(sample.shape), "timestep": [], "encoder_hidden_states": list(hidden.shape)},
    )
    assert ours["uncounted"] == []
    assert ours["total"] == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_low_memory_mode_fails_at_load_for_a_missing_engine():
    from edgediff.runtime.errors import EngineUnavailableError

    with pytest.raises(EngineUnavailableError, match="unknown engine 'nope'"):
        Pipeline.load(engine="nope", low_memory=True)


def test_bench_reports_sdxl_stages():
    """On an SDXL folder (the committed micro model) bench loads and times both text encoders; the UNet's shapes
    for the FLOP count include SDXL's added conditioning."""
    model = Path(__file__).parent / "fixtures" / "micro-sdxl"
    args = ["bench", str(model), "--steps", "2", "--runs", "1", "--warmup", "0", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["load"]) == {"total", "text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert report["stages"]["text_encoder"]["median"] > 0 and report["settings"]["unet_batch"] == 2
