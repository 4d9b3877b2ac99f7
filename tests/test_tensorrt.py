"""TensorRT: plan keys, profiles, build.json, refusal of stale or foreign plans, the fp16 version
switch and the errors without TensorRT or a GPU run everywhere (pure functions, no tensorrt import).
Real builds and runs are marked ``gpu`` and ``tensorrt`` and skip with the first missing piece
named (TensorRT, cuda-python, a GPU, then the export extra for the tiny model).

How a TensorRT plan is judged (GPU tests), with each tolerance's negative control run here on CPU
by ONNX Runtime, so a tolerance that cannot fail is caught in CI:

- Component check (``compare_cases``): every component against ONNX Runtime's fp32 CPU output over
  several prompts x timesteps (UNet), prompts (text encoder) or latents (VAE decoder). Each output
  must be (1) within the exporter's fp16 bound, max|diff| <= 1e-2 + 2e-2 * max|ref|, and (2) closer
  to the reference than SEPARATION x the change any one factor makes there. A model that ignores a
  factor answers with another case's output, at least 1x that change away, so (2) fails it on any
  model however weakly that factor acts (the tiny random UNet barely reacts to its timestep).
  Negative controls: a UNet that keeps its first timestep or its first prompt fails (2); one 5%
  off fails (1). Positive control: the fp16 export under ONNX Runtime passes both.
- Image check (``image_mismatch``): a 4-step generation against the fp32 ONNX Runtime image, mean
  |diff| <= 1/255 and max <= 16/255 per channel (the fp16 export under ONNX Runtime: 0.04 and 1).
  Negative control: a UNet that sees only the unconditional prompt (guidance lost) fails it. It
  cannot see a wrong timestep on the tiny model (0.54/255): that is the component check's job.
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

from cli_check import assert_one_line_error, run_cli
from conftest import HAS_TORCH, needs_torch
from edgediff.engines import cuda_util
from edgediff.engines import tensorrt as trt_engine
from edgediff.engines import trt_plans as plans
from edgediff.runtime.engine import create_engine
from edgediff.runtime.errors import BuildError, EngineUnavailableError, InvalidArgumentError, PlanError
from edgediff.runtime.model_folder import ModelFolder
from edgediff.runtime.pipeline import EMBEDDED_MODEL
from edgediff.runtime.specs import SUBMODELS, TensorSpec
from edgediff.runtime.tokenizer import ClipTokenizer

SD15 = plans.ModelFacts(native_size=(512, 512), vae_downscale=8, latent_channels=4, text_length=77, text_dim=768)
ENV = plans.Environment("10.8.0.43", "NVIDIA GeForce RTX 4090", "8.9")
MICRO = Path(__file__).parent / "fixtures" / "micro-sd1"


def contract(component: str) -> list[TensorSpec]:
    return list(SUBMODELS[component].for_model().inputs)  # SD 1.5's: no SDXL or LCM inputs


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


def test_dynamic_defaults_contain_a_small_native_size():
    tiny = plans.ModelFacts((32, 32), 2, 4, 77, 32)
    lo, opt, hi = profile_for("unet", tiny, dynamic=True)["sample"]
    assert lo[2:] == (16, 16) and opt[2:] == (16, 16) and hi[2:] == (512, 512)


def test_build_profiles_static_first_then_the_range():
    options = plans.ProfileOptions(dynamic=True, max_batch=2)
    static, dynamic = plans.build_profiles("unet", contract("unet"), SD15, options)
    assert static == profile_for("unet") and dynamic == profile_for("unet", dynamic=True, max_batch=2)
    assert plans.build_profiles("unet", contract("unet"), SD15, plans.ProfileOptions()) == [profile_for("unet")]
    fixed = [TensorSpec("latent_sample", np.dtype(np.float32), (1, 4, 64, 64))]  # an export without dynamic axes
    assert len(plans.build_profiles("vae_decoder", fixed, SD15, options)) == 1  # the range adds nothing
    with pytest.raises(BuildError, match="below --batch"):  # range options are checked with --dynamic
        plans.build_profiles("unet", contract("unet"), SD15, plans.ProfileOptions(dynamic=True, batch=4, max_batch=2))


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


def unet_shapes(batch=2, h=64, w=64):
    return {"sample": (batch, 4, h, w), "timestep": (), "encoder_hidden_states": (batch, 77, 768)}


def test_pick_profile_takes_the_first_that_fits(tmp_path):
    record = make_record(tmp_path, dynamic=True, max_batch=2)
    assert plans.pick_profile(record, unet_shapes(), tmp_path) == 0  # the exact static shape
    assert plans.pick_profile(record, unet_shapes(1, 40, 96), tmp_path) == 1
    with pytest.raises(PlanError, match=r"profile 0 \(sample \[2, 4, 64, 64\].*profile 1 .*\[4, 4, 128, 128\]"
                                        r".*edgediff build .*--no-guidance.*--dynamic"):  # fmt: skip
        plans.pick_profile(record, unet_shapes(8), tmp_path)


# ------------------------------------------------------------------------------ keys and build.json


def test_plan_key_covers_every_fact():
    profiles = [profile_for("unet")]
    base = plans.plan_key("abc", "unet", "fp16", ENV, profiles)
    assert base.startswith("unet-") and len(base) == len("unet-") + 16
    assert base == plans.plan_key("abc", "unet", "fp16", ENV, [profile_for("unet")])  # deterministic
    variants = [
        plans.plan_key("abd", "unet", "fp16", ENV, profiles),
        plans.plan_key("abc", "unet", "fp32", ENV, profiles),
        plans.plan_key("abc", "unet", "fp16", plans.Environment("10.8.0.44", ENV.gpu_name, "8.9"), profiles),
        plans.plan_key("abc", "unet", "fp16", plans.Environment(ENV.trt_version, "NVIDIA L4", "8.9"), profiles),
        plans.plan_key("abc", "unet", "fp16", plans.Environment(ENV.trt_version, ENV.gpu_name, "8.6"), profiles),
        plans.plan_key("abc", "unet", "fp16", ENV, [profile_for("unet", width=768)]),
        plans.plan_key("abc", "unet", "fp16", ENV, [*profiles, profile_for("unet", dynamic=True)]),
    ]
    assert len({base, *variants}) == len(variants) + 1


def make_record(model_dir: Path, env=ENV, component="unet", sha="sha-1", write=True, **profile_options):
    options = plans.ProfileOptions(**profile_options)
    profiles = plans.build_profiles(component, contract(component), SD15, options)
    key = plans.plan_key(sha, component, "fp16", env, profiles)
    spec = SUBMODELS[component].for_model()
    record = plans.BuildRecord(
        key=key, component=component, precision="fp16", model_sha256=sha, trt_version=env.trt_version,
        gpu_name=env.gpu_name, compute_capability=env.compute_capability, profiles=profiles,
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
    assert back.inputs[0].dtype == np.float32 and back.profiles == record.profiles and len(back.profiles) == 2
    data = json.loads((record.path / "build.json").read_text())
    for key in ("model_sha256", "component", "precision", "trt_version", "gpu_name", "compute_capability", "profiles"):
        assert key in data
    assert data["profiles"][1]["sample"]["max"] == [8, 4, 128, 128]
    assert not [p for p in record.path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing


def test_discover_reports_damage(tmp_path):
    good = make_record(tmp_path)
    truncated = make_record(tmp_path, width=768)
    (truncated.path / truncated.plan_file).write_bytes(b"pl")
    damaged = tmp_path / plans.ENGINES_DIR / "unet-0000000000000000"
    damaged.mkdir()
    (damaged / "build.json").write_text("{not json")
    for fmt, width in ((99, 256), (1, 384)):  # a newer edgediff's, and format 1 (several plans, one profile each)
        other = make_record(tmp_path, width=width)
        data = json.loads((other.path / "build.json").read_text())
        (other.path / "build.json").write_text(json.dumps({**data, "format": fmt}))
    (tmp_path / plans.ENGINES_DIR / ".unet-1.partial-123").mkdir()  # an interrupted build is ignored
    records, problems = plans.discover_plans(tmp_path, "unet")
    assert [r.key for r in records] == [good.key]
    text = " ".join(problems)
    assert "truncated" in text and "is damaged" in text and "format 99" in text and "format 1 " in text
    assert f"then run `edgediff build {tmp_path}`" in text
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


# ------------------------------------------------------------------------------ refusal, one plan per setup


def test_no_plan_says_build_and_onnxruntime(tmp_path):
    with pytest.raises(PlanError, match=r"edgediff build .*onnxruntime"):
        plans.usable_plan([], "unet", ENV, "sha-1", tmp_path)


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
        plans.usable_plan([record], "unet", env, sha, tmp_path)
    assert f"edgediff build {tmp_path}`" in str(err.value) and "--prune" in str(err.value)


def test_one_usable_plan_among_other_setups(tmp_path):
    mine = make_record(tmp_path)
    orin = make_record(tmp_path, env=plans.Environment("10.3.0.30", "Orin", "8.7"))
    assert plans.usable_plan([orin, mine], "unet", ENV, "sha-1", tmp_path) is mine
    twin = make_record(tmp_path, width=768)  # only a hand-edited folder has two for one setup
    with pytest.raises(PlanError, match=r"several TensorRT plans for this setup .*delete all but one"):
        plans.usable_plan([mine, twin, orin], "unet", ENV, "sha-1", tmp_path)
    assert plans.superseded([mine, twin, orin], twin.key, ENV) == [mine]
    assert plans.superseded([mine, twin, orin], twin.key, ENV, prune=True) == [mine, orin]


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


def test_cli_build_without_tensorrt(no_tensorrt):
    code, output = run_cli("build", EMBEDDED_MODEL)
    assert_one_line_error(code, output, "error: TensorRT is not usable", "onnxruntime")


def test_cli_build_unknown_component():
    code, output = run_cli("build", EMBEDDED_MODEL, "--component", "refiner")
    assert_one_line_error(code, output, "['refiner'] are not in", "unet")


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
    banned = "('torch', 'diffusers', 'transformers')"
    code = f"import sys, {mods}; print(sorted(m for m in sys.modules if m.split('.')[0] in {banned}))"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ how a plan is judged

PROMPTS = ("a red circle", "a blue square on a green background", "three small yellow triangles")
TIMESTEPS = (999.0, 500.0, 20.0)
SEPARATION = 0.25  # the fp16 export under ONNX Runtime: at most 0.04 on the tiny UNet; an ignored factor: >= 1


def _rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a, dtype=np.float64)))))


def component_cases(folder: Path, component: str) -> tuple[dict[tuple, dict], tuple[str, ...]]:
    """Feeds for ``component`` keyed by one value per factor, and the factors' names. Batches are
    the static plans' (guidance: uncond ‖ cond); the UNet's embeddings come from ``folder``'s own
    text encoder under ONNX Runtime."""
    from edgediff.engines.onnxruntime import OrtEngine

    mf = ModelFolder.open(folder)
    h, w = (s // mf.vae_downscale for s in mf.native_size)
    ids = {p: ClipTokenizer(mf.path / "tokenizer").encode(["", p]) for p in PROMPTS}
    if component == "text_encoder":
        return {(p,): {"input_ids": ids[p]} for p in PROMPTS}, ("prompt",)
    if component == "vae_decoder":
        rngs = {s: np.random.default_rng(s) for s in (1, 2, 3)}
        cases = {(s,): {"latent_sample": r.standard_normal((1, mf.latent_channels, h, w)).astype(np.float32)}
                 for s, r in rngs.items()}  # fmt: skip
        return cases, ("latent",)
    with OrtEngine(mf.component_path("text_encoder"), component="text_encoder") as te:
        emb = {p: te.run({"input_ids": i})["last_hidden_state"].astype(np.float32) for p, i in ids.items()}
    sample = np.random.default_rng(0).standard_normal((2, mf.latent_channels, h, w)).astype(np.float32)
    cases = {(p, t): {"sample": sample, "timestep": np.float32(t), "encoder_hidden_states": emb[p]}
             for p in PROMPTS for t in TIMESTEPS}  # fmt: skip
    return cases, ("prompt", "timestep")


def compare_cases(run, reference, cases: dict[tuple, dict], factors: tuple[str, ...]) -> list[str]:
    """Every way ``run`` fails to match ``reference`` over ``cases`` (see the module docstring)."""
    want = {k: reference(f) for k, f in cases.items()}
    got = {k: run(f) for k, f in cases.items()}
    failures = []
    for k in cases:
        label = ", ".join(f"{f} {v!r}" for f, v in zip(factors, k))
        for name, ref in want[k].items():
            value = np.asarray(got[k][name], dtype=np.float32)
            diff = float(np.max(np.abs(value - ref)))
            bound = 1e-2 + 2e-2 * float(np.max(np.abs(ref)))
            if not diff <= bound:  # also NaN
                failures.append(f"{label}: {name} max|diff| {diff:.3g} > {bound:.3g}")
            error = _rms(value - ref)
            for i, factor in enumerate(factors):
                others = [o for o in cases if o[i] != k[i] and o[:i] + o[i + 1 :] == k[:i] + k[i + 1 :]]
                change = min((_rms(want[o][name] - ref) for o in others), default=None)
                if change and not error <= SEPARATION * change:
                    failures.append(f"{label}: {name} error rms {error:.3g} is {error / change:.2f}x the change "
                                    f"another {factor} makes ({change:.3g}); at most {SEPARATION}x")  # fmt: skip
    return failures


def image_mismatch(got, want) -> str | None:
    """Why two generated images differ more than fp16 explains (None when they match)."""
    diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
    if diff.mean() <= 1.0 and diff.max() <= 16:
        return None
    return f"mean |diff| {diff.mean():.2f}/255 (at most 1), max {diff.max()}/255 (at most 16)"


class Broken:
    """An engine with one fault, the kind a wrong binding makes: an input stuck at its first
    call's value, the embeddings of the unconditional prompt for every row, or outputs 5% off."""

    def __init__(self, engine, fault: str):
        self.engine, self.fault, self.first = engine, fault, None
        self.inputs, self.outputs = engine.inputs, engine.outputs

    def run(self, feed):
        feed = dict(feed)
        self.first = self.first or dict(feed)
        if self.fault.startswith("stale "):
            name = self.fault.removeprefix("stale ")
            feed[name] = self.first[name]
        if self.fault == "uncond only":
            ehs = feed["encoder_hidden_states"]
            feed["encoder_hidden_states"] = np.repeat(ehs[:1], len(ehs), axis=0)
        out = self.engine.run(feed)
        return {k: v * np.float32(1.05) for k, v in out.items()} if self.fault == "5% off" else out

    def close(self):
        self.engine.close()


