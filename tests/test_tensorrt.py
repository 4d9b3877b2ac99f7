"""TensorRT: plan keys, profiles, build.json, plan selection and refusal, the fp16 version switch and
the errors without TensorRT or a GPU run everywhere (pure functions, no tensorrt import). Real
builds and runs are marked ``gpu`` and ``tensorrt`` and skip with the reason where the library or
a GPU is absent; they need the tiny model (torch) too.

fp16 tolerance (GPU tests): a single UNet / VAE call must match ONNX Runtime's fp32 CPU output
within the exporter's own fp16 bound (validate.py: max|diff| <= 1e-2 + 2e-2 * max|ref|). A whole
4-step generation must match the fp32 ONNX Runtime image on the same seed within a mean absolute
difference of 2/255 per channel (less than one step of 8-bit quantisation on average once fp16's
~3 significant digits have gone through 4 UNet calls and the VAE) and a max of 32/255 (catches
a wrong channel order, a NaN or a wrong plan, while allowing isolated fp16 outliers).
"""

from __future__ import annotations

import enum
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import needs_torch
from edgediff.engines import cuda_util
from edgediff.engines import tensorrt as trt_engine
from edgediff.engines import trt_plans as plans
from edgediff.runtime.engine import create_engine
from edgediff.runtime.errors import BuildError, EngineUnavailableError, InvalidArgumentError, PlanError
from edgediff.runtime.pipeline import EMBEDDED_MODEL
from edgediff.runtime.specs import SUBMODELS, TensorSpec

SD15 = plans.ModelFacts(native_size=(512, 512), vae_downscale=8, latent_channels=4, text_length=77, text_dim=768)
ENV = plans.Environment("10.8.0.43", "NVIDIA GeForce RTX 4090", "8.9")


def contract(component: str) -> list[TensorSpec]:
    return list(SUBMODELS[component].inputs)


def profile_for(component: str, facts=SD15, **options) -> plans.Profile:
    ranges = plans.symbol_ranges(component, facts, plans.ProfileOptions(**options))
    return plans.derive_profile(component, contract(component), ranges)


# ------------------------------------------------------------------------------ fp16 version switch


@pytest.mark.parametrize(
    ("version", "precision", "keep", "expected"),
    [
        ("10.3.0.30", "fp32", False, ("fp16", False, True)),  # Jetson JetPack 6: FP16 flag on fp32 ONNX
        ("10.3.0.30", "fp16", False, ("fp16", False, True)),  # < 10.12: weak typing even for fp16 ONNX
        ("10.12.0.36", "fp16", False, ("fp16", True, False)),  # strong typing from 10.12
        ("10.13.0", "fp32", False, ("fp16", False, True)),  # fp32 ONNX on 10.x: flag still works
        ("11.0.0.1", "fp16", False, ("fp16", True, False)),
        ("11.2.1", "fp32", True, ("fp32", True, False)),  # VAE kept fp32 by the exporter
        ("10.3.0", "fp32", True, ("fp32", False, False)),  # ... stays fp32 under the FP16 flag era too
    ],
)
def test_build_mode_by_version(version, precision, keep, expected):
    mode = plans.choose_build_mode(version, precision, keep_fp32=keep)
    assert (mode.precision, mode.strongly_typed, mode.fp16_flag) == expected


@pytest.mark.parametrize("precision", ["fp32", "unknown"])
def test_trt11_refuses_fp32_onnx_and_says_export_fp16(precision):
    with pytest.raises(BuildError, match=r"edgediff export SOURCE OUT --fp16"):
        plans.choose_build_mode("11.0.0", precision)


def test_parse_version():
    assert plans.parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert plans.parse_version("11.0.0b1") == (11, 0, 0)
    with pytest.raises(ValueError):
        plans.parse_version("dev")


# ------------------------------------------------------------------------------ profiles


