"""Install contract: exactly one ONNX Runtime build comes from the extras, and a missing engine
library gives an error that says what to install."""

import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _requirement_names(reqs):
    return [r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower()
            for r in reqs]  # fmt: skip


def test_extras_never_install_both_onnxruntime_builds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    assert not [n for n in base if n.startswith("onnxruntime")], base
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" not in extras["cpu"]
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime" not in extras["gpu"]
    for name, reqs in extras.items():
        if name not in ("cpu", "gpu"):  # export/dev/tensorrt bring no ONNX Runtime of their own
            assert not [n for n in reqs if n.startswith("onnxruntime")], (name, reqs)
    assert not {"torch", "diffusers", "transformers"} & set(base)  # the lean runtime never brings PyTorch


def test_missing_onnxruntime_names_the_extra():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["onnxruntime"] = None  # as if it were not installed
        from edgediff.runtime import Pipeline
        from edgediff.runtime.errors import EngineUnavailableError
        try:
            Pipeline.load()
        except EngineUnavailableError as e:
            print(e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'edgediff[cpu]'" in out and "edgediff[gpu]" in out


def test_both_builds_installed_is_detected(monkeypatch):
    from importlib import metadata

    from edgediff.engines import onnxruntime as ort_engine

    monkeypatch.setattr(metadata, "version", lambda dist: "1.0")
    assert ort_engine._both_builds_installed() == ["onnxruntime", "onnxruntime-gpu"]

    def only_cpu(dist):
        if dist == "onnxruntime-gpu":
            raise metadata.PackageNotFoundError(dist)
        return "1.0"

    monkeypatch.setattr(metadata, "version", only_cpu)
    assert ort_engine._both_builds_installed() == []