@pytest.fixture(scope="module")
def micro_ort():
    pytest.importorskip("onnxruntime")
    from edgediff.engines.onnxruntime import OrtEngine

    engines = {c: OrtEngine(MICRO / c / "model.onnx", component=c) for c in ("text_encoder", "unet", "vae_decoder")}
    yield engines
    for e in engines.values():
        e.close()


@pytest.mark.parametrize(
    ("component", "fault", "needle"),
    [
        ("unet", "stale timestep", "the change another timestep makes"),
        ("unet", "stale encoder_hidden_states", "the change another prompt makes"),
        ("unet", "5% off", "out_sample max|diff|"),
        ("text_encoder", "stale input_ids", "the change another prompt makes"),
        ("vae_decoder", "stale latent_sample", "the change another latent makes"),
    ],
)
def test_component_check_fails_a_broken_engine(micro_ort, component, fault, needle):
    cases, factors = component_cases(MICRO, component)
    eng = micro_ort[component]
    failures = compare_cases(Broken(eng, fault).run, eng.run, cases, factors)
    assert any(needle in f for f in failures), failures


def test_component_check_passes_fp16_rounding_at_the_boundary(micro_ort):
    """What an fp16 plan's I/O does at the least: inputs and outputs rounded to fp16."""

    def fp16_io(eng):
        def run(feed):
            half = {k: v.astype(np.float16).astype(v.dtype) if v.dtype == np.float32 else v for k, v in feed.items()}
            return {k: v.astype(np.float16).astype(np.float32) for k, v in eng.run(half).items()}

        return run

    for component, eng in micro_ort.items():
        cases, factors = component_cases(MICRO, component)
        assert compare_cases(fp16_io(eng), eng.run, cases, factors) == [], component