def test_static_profiles_from_the_contract():
    unet = profile_for("unet")
    assert unet["sample"] == ((2, 4, 64, 64),) * 3  # batch doubled for guidance, latent = 512 / 8
    assert unet["timestep"] == ((), (), ())
    assert unet["encoder_hidden_states"] == ((2, 77, 768),) * 3
    assert profile_for("text_encoder")["input_ids"] == ((2, 77),) * 3  # uncond ‖ cond in one batch
    assert profile_for("vae_decoder")["latent_sample"] == ((1, 4, 64, 64),) * 3  # no guidance batch
    assert profile_for("vae_encoder")["sample"] == ((1, 3, 512, 512),) * 3
    assert all(plans.is_static(profile_for(c)) for c in SUBMODELS)


def test_static_profile_options():
    p = profile_for("unet", batch=2, width=768, height=512, guidance=False)
    assert p["sample"] == ((2, 4, 64, 96),) * 3
    assert profile_for("vae_decoder", batch=3)["latent_sample"][0] == (3, 4, 64, 64)


def test_dynamic_profile_ranges():
    p = profile_for("unet", dynamic=True)
    lo, opt, hi = p["sample"]
    assert lo == (1, 4, 32, 32) and opt == (2, 4, 64, 64) and hi == (8, 4, 128, 128)  # 256..1024 px, 1..4 x2
    assert p["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 77, 768))
    lo, opt, hi = profile_for("vae_decoder", dynamic=True, min_size=384, max_size=768, max_batch=2)["latent_sample"]
    assert (lo, opt, hi) == ((1, 4, 48, 48), (1, 4, 64, 64), (2, 4, 96, 96))
    assert not plans.is_static(p)


def test_dynamic_defaults_contain_a_small_native_size():
    tiny = plans.ModelFacts((32, 32), 2, 4, 77, 32)
    lo, opt, hi = profile_for("unet", tiny, dynamic=True)["sample"]
    assert lo[2:] == (16, 16) and opt[2:] == (16, 16) and hi[2:] == (512, 512)


def test_optimum_axis_names_and_fixed_dims():
    # optimum names its axes differently and may fix some; fixed dims win, others map by axis
    inputs = [
        TensorSpec("sample", np.dtype(np.float32), ("batch_size", "num_channels", "height", "width")),
        TensorSpec("timestep", np.dtype(np.int64), (-1,)),
        TensorSpec("encoder_hidden_states", np.dtype(np.float32), (-1, 77, 768)),
    ]
    ranges = plans.symbol_ranges("unet", SD15, plans.ProfileOptions())
    p = plans.derive_profile("unet", inputs, ranges)
    assert p["sample"][0] == (2, 4, 64, 64)
    assert p["timestep"][0] == (2,)  # [B] timestep
    assert p["encoder_hidden_states"][2] == (2, 77, 768)


def test_unknown_dynamic_input_is_named():
    inputs = [TensorSpec("timestep_cond", np.dtype(np.float32), ("B", "cond_dim"))]
    ranges = plans.symbol_ranges("unet", SD15, plans.ProfileOptions())
    with pytest.raises(BuildError, match=r"'timestep_cond' axis 1"):
        plans.derive_profile("unet", inputs, ranges)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"width": 500}, "multiple of 8"),
        ({"batch": 0}, ">= 1"),
        ({"dynamic": True, "min_size": 768}, "must contain"),
        ({"dynamic": True, "batch": 4, "max_batch": 2}, "below --batch"),
    ],
)
def test_bad_profile_options(options, match):
    with pytest.raises(BuildError, match=match):
        plans.symbol_ranges("unet", SD15, plans.ProfileOptions(**options))


def test_profile_misfit_messages():
    p = profile_for("unet")
    ok = {"sample": (2, 4, 64, 64), "timestep": (), "encoder_hidden_states": (2, 77, 768)}
    assert plans.profile_misfit(p, ok) is None
    assert "exactly [2, 4, 64, 64]" in plans.profile_misfit(p, {**ok, "sample": (1, 4, 64, 64)})
    d = profile_for("unet", dynamic=True)
    assert plans.profile_misfit(d, {**ok, "sample": (1, 4, 40, 96)}) is None
    assert "[1, 4, 32, 32]..[8, 4, 128, 128]" in plans.profile_misfit(d, {**ok, "sample": (1, 4, 16, 16)})
    assert plans.profile_misfit(p, {"sample": (2, 4, 64, 64)}) == "'timestep' not given"


# ------------------------------------------------------------------------------ keys and build.json


