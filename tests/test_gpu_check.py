"""benchmarks/gpu_check.py without a GPU: the peak table, the ratios and the report are tested on a recorded
result, and a run on a machine with no GPU says plainly that nothing was timed. The check itself runs only
where an NVIDIA GPU is (docs/GPU.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "gpu_check", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

RECORDED = {
    "machine": {"gpu": "NVIDIA H200, 570.86", "cpu": "Intel Xeon"},
    "settings": {
        "size": 512,
        "steps": 20,
        "guidance": 7.5,
        "runs": 3,
        "command": "python benchmarks/gpu_check.py",
        "date": "today",
    },
    "peak_tflops": 989.0,
    "unet_flops": 1.6e12,
    "gpu_tests": {"returncode": 0, "tail": ["12 passed, 3 skipped in 40.1s"]},
    "results": [
        {"contender": "diffusers", "unet_call_median_s": 0.020, "end_to_end_median_s": 0.60},
        {"contender": "edgediff", "unet_call_median_s": 0.016, "end_to_end_median_s": 0.45},
    ],
    "image_difference": {"mean": 0.8, "max": 9},
    "not_run": [],
}


def test_peak_table_takes_the_longest_name_that_matches():
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3 SXM") is not None
    assert gpu_check.peak_tflops("NVIDIA L40S") == 362.0  # not L4's
    assert gpu_check.peak_tflops("Some Unknown Card") is None and gpu_check.peak_tflops(None) is None


def test_ratios_and_report_from_recorded_json():
    r = gpu_check.ratios(RECORDED["results"])
    assert abs(r["unet_call"] - 0.8) < 1e-9 and abs(r["end_to_end"] - 0.75) < 1e-9
    text = "\n".join(gpu_check.summarise({**RECORDED, "ratios": r}))
    assert "| edgediff | 16.0 | 0.45 | 100 | 10 % |" in text  # 1.6 TFLOP / 16 ms = 100 TFLOP/s of 989
    assert "12 passed, 3 skipped" in text and "unet_call 0.80" in text and "mean 0.80, max 9" in text
    failed = {**RECORDED, "results": [{"contender": "edgediff", "error": "CUDA out of memory"}]}
    assert gpu_check.ratios(failed["results"]) == {}
    assert "| edgediff | failed: CUDA out of memory |" in "\n".join(gpu_check.summarise(failed))


def test_without_a_gpu_it_says_nothing_was_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_check, "install", lambda wheels: [])
    from edgediff.runtime import measure

    monkeypatch.setattr(measure, "_gpu_name", lambda: None)
    gpu_check.main(["--skip-tests"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["not_run"] == ["no NVIDIA GPU found (nvidia-smi): nothing was timed"]
    assert "results" not in report
    assert "Not run: no NVIDIA GPU found" in (tmp_path / "gpu_check.md").read_text()