def test_image_check_fails_a_unet_that_loses_the_prompt():
    pytest.importorskip("onnxruntime")
    from edgediff.runtime import Pipeline

    with Pipeline.load(MICRO) as pipe:
        want = pipe(**GENERATE).images[0]
        assert image_mismatch(pipe(**GENERATE).images[0], want) is None
        pipe.engines["unet"] = Broken(pipe.engines["unet"], "uncond only")
        assert "mean |diff|" in (image_mismatch(pipe(**GENERATE).images[0], want) or "")


@needs_torch
def test_checks_pass_the_fp16_export_under_onnxruntime(tiny_export):
    """The positive control: a real fp16 model (ONNX Runtime's CPU kernels) passes both checks."""
    from edgediff.engines.onnxruntime import OrtEngine
    from edgediff.runtime import Pipeline

    fp32, fp16 = Path(tiny_export("sd1")), Path(tiny_export("sd1", fp16=True))
    for component in ("text_encoder", "unet", "vae_decoder"):
        cases, factors = component_cases(fp32, component)
        with (
            OrtEngine(fp32 / component / "model.onnx", component=component) as ref,
            OrtEngine(fp16 / component / "model.onnx", component=component) as half,
        ):
            assert compare_cases(half.run, ref.run, cases, factors) == [], component
    with Pipeline.load(fp32) as ref, Pipeline.load(fp16) as half:
        assert image_mismatch(half(**GENERATE).images[0], ref(**GENERATE).images[0]) is None