def test_plan_key_covers_every_fact():
    profile = profile_for("unet")
    base = plans.plan_key("abc", "unet", "fp16", ENV, profile)
    assert base.startswith("unet-") and len(base) == len("unet-") + 16
    assert base == plans.plan_key("abc", "unet", "fp16", ENV, profile_for("unet"))  # deterministic
    variants = [
        plans.plan_key("abd", "unet", "fp16", ENV, profile),
        plans.plan_key("abc", "unet", "fp32", ENV, profile),
        plans.plan_key("abc", "unet", "fp16", plans.Environment("10.8.0.44", ENV.gpu_name, "8.9"), profile),
        plans.plan_key("abc", "unet", "fp16", plans.Environment(ENV.trt_version, "NVIDIA L4", "8.9"), profile),
        plans.plan_key("abc", "unet", "fp16", plans.Environment(ENV.trt_version, ENV.gpu_name, "8.6"), profile),
        plans.plan_key("abc", "unet", "fp16", ENV, profile_for("unet", width=768)),
        plans.plan_key("abc", "unet", "fp16", ENV, profile_for("unet", dynamic=True)),
    ]
    assert len({base, *variants}) == len(variants) + 1


def make_record(model_dir: Path, env=ENV, component="unet", sha="sha-1", write=True, **profile_options):
    profile = profile_for(component, **profile_options)
    key = plans.plan_key(sha, component, "fp16", env, profile)
    spec = SUBMODELS[component]
    record = plans.BuildRecord(
        key=key, component=component, precision="fp16", model_sha256=sha, trt_version=env.trt_version,
        gpu_name=env.gpu_name, compute_capability=env.compute_capability, profile=profile,
        inputs=list(spec.inputs), outputs=list(spec.outputs), plan_file=f"{component}.plan", plan_bytes=4,
        build={"opt_level": 3}, device_memory_bytes=1 << 20,
    )  # fmt: skip
    if write:
        folder = model_dir / plans.ENGINES_DIR / key
        folder.mkdir(parents=True)
        (folder / record.plan_file).write_bytes(b"plan")
        plans.write_build_json(folder, record)
        record.path = folder
    return record


