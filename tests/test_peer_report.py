"""The peer comparison's bookkeeping (no timings are judged here): ratios pair each edgediff
configuration with each peer at the same size, failed contenders are left out, and image
differences are computed from the written PNGs."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

_spec = importlib.util.spec_from_file_location(
    "peer_comparison", Path(__file__).resolve().parents[1] / "benchmarks" / "peer_comparison.py"
)
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)


def _result(contender, size, unet, e2e, cold, rss):
    return {"contender": contender, "size": size, "unet_call_median_s": unet, "unet_call_p90_s": unet,
            "end_to_end_median_s": e2e, "cold_start_s": cold, "load_s": 1.0, "peak_rss_bytes": rss}  # fmt: skip


def test_ratios_pair_each_configuration_with_each_peer_at_its_size():
    results = [
        _result("diffusers", 256, 4.0, 80.0, 90.0, 4e9),
        _result("optimum", 256, 2.0, 50.0, 60.0, 5e9),
        _result("edgediff", 256, 1.0, 40.0, 45.0, 2e9),
        _result("diffusers", 512, 10.0, 200.0, 210.0, 5e9),
        _result("edgediff", 512, 5.0, 150.0, 168.0, 4e9),  # optimum missing at 512
        {"contender": "int8", "size": 512, "error": ["boom"]},
    ]
    rows = peers.summarise(results)
    assert [(r["size"], r["edgediff"], r["peer"]) for r in rows] == [
        (512, "edgediff", "diffusers"), (256, "edgediff", "diffusers"), (256, "edgediff", "optimum")]  # fmt: skip
    assert rows[0]["unet_call"] == 0.5 and rows[0]["end_to_end"] == 0.75 and rows[0]["cold_start"] == 0.8
    assert rows[0]["peak_rss"] == 0.8
    assert rows[2]["unet_call"] == 0.5 and rows[2]["peak_rss"] == 0.4


def test_image_difference(tmp_path):
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    for name, img in (("a", a), ("b", b), ("c", np.zeros((4, 4, 3), np.uint8))):
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    same = peers.image_difference(tmp_path / "a.png", tmp_path / "a.png")
    assert same["mean_abs"] == 0 and same["max_abs"] == 0 and same["psnr_db"] == float("inf")
    d = peers.image_difference(tmp_path / "a.png", tmp_path / "b.png")
    assert d["max_abs"] == 255 and abs(d["mean_abs"] - 255 / 192) < 1e-9
    assert abs(d["psnr_db"] - 10 * np.log10(192)) < 1e-9  # mse = 255**2 / 192
    assert peers.image_difference(tmp_path / "a.png", tmp_path / "c.png") is None  # other size
    assert peers.image_difference(tmp_path / "a.png", tmp_path / "missing.png") is None


def test_targets_are_judged_at_the_largest_size_with_how_far_off():
    results = [
        _result("diffusers", 512, 10.0, 200.0, 210.0, 5e9),
        _result("optimum", 512, 9.0, 180.0, 200.0, 8e9),
        {**_result("edgediff", 512, 5.0, 150.0, 168.0, 3e9), "stages_s": {"host": 0.5, "denoise": 100.0}},
        {**_result("low-memory", 512, 5.0, 160.0, 170.0, 3.5e9), "options": {"low_memory": True}},
        _result("diffusers", 256, 1.0, 20.0, 21.0, 4e9),
        _result("edgediff", 256, 0.1, 2.0, 2.1, 1e9),  # not judged: targets are for the largest size
    ]
    report = {"results": results, "settings": {"largest_component_bytes": 3e9}}
    report["ratios"] = peers.summarise(results)
    rows = {(t["target"], t["edgediff"]): t for t in peers.judge_targets(report)}
    unet = rows[("UNet call vs diffusers", "edgediff")]
    assert unet["value"] == 0.5 and unet["limit"] == 0.40 and not unet["met"] and abs(unet["of_limit"] - 1.25) < 1e-12
    assert rows[("peak memory vs diffusers", "edgediff")]["met"]  # 0.6 <= 0.8
    assert rows[("end to end vs optimum", "edgediff")]["value"] == 150 / 180
    assert rows[("host time share of the denoising loop", "edgediff")]["value"] == 0.005
    low = rows[("low-memory peak vs largest component + 1 GB", "low-memory")]
    assert low["value"] == 3.5e9 / 4e9 and low["met"]
    assert ("low-memory peak vs largest component + 1 GB", "edgediff") not in rows
    assert all(t["edgediff"] != "diffusers" for t in rows.values())


def test_markdown_holds_the_table_image_differences_and_targets(tmp_path):
    results = [
        _result("diffusers", 512, 10.0, 200.0, 210.0, 5e9),
        {**_result("edgediff", 512, 5.0, 150.0, 168.0, 3e9),
         "image_vs_diffusers": {"mean_abs": 0.01, "max_abs": 1.0, "psnr_db": 70.0}},
        {**_result("int8", 512, 4.0, 140.0, 160.0, 3e9), "options": {"cpu_variant": "int8"},
         "image_vs_diffusers": {"mean_abs": 3.5, "max_abs": 60.0, "psnr_db": 30.0},
         "image_vs_edgediff": {"mean_abs": 3.4, "max_abs": 59.0, "psnr_db": 30.5}},
    ]  # fmt: skip
    machine = {"cpu": "X", "usable_cpus": 2, "flags": ["avx2"], "memory_bytes": 2**34, "os": "Linux",
               "libraries": {"numpy": "2"}}  # fmt: skip
    settings = {"arch": "sd15", "steps": 20, "guidance": 7.5, "threads": 2, "warmup": 0, "runs": 1,
                "command": "python benchmarks/peer_comparison.py", "date": "today"}  # fmt: skip
    report = {"machine": machine, "settings": settings, "results": results}
    report["ratios"] = peers.summarise(results)
    peers.write_markdown(tmp_path / "r.md", report)
    text = (tmp_path / "r.md").read_text()
    assert "| 512 | int8 | 4.00 |" in text and "3.50 / 60 |" in text
    assert "512 px, int8: mean 3.40, max 59 (0-255), PSNR 30.5 dB" in text
    assert "| UNet call vs diffusers | int8 | 0.4 | 0.4 | yes | 1.00 |" in text
    assert "| end to end vs diffusers | edgediff | 0.75 | 0.45 | no | 1.67 |" in text


def test_one_command_optimizes_first_and_compares_configurations(tmp_path, monkeypatch):
    """The documented command's edgediff side end to end, on a copy of the embedded model: it
    runs `edgediff optimize` (and `--int8`, asked for by a configuration) before measuring, each
    configuration runs in its own process, and the report holds the int8 image difference."""
    import json
    import shutil

    import pytest

    pytest.importorskip("onnx", reason="edgediff optimize needs onnx (dev extra)")
    pytest.importorskip("sympy", reason="edgediff optimize needs sympy (dev extra)")
    from edgediff.runtime.pipeline import embedded_model_path

    folder = tmp_path / "shapes"
    shutil.copytree(embedded_model_path(), folder)
    monkeypatch.setattr(peers, "RESULTS", tmp_path / "results")
    peers.main(["--model", str(tmp_path / "no-diffusers-source"), str(folder), "--contenders", "edgediff",
                "--sizes", "64", "--steps", "3", "--edgediff", "edgediff={}", "--edgediff",
                'int8={"cpu_variant": "int8"}', "--label", "_t"])  # fmt: skip
    assert (folder / "ort-cpu" / "unet" / "optimized.json").is_file()
    assert (folder / "ort-cpu-int8" / "unet" / "optimized.json").is_file()
    report = json.loads((tmp_path / "results" / "peers_sd15_t.json").read_text())
    rows = {r["contender"]: r for r in report["results"]}
    assert set(rows) == {"edgediff", "int8"} and not any("error" in r for r in rows.values()), rows
    assert rows["edgediff"]["unet_calls_per_image"] == 3  # one batched (cond + uncond) call per step
    assert rows["int8"]["image_vs_edgediff"]["mean_abs"] > 0  # int8 changes the image
    assert (tmp_path / "results" / "peers_sd15_t.png").is_file()