# ------------------------------------------------------------------------------ real builds and runs (GPU)

GENERATE = {"prompt": "a red circle", "num_inference_steps": 4, "seed": 3, "scheduler": "euler", "guidance_scale": 7.5}


def _gpu_skip_reason() -> str | None:
    """The first missing piece, in the order a GPU machine needs them: TensorRT and its GPU, then
    the export extra that makes the tiny model."""
    from edgediff.engines.tensorrt_build import import_tensorrt

    try:
        import_tensorrt()
        cuda_util.probe_gpu(cuda_util.import_cudart())
    except EngineUnavailableError as e:
        return f"needs TensorRT >= 10, cuda-python and an NVIDIA GPU: {str(e).split('; ')[0]}"
    if not HAS_TORCH:
        return (
            "TensorRT and a GPU are here, but the tiny model needs the export extra (torch, diffusers, transformers)"
        )
    return None


_GPU_SKIP = _gpu_skip_reason()
on_gpu = pytest.mark.skipif(_GPU_SKIP is not None, reason=_GPU_SKIP or "")


def test_gpu_skip_reason_names_the_missing_piece():
    """Item 5: the lean stage (no TensorRT, no torch) must say TensorRT is missing, not the export extra."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "TensorRT is not usable here" in _GPU_SKIP and "export extra" not in _GPU_SKIP
    else:
        pytest.skip("tensorrt is installed here")


@pytest.fixture(scope="module")
def built_model(tiny_export, tmp_path_factory):
    """The tiny sd1 model exported fp16 (works on every TensorRT: FP16 flag before 10.12, strongly
    typed after), copied so its plans stay private to this module: first built static (guidance,
    batch 1), then rebuilt with a dynamic range, which replaces each static plan."""
    from edgediff.engines.tensorrt_build import build_model

    folder = tmp_path_factory.mktemp("trt") / "model"
    shutil.copytree(tiny_export("sd1", fp16=True), folder)
    assert [r.status for r in build_model(folder, opt_level=2)] == ["built"] * 3
    assert [r.status for r in build_model(folder, opt_level=2)] == ["up to date"] * 3
    dynamic = plans.ProfileOptions(dynamic=True, min_size=16, max_size=64, max_batch=2)
    assert [r.status for r in build_model(folder, options=dynamic, opt_level=2)] == ["built"] * 3
    assert len([p for p in (folder / "engines").iterdir() if p.is_dir()]) == 3  # one plan per component
    return folder


@pytest.mark.gpu
@pytest.mark.tensorrt
@on_gpu
@pytest.mark.parametrize("component", ["unet", "vae_decoder", "text_encoder"])
def test_component_matches_onnxruntime_fp32(built_model, tiny_export, component):
    from edgediff.engines.onnxruntime import OrtEngine

    fp32 = Path(tiny_export("sd1"))
    cases, factors = component_cases(fp32, component)
    with (
        OrtEngine(fp32 / component / "model.onnx", component=component) as ref,
        create_engine("tensorrt", built_model / component / "model.onnx", component=component) as eng,
    ):
        assert compare_cases(eng.run, ref.run, cases, factors) == []
        stats = eng.stats()
    assert len(stats["compute_ms"]) == len(stats["copy_ms"]) == len(cases) and stats["profile"] == 0
    assert min(stats["compute_ms"]) > 0 and min(stats["copy_ms"]) > 0
    assert stats["device_memory_bytes"] >= stats["io_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
@on_gpu
def test_unet_profiles_a_b_a_match_onnxruntime(built_model, tiny_export):
    """The static profile, the range, and back: each call within the fp16 bound of ONNX Runtime."""
    from edgediff.engines.onnxruntime import OrtEngine

    fp32 = Path(tiny_export("sd1"))
    a = next(iter(component_cases(fp32, "unet")[0].values()))
    rng = np.random.default_rng(5)
    b = {"sample": rng.standard_normal((1, 4, 12, 24)).astype(np.float32), "timestep": np.float32(321.5),
         "encoder_hidden_states": a["encoder_hidden_states"][1:]}  # fmt: skip
    with (
        OrtEngine(fp32 / "unet" / "model.onnx", component="unet") as ref,
        create_engine("tensorrt", built_model / "unet" / "model.onnx", component="unet") as eng,
    ):
        for feed, profile in ((a, 0), (b, 1), (a, 0)):
            got, want = eng.run(feed)["out_sample"], ref.run(feed)["out_sample"]
            assert eng.stats()["profile"] == profile
            diff, bound = float(np.max(np.abs(got - want))), 1e-2 + 2e-2 * float(np.max(np.abs(want)))
            assert diff <= bound, (profile, diff, bound)


@pytest.mark.gpu
@pytest.mark.tensorrt
@on_gpu
def test_generate_matches_onnxruntime_cpu(built_model, tiny_export):
    from edgediff.runtime import Pipeline

    with Pipeline.load(tiny_export("sd1")) as ref:
        want = ref(**GENERATE).images[0]
    with Pipeline.load(built_model, engine="tensorrt") as pipe:
        assert image_mismatch(pipe(**GENERATE).images[0], want) is None
        # other shapes go to the plans' range profiles: no guidance, and another size
        assert pipe(**{**GENERATE, "guidance_scale": 1.0}).images[0].size == (32, 32)
        assert pipe(**{**GENERATE, "width": 48, "height": 24}).images[0].size == (48, 24)


@pytest.mark.gpu
@pytest.mark.tensorrt
@on_gpu
def test_close_frees_and_refuses_further_runs(built_model):
    eng = create_engine("tensorrt", built_model / "vae_decoder" / "model.onnx", component="vae_decoder")
    eng.run({"latent_sample": np.zeros((1, 4, 16, 16), np.float32)})
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(EngineUnavailableError, match="closed"):
        eng.run({"latent_sample": np.zeros((1, 4, 16, 16), np.float32)})


@pytest.mark.gpu
@pytest.mark.tensorrt
@on_gpu
def test_refit_applies_a_lora_and_switching_back_restores_the_base(tiny_export, tmp_path):
    """`edgediff build --refit`, then the committed tiny LoRA's merged weights refitted into the micro UNet plan: the
    UNet output equals ONNX Runtime's with the same weights (fp16 bound), and a fresh engine without weights gives
    the base output again (a refit never stays in the plan file)."""
    from edgediff.engines.onnxruntime import OrtEngine
    from edgediff.engines.tensorrt_build import build_model
    from edgediff.runtime.lora_apply import as_loras, merged_weights
    from golden_cases import LORA_FILE

    micro = Path(__file__).parent / "fixtures" / "micro-sd1"
    folder = tmp_path / "model"
    shutil.copytree(micro, folder)
    build_model(folder, ["unet"], opt_level=2, refit=True)
    weights = merged_weights(ModelFolder.open(folder), as_loras([(micro.parent / LORA_FILE, 0.8)]), lazy=True)["unet"]
    rng = np.random.default_rng(3)
    feed = {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32), "timestep": np.float32(500.0),
            "encoder_hidden_states": rng.standard_normal((2, 77, 16)).astype(np.float32)}  # fmt: skip
    onnx = folder / "unet" / "model.onnx"
    with OrtEngine(onnx, component="unet", weights=weights) as ref_lora, OrtEngine(onnx, component="unet") as ref:
        want_lora, want = ref_lora.run(feed)["out_sample"], ref.run(feed)["out_sample"]
    assert float(np.abs(want_lora - want).max()) > 1e-2  # the LoRA moves the output past the fp16 bound
    for weights_given, expected in ((weights, want_lora), (None, want)):
        with create_engine("tensorrt", onnx, component="unet", weights=weights_given) as eng:
            got = eng.run(feed)["out_sample"]
        bound = 1e-2 + 2e-2 * float(np.max(np.abs(expected)))
        assert float(np.max(np.abs(got - expected))) <= bound