def test_build_json_round_trip(tmp_path):
    record = make_record(tmp_path, dynamic=True)
    back = plans.read_build_json(record.path)
    assert back == record
    assert back.inputs[0].dtype == np.float32 and back.profile == record.profile
    data = json.loads((record.path / "build.json").read_text())
    for key in ("model_sha256", "component", "precision", "trt_version", "gpu_name", "compute_capability", "profile"):
        assert key in data
    assert data["profile"]["sample"]["max"] == [8, 4, 128, 128]
    assert not [p for p in record.path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing


def test_discover_reports_damage(tmp_path):
    good = make_record(tmp_path)
    truncated = make_record(tmp_path, width=768)
    (truncated.path / truncated.plan_file).write_bytes(b"pl")
    damaged = tmp_path / plans.ENGINES_DIR / "unet-0000000000000000"
    damaged.mkdir()
    (damaged / "build.json").write_text("{not json")
    future = make_record(tmp_path, width=256)
    data = json.loads((future.path / "build.json").read_text())
    (future.path / "build.json").write_text(json.dumps({**data, "format": 99}))
    (tmp_path / plans.ENGINES_DIR / ".unet-1.partial-123").mkdir()  # an interrupted build is ignored
    records, problems = plans.discover_plans(tmp_path, "unet")
    assert [r.key for r in records] == [good.key]
    text = " ".join(problems)
    assert "truncated" in text and "is damaged" in text and "format 99" in text
    assert plans.discover_plans(tmp_path, "vae_decoder") == ([], [])
    assert plans.discover_plans(tmp_path / "nowhere") == ([], [])


def test_model_fingerprint_reuses_known_hashes(tmp_path):
    comp = tmp_path / "unet"
    comp.mkdir()
    (comp / "model.onnx").write_bytes(b"graph")
    (comp / "model.onnx_data").write_bytes(b"weights")
    (comp / "config.json").write_text("{}")  # not part of the plan's inputs
    sha, files = plans.model_fingerprint(tmp_path, comp)
    assert sorted(files) == ["unet/model.onnx", "unet/model.onnx_data"]
    assert files["unet/model.onnx"]["sha256"] == plans.sha256_file(comp / "model.onnx")
    # a recorded hash with the same size (and mtime) is trusted: no re-hashing of gigabytes per load
    known = {"unet/model.onnx": {"size": 5, "sha256": "recorded"}}
    sha_known, files_known = plans.model_fingerprint(tmp_path, comp, [known])
    assert files_known["unet/model.onnx"]["sha256"] == "recorded" and sha_known != sha
    stale_mtime = {"unet/model.onnx": {"size": 5, "sha256": "recorded", "mtime_ns": 1}}
    assert plans.model_fingerprint(tmp_path, comp, [stale_mtime])[0] == sha
    (comp / "model.onnx_data").write_bytes(b"other weights")
    assert plans.model_fingerprint(tmp_path, comp, [files])[0] != sha


def test_timing_cache_is_per_version_and_gpu(tmp_path):
    a = plans.timing_cache_path(tmp_path, ENV)
    assert a.parent == tmp_path / "engines" and a.name == "timing-trt10.8.0.43-sm89.cache"
    assert plans.timing_cache_path(tmp_path, plans.Environment("10.3.0", "Orin", "8.7")) != a


# ------------------------------------------------------------------------------ selection and refusal


def unet_shapes(batch=2, h=64, w=64):
    return {"sample": (batch, 4, h, w), "timestep": (), "encoder_hidden_states": (batch, 77, 768)}


def test_no_plan_says_build_and_onnxruntime(tmp_path):
    with pytest.raises(PlanError, match=r"edgediff build .*onnxruntime"):
        plans.usable_plans([], "unet", ENV, "sha-1", tmp_path)


@pytest.mark.parametrize(
    ("env", "sha", "needle"),
    [
        (
            plans.Environment("10.3.0.30", ENV.gpu_name, "8.9"),
            "sha-1",
            r"built with TensorRT 10\.8\.0\.43, this is TensorRT 10\.3",
        ),
        (plans.Environment(ENV.trt_version, "Orin", "8.7"), "sha-1", r"this GPU is Orin \(8\.7\)"),
        (plans.Environment(ENV.trt_version, "NVIDIA GeForce RTX 4080", "8.9"), "sha-1", "RTX 4080"),
        (ENV, "sha-2", "model file changed"),
    ],
)
def test_stale_plans_are_refused_with_the_rebuild_command(tmp_path, env, sha, needle):
    record = make_record(tmp_path)
    with pytest.raises(PlanError, match=needle) as err:
        plans.usable_plans([record], "unet", env, sha, tmp_path)
    assert f"edgediff build {tmp_path}" in str(err.value)


def test_select_prefers_exact_static_then_smallest_range(tmp_path):
    static = make_record(tmp_path)
    wide = make_record(tmp_path, dynamic=True)
    narrow = make_record(tmp_path, dynamic=True, min_size=256, max_size=768)
    usable = plans.usable_plans([wide, static, narrow], "unet", ENV, "sha-1", tmp_path)
    assert plans.select_plan(usable, unet_shapes(), "unet", tmp_path).key == static.key
    assert plans.select_plan(usable, unet_shapes(2, 40, 96), "unet", tmp_path).key == narrow.key
    assert plans.select_plan(usable, unet_shapes(1, 128, 128), "unet", tmp_path).key == wide.key


def test_select_none_fits_lists_profiles_and_how_to_build(tmp_path):
    static = make_record(tmp_path)
    with pytest.raises(PlanError, match=r"no TensorRT plan fits.*sample \[1, 4, 64, 64\].*--no-guidance"):
        plans.select_plan([static], unet_shapes(batch=1), "unet", tmp_path)
    other = make_record(tmp_path, env=plans.Environment("10.3.0", "Orin", "8.7"), batch=2)
    with pytest.raises(PlanError, match="another TensorRT version or GPU would fit"):
        plans.select_plan([static], unet_shapes(batch=4), "unet", tmp_path, stale=[other])


def test_merge_specs_and_symbolize():
    a = [TensorSpec("sample", np.dtype(np.float32), (2, 4, 64, 64))]
    b = [TensorSpec("sample", np.dtype(np.float32), (2, 4, "h", "w"))]
    assert plans.merge_specs([a, b])["sample"].shape == (2, 4, "h", "w")
    c = [TensorSpec("sample", np.dtype(np.float32), (1, 4, 64, 64))]
    assert plans.merge_specs([a, c])["sample"].shape == ("?", 4, 64, 64)
    with pytest.raises(PlanError, match="rank"):
        plans.merge_specs([a, [TensorSpec("sample", np.dtype(np.float32), (2, 4))]])
    spec = plans.symbolize("unet", "out_sample", np.float16, (-1, 4, -1, -1), "outputs")
    assert spec.shape == ("B", 4, "h", "w") and spec.dtype == np.float16
    assert plans.symbolize("unet", "extra", np.float32, (-1,), "outputs").shape == ("?",)


# ------------------------------------------------------------------------------ without TensorRT / GPU


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A stand-in module so the code goes past `import tensorrt`; nothing of it is exercised but
    __version__ (the tests check our checks, not TensorRT)."""
    module = SimpleNamespace(__version__="10.8.0.43")
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: module)
    return module


def embedded_unet() -> Path:
    return EMBEDDED_MODEL / "unet" / "model.onnx"


def test_create_engine_without_tensorrt_suggests_onnxruntime(no_tensorrt):
    with pytest.raises(EngineUnavailableError, match=r'TensorRT is not usable.*engine="onnxruntime"'):
        create_engine("tensorrt", embedded_unet(), component="unet")


def test_pipeline_without_tensorrt_suggests_onnxruntime(no_tensorrt):
    from edgediff.runtime import Pipeline

    with pytest.raises(EngineUnavailableError, match="onnxruntime"):
        Pipeline.load(engine="tensorrt")


def test_without_cuda_python_suggests_onnxruntime(fake_tensorrt, monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(EngineUnavailableError, match=r"cuda-python is not installed.*onnxruntime"):
        create_engine("tensorrt", embedded_unet(), component="unet")


class FakeCudart:
    """The few cuda-python runtime calls the GPU probe makes, answering like a machine with
    ``count`` GPUs (cuda-python returns (error, value) tuples)."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    def __init__(self, count=1, name=b"NVIDIA GeForce RTX 4090\0\0", cc=(8, 9)):
        self.count, self.name, self.cc = count, name, cc

    def cudaGetDeviceCount(self):
        if not self.count:
            return (self.cudaError_t.cudaErrorNoDevice, 0)
        return (self.cudaError_t.cudaSuccess, self.count)

    def cudaGetErrorString(self, err):
        return (self.cudaError_t.cudaSuccess, b"no CUDA-capable device is detected")

    def cudaGetDeviceProperties(self, device):
        return (self.cudaError_t.cudaSuccess, SimpleNamespace(name=self.name, major=self.cc[0], minor=self.cc[1]))


def test_no_gpu_suggests_onnxruntime(fake_tensorrt, monkeypatch):
    monkeypatch.setattr(trt_engine, "import_cudart", lambda: FakeCudart(count=0))
    with pytest.raises(EngineUnavailableError, match=r"no CUDA GPU is visible \(no CUDA-capable.*onnxruntime"):
        create_engine("tensorrt", embedded_unet(), component="unet")


def test_probe_gpu_reads_name_and_capability():
    assert cuda_util.probe_gpu(FakeCudart()) == ("NVIDIA GeForce RTX 4090", "8.9")
    with pytest.raises(EngineUnavailableError, match="device 3 does not exist"):
        cuda_util.probe_gpu(FakeCudart(count=2), device=3)


@pytest.fixture
def gpu_model(tmp_path, fake_tensorrt, monkeypatch):
    """A model folder with a unet file, on a (faked) RTX 4090 with TensorRT 10.8.0.43."""
    monkeypatch.setattr(trt_engine, "import_cudart", lambda: FakeCudart())
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.onnx").write_bytes(b"graph")
    sha, _ = plans.model_fingerprint(tmp_path, tmp_path / "unet")
    return tmp_path, sha


def test_engine_without_plans_says_run_build(gpu_model):
    model, _ = gpu_model
    with pytest.raises(PlanError, match=rf"unet: no TensorRT plan under .*edgediff build {model}`"):
        create_engine("tensorrt", model / "unet" / "model.onnx", component="unet")


def test_engine_refuses_plan_of_another_tensorrt_or_gpu(gpu_model):
    model, sha = gpu_model
    make_record(model, env=plans.Environment("10.3.0.30", "Orin", "8.7"), sha=sha)
    with pytest.raises(PlanError, match=r"refusing.*TensorRT 10\.3\.0\.30.*Orin.*edgediff build") as err:
        create_engine("tensorrt", model / "unet" / "model.onnx", component="unet")
    assert "--prune" in str(err.value)


def test_engine_refuses_plan_of_a_changed_model(gpu_model):
    model, sha = gpu_model
    make_record(model, sha=sha)
    (model / "unet" / "model.onnx").write_bytes(b"re-exported graph")
    with pytest.raises(PlanError, match="model file changed"):
        create_engine("tensorrt", model / "unet" / "model.onnx", component="unet")


def test_providers_belong_to_onnxruntime():
    with pytest.raises(InvalidArgumentError, match='engine="onnxruntime"'):
        create_engine("tensorrt", embedded_unet(), component="unet", providers=["CUDAExecutionProvider"])


def _cli_text(result) -> str:
    return result.output + (getattr(result, "stderr", "") or "")


def test_cli_build_without_tensorrt(no_tensorrt):
    from edgediff.runtime.cli import main

    result = CliRunner().invoke(main, ["build", str(EMBEDDED_MODEL)])
    assert result.exit_code == 1, _cli_text(result)
    text = _cli_text(result)
    assert "error: TensorRT is not usable" in text and "onnxruntime" in text and "Traceback" not in text


def test_cli_build_unknown_component():
    from edgediff.runtime.cli import main

    result = CliRunner().invoke(main, ["build", str(EMBEDDED_MODEL), "--component", "refiner"])
    assert result.exit_code == 1
    assert "['refiner'] are not in" in _cli_text(result) and "unet" in _cli_text(result)


def test_cli_build_in_a_subprocess_without_tensorrt(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["tensorrt"] = None
        from edgediff.runtime.cli import main
        main(["build", {str(EMBEDDED_MODEL)!r}, "--opt-level", "2"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "onnxruntime" in proc.stderr, proc.stderr


def test_tensorrt_modules_import_without_torch():
    mods = "edgediff.engines.tensorrt, edgediff.engines.tensorrt_build, edgediff.engines.trt_plans"
    code = f"import sys, {mods}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','diffusers','transformers')))"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ real builds and runs (GPU)


def _require_tensorrt_gpu():
    from edgediff.engines.tensorrt_build import import_tensorrt

    try:
        trt = import_tensorrt()
        cudart = cuda_util.import_cudart()
        cuda_util.probe_gpu(cudart)
    except EngineUnavailableError as e:
        pytest.skip(f"needs TensorRT, cuda-python and an NVIDIA GPU: {e}")
    return trt


@pytest.fixture(scope="module")
def built_model(tiny_export, tmp_path_factory):
    """The tiny sd1 model exported fp16 (works on every TensorRT: FP16 flag before 10.12, strongly
    typed after), copied so its plans stay private to this module, with static plans for batch 1
    (guidance and no guidance) and a dynamic UNet plan."""
    _require_tensorrt_gpu()
    from edgediff.engines.tensorrt_build import build_model

    folder = tmp_path_factory.mktemp("trt") / "model"
    shutil.copytree(tiny_export("sd1", fp16=True), folder)
    built = build_model(folder, opt_level=2)
    assert [r.status for r in built] == ["built"] * 3
    assert [r.status for r in build_model(folder, opt_level=2)] == ["up to date"] * 3
    build_model(folder, components=["unet", "text_encoder"], options=plans.ProfileOptions(guidance=False))
    dynamic = plans.ProfileOptions(dynamic=True, min_size=16, max_size=64, max_batch=2)
    build_model(folder, components=["unet", "text_encoder", "vae_decoder"], options=dynamic, opt_level=2)
    return folder


def symbol_values(folder: Path) -> dict[str, int]:
    m = json.loads((folder / "edgediff.json").read_text())
    h, w = (s // m["vae_downscale"] for s in m["native_size"])
    return {"B": 2, "S": m["tokenizer"]["max_length"], "D": m["text_embedding_dim"], "C": 4, "h": h, "w": w}


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_torch
@pytest.mark.parametrize("component", ["unet", "vae_decoder", "text_encoder"])
def test_component_matches_onnxruntime_fp32(built_model, tiny_export, component):
    from edgediff.engines.onnxruntime import OrtEngine

    ref = OrtEngine(Path(tiny_export("sd1")) / component / "model.onnx", component=component)
    values = symbol_values(built_model)
    rng = np.random.default_rng(0)
    feeds = {}
    for name, spec in ref.inputs.items():
        shape = tuple(values[d] if isinstance(d, str) else d for d in spec.shape)
        if np.issubdtype(spec.dtype, np.integer):
            feeds[name] = rng.integers(0, 100, shape).astype(spec.dtype)  # the tiny vocabulary has > 100 ids
        elif name == "timestep":
            feeds[name] = np.full(shape, 500.25, spec.dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(spec.dtype)
    with create_engine("tensorrt", built_model / component / "model.onnx", component=component) as eng:
        got = eng.run(feeds)
        stats = eng.stats()
    want = ref.run(feeds)
    for name, value in want.items():
        diff = float(np.max(np.abs(got[name].astype(np.float32) - value)))
        bound = 1e-2 + 2e-2 * float(np.max(np.abs(value)))
        assert diff <= bound, f"{component}.{name}: max|diff| {diff:.3g} > {bound:.3g}"
    assert len(stats["gpu_ms"]) == 1 and stats["gpu_ms"][0] > 0
    assert stats["device_memory_bytes"] >= stats["io_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_torch
def test_generate_matches_onnxruntime_cpu(built_model, tiny_export):
    from edgediff.runtime import Pipeline

    kwargs = {
        "prompt": "a red circle",
        "num_inference_steps": 4,
        "seed": 3,
        "scheduler": "euler",
        "guidance_scale": 7.5,
    }
    with Pipeline.load(tiny_export("sd1")) as ref:
        want = np.asarray(ref(**kwargs).images[0], dtype=np.int16)
    with Pipeline.load(built_model, engine="tensorrt") as pipe:
        got = np.asarray(pipe(**kwargs).images[0], dtype=np.int16)
        # other shapes go to the plans that fit: no guidance, and a size only the dynamic plans take
        assert pipe(**{**kwargs, "guidance_scale": 1.0}).images[0].size == (32, 32)
        assert pipe(**{**kwargs, "width": 48, "height": 24}).images[0].size == (48, 24)
    diff = np.abs(got - want)
    assert diff.mean() <= 2.0 and diff.max() <= 32, (diff.mean(), diff.max())


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_torch
def test_cuda_graph_run_equals_plain_run(built_model):
    path = built_model / "unet" / "model.onnx"
    v = symbol_values(built_model)
    rng = np.random.default_rng(1)
    feeds = {
        "sample": rng.standard_normal((2, 4, v["h"], v["w"])).astype(np.float32),
        "timestep": np.float32(321.5),
        "encoder_hidden_states": rng.standard_normal((2, v["S"], v["D"])).astype(np.float32),
    }
    with create_engine("tensorrt", path, component="unet") as plain:
        want = plain.run(feeds)["out_sample"]
    with create_engine("tensorrt", path, component="unet", cuda_graph=True) as graphed:
        runs = [graphed.run(feeds)["out_sample"] for _ in range(3)]  # plain + capture, then two replays
        other = graphed.run({**feeds, "sample": feeds["sample"] + 1})["out_sample"]
        assert graphed.stats()["cuda_graphs"] == 1
    for got in runs:
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(other, want)  # the replay reads the new input, not a stale one


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_torch
def test_close_frees_and_refuses_further_runs(built_model):
    eng = create_engine("tensorrt", built_model / "vae_decoder" / "model.onnx", component="vae_decoder")
    eng.run({"latent_sample": np.zeros((1, 4, 16, 16), np.float32)})
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(EngineUnavailableError, match="closed"):
        eng.run({"latent_sample": np.zeros((1, 4, 16, 16), np.float32)})
