"""Bad scheduler configs, per-call options and schedules are refused with InvalidArgumentError naming
the key / index and value (issue 11: they used to give NaN latents, pure noise or a raw traceback).
Torch-free; the comparisons with diffusers' own behaviour import it inside the test and skip without it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime import schedulers
from edgediff.runtime.errors import InvalidArgumentError
from edgediff.runtime.schedulers import SCHEDULERS, config_problems
from edgediff.runtime.schedulers.validation import RULES, SCHEDULE_KEYS, UNCHECKED_KEYS
from scheduler_harness import SD_BASE, assert_close_finite

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = [
    ROOT / "tests/fixtures/micro-sd1/scheduler/scheduler_config.json",
    ROOT / "tests/fixtures/micro-sd2/scheduler/scheduler_config.json",
    ROOT / "runtime/models/shapes/scheduler/scheduler_config.json",
]
NAMES = sorted(SCHEDULERS)
SD_CFG = {k: v for k, v in SD_BASE.items() if not k.startswith("_")}
NAN, INF = float("nan"), float("inf")


def _refused(name: str, overrides: dict, fragment: str) -> str:
    """The same problem from config_problems, from construction and from a user's scheduler dict."""
    cfg = {**SD_CFG, **overrides}
    problems = config_problems(cfg, name)
    assert any(fragment in p for p in problems), problems
    with pytest.raises(InvalidArgumentError) as err:
        SCHEDULERS[name](**cfg)
    assert fragment in str(err.value) and str(err.value).startswith(f"{name} config: ")
    with pytest.raises(InvalidArgumentError) as err2:
        schedulers.resolve({"_class_name": name, **overrides}, SD_BASE)
    assert fragment in str(err2.value)
    return str(err.value)


# -- A. configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_sd_config_pass(name):
    assert config_problems({}, name) == []
    assert config_problems(SD_CFG, name) == []
    SCHEDULERS[name](**SD_CFG).schedule(4)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.parts[-3])
def test_shipped_configs_pass_with_every_scheduler(path):
    raw = json.loads(path.read_text())
    assert config_problems(raw) == []
    base = schedulers.apply_pipeline_corrections(raw)
    for name in schedulers.known_names():
        sched = schedulers.resolve(name, base)
        assert config_problems(base, sched.class_name) == []
        sched.schedule(4)


def test_every_config_key_has_a_rule():
    keys = {k for cls in SCHEDULERS.values() for k in cls.defaults}
    assert keys - set(RULES) - set(SCHEDULE_KEYS) - set(UNCHECKED_KEYS) == set()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"num_train_timesteps": 0}, "num_train_timesteps=0 must be an integer >= 2"),
        ({"num_train_timesteps": -1000}, "num_train_timesteps=-1000 must be"),
        ({"num_train_timesteps": "1000"}, "num_train_timesteps='1000' must be an integer"),
        ({"num_train_timesteps": 1000.5}, "num_train_timesteps=1000.5 must be an integer"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps=1000.0 must be an integer"),
        ({"num_train_timesteps": True}, "num_train_timesteps=True must be an integer"),
        ({"beta_start": -1}, "beta_start=-1 must be a number in (0, 1)"),
        ({"beta_start": NAN}, "beta_start=nan must be a number in (0, 1)"),
        ({"beta_start": "0.00085"}, "beta_start='0.00085' must be a number"),
        ({"beta_start": 0}, "beta_start=0 must be a number in (0, 1)"),
        ({"beta_end": "0.012"}, "beta_end='0.012' must be a number"),
        ({"beta_end": 1.5}, "beta_end=1.5 must be a number in (0, 1)"),
        ({"beta_end": 1.5, "beta_schedule": "linear"}, "beta_end=1.5 must be a number in (0, 1)"),
        ({"beta_end": NAN}, "beta_end=nan must be"),
        ({"beta_end": INF}, "beta_end=inf must be"),
        ({"beta_end": 0.0001}, "beta_end=0.0001 is below beta_start=0.00085"),
        ({"beta_schedule": "exp"}, "beta_schedule='exp' is not supported"),
        ({"beta_schedule": None}, "beta_schedule=None is not supported"),
        ({"trained_betas": [0.01] * 999}, "trained_betas has 999 values, must be a list of 1000 numbers"),
        ({"trained_betas": [0.01] * 999 + [NAN]}, "trained_betas[999]=nan must be a number in (0, 1)"),
        ({"trained_betas": [0.0] + [0.01] * 999}, "trained_betas[0]=0.0 must be a number in (0, 1)"),
        ({"trained_betas": [0.01] * 500 + [1.5] * 500}, "trained_betas[500]=1.5 must be"),
        ({"trained_betas": ["0.01"] * 1000}, "trained_betas[0]='0.01' must be a number"),
        ({"trained_betas": "0.01"}, "trained_betas='0.01' must be a list of 1000 numbers"),
        ({"trained_betas": 0.01}, "trained_betas=0.01 must be a list"),
        ({"steps_offset": "1"}, "steps_offset='1' must be an integer >= 0"),
        ({"steps_offset": -1}, "steps_offset=-1 must be an integer >= 0"),
        ({"steps_offset": 1.5}, "steps_offset=1.5 must be an integer"),
        ({"steps_offset": 1000}, "steps_offset=1000 must be below num_train_timesteps=1000"),
        ({"timestep_spacing": "karras"}, "timestep_spacing='karras' is not supported"),
        ({"timestep_spacing": 3}, "timestep_spacing=3 must be a string"),
        ({"prediction_type": "flow"}, "prediction_type='flow' is not supported"),
        ({"prediction_type": None}, "prediction_type=None must be a string"),
    ],
)
def test_bad_config_values_refused(name, overrides, fragment):
    key = next(iter(overrides))
    if key not in SCHEDULERS[name].defaults:
        pytest.skip(f"{name} has no {key}")
    _refused(name, overrides, fragment)


def test_squaredcos_schedule_ignores_beta_start_and_end():
    # diffusers' cosine schedule does not read them: refusing them would reject a working config
    assert config_problems({**SD_CFG, "beta_schedule": "squaredcos_cap_v2", "beta_end": "n/a"}, "DDIMScheduler") == []


def test_equal_beta_start_and_end_allowed():
    # a constant schedule is valid maths and diffusers builds it
    assert config_problems({**SD_CFG, "beta_start": 0.01, "beta_end": 0.01}, "DDIMScheduler") == []


def test_trained_betas_given_replace_beta_start_and_end():
    betas = np.linspace(0.0001, 0.02, 1000).tolist()
    cfg = {**SD_CFG, "trained_betas": betas, "beta_start": "ignored", "beta_schedule": "unknown"}
    assert config_problems(cfg, "DDIMScheduler") == []
    ours = SCHEDULERS["DDIMScheduler"](**cfg).alphas_cumprod
    assert_close_finite(ours, np.cumprod(1 - np.float32(betas)), rtol=1e-5)


def test_float32_betas_reaching_one_refused():
    # every beta_end < 1 alone, but scaled_linear squares a float32 ramp: 0.99999999 rounds to 1
    msg = _refused("DDIMScheduler", {"beta_end": 0.99999999}, "gives beta[999]=1.0")
    assert "betas must be in (0, 1)" in msg


@pytest.mark.parametrize("name", NAMES)
def test_every_boolean_key_refuses_strings(name):
    keys = [k for k, v in SCHEDULERS[name].defaults.items() if isinstance(v, bool)]
    assert keys
    for key in keys:
        _refused(name, {key: "true"}, f"{key}='true' must be true or false")
    _refused(name, {keys[0]: 1}, f"{keys[0]}=1 must be true or false")


@pytest.mark.parametrize("name", NAMES)
def test_every_enum_key_refuses_unknown_values(name):
    cls = SCHEDULERS[name]
    keys = [k for k, v in cls.defaults.items() if isinstance(v, str) and k != "time_shift_type"]
    for key in keys:
        _refused(name, {key: "no-such-value"}, f"{key}='no-such-value' is not supported by edgediff")


@pytest.mark.parametrize("name", NAMES)
def test_every_numeric_key_refuses_nan_and_inf(name):
    cls = SCHEDULERS[name]
    keys = [k for k, v in cls.defaults.items() if isinstance(v, float) and math.isfinite(v)]
    keys += [k for k in ("sigma_min", "sigma_max") if k in cls.defaults]
    assert "beta_start" in keys
    for key in keys:
        for bad in (NAN, INF, "1.0"):
            _refused(name, {key: bad}, f"{key}={bad!r} must be")


@pytest.mark.parametrize(
    "name,overrides,fragment",
    [
        ("DPMSolverMultistepScheduler", {"solver_order": 2.0}, "solver_order=2.0 must be an integer"),
        ("DPMSolverMultistepScheduler", {"solver_order": True}, "solver_order=True must be an integer"),
        ("DPMSolverMultistepScheduler", {"solver_order": 4}, "solver_order=4 is not supported"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type='dpmsolver' is not"),
        ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type='learned_range' is not"),
        ("DPMSolverMultistepScheduler", {"lambda_min_clipped": NAN}, "lambda_min_clipped=nan must be a number"),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
        ("UniPCMultistepScheduler", {"disable_corrector": [0, "1"]}, "disable_corrector=[0, '1'] must be a list"),
        ("UniPCMultistepScheduler", {"solver_type": "bh1"}, "needs solver_type='bh2'"),
        ("EulerDiscreteScheduler", {"sigma_min": -1.0}, "sigma_min=-1.0 must be a positive"),
        ("EulerDiscreteScheduler", {"sigma_min": 10.0, "sigma_max": 1.0}, "sigma_min=10.0 must be below sigma_max"),
        ("LCMScheduler", {"original_inference_steps": 0}, "original_inference_steps=0 must be an integer >= 1"),
        ("LCMScheduler", {"original_inference_steps": 2000}, "original_inference_steps=2000 must be at most"),
        ("LCMScheduler", {"timestep_scaling": 0.0}, "timestep_scaling=0.0 must be a positive"),
        ("DDIMScheduler", {"clip_sample_range": 0}, "clip_sample_range=0 must be a positive"),
        ("DDPMScheduler", {"variance_type": "fixed_large_log"}, "variance_type='fixed_large_log' is not supported"),
    ],
)
def test_class_specific_values_refused(name, overrides, fragment):
    _refused(name, overrides, fragment)


def test_all_problems_listed_at_once():
    bad = {"num_train_timesteps": 1000.5, "steps_offset": "1", "clip_sample": "true", "timestep_spacing": "karras"}
    msg = _refused("DDIMScheduler", bad, "num_train_timesteps=1000.5")
    for fragment in ("steps_offset='1'", "clip_sample='true'", "timestep_spacing='karras'"):
        assert fragment in msg
    assert "\n" not in msg and msg.count("; ") == 3


def test_folder_config_checks_its_class_and_types_other_keys():
    raw = json.loads(SHIPPED_CONFIGS[0].read_text())  # PNDMScheduler
    # a key of another class: the type rules, not that class's enums (it is ignored by PNDM)
    assert config_problems({**raw, "solver_type": "bh2"}) == []
    assert config_problems({**raw, "solver_order": "2"}) == ["solver_order='2' must be an integer >= 1"]
    # PNDM's own enums
    assert "prediction_type='sample' is not supported by edgediff PNDMScheduler" in config_problems(
        {**raw, "prediction_type": "sample"})[0]  # fmt: skip
    # a class edgediff does not implement: the class-independent rules still apply
    other = {**raw, "_class_name": "KDPM2DiscreteScheduler"}
    assert config_problems(other) == []
    assert config_problems({**other, "num_train_timesteps": 0})[0].startswith("num_train_timesteps=0")
    assert config_problems([1, 2]) == ["the scheduler config must be a JSON object, got list"]


def test_unknown_keys_are_a_warning_not_a_problem(caplog):
    cfg = {**SD_CFG, "no_such_option": "x"}
    assert config_problems(cfg, "EulerDiscreteScheduler") == []
    with caplog.at_level(logging.WARNING):
        SCHEDULERS["EulerDiscreteScheduler"](**cfg)
    assert "no_such_option" in caplog.text


def test_switching_classes_keeps_working_configs():
    # a DPM-Solver config (variance_type null, every diffusers DPM config has it) switched to DDPM,
    # a DDPM one switched to DPM, a UniPC one (solver_type bh2) switched to DPM: diffusers runs all three
    dpm = json.loads(SHIPPED_CONFIGS[2].read_text())
    assert schedulers.resolve("ddpm", dpm).config["variance_type"] is None
    assert schedulers.resolve("dpmpp_2m", {**SD_BASE, "variance_type": "fixed_small"}).schedule(4)
    assert schedulers.resolve("dpmpp_2m", {**SD_BASE, "solver_type": "bh2"}).config["solver_type"] == "midpoint"


def test_switched_configs_match_diffusers():
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from scheduler_harness import drive

    drive(DDPMScheduler, {"variance_type": None}, 4)
    drive(DPMSolverMultistepScheduler, {"solver_type": "bh2", "variance_type": "fixed_small"}, 4)


# -- B. eta ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [-5, -0.1, NAN, INF, 1.01, 1.5, "0.5", True])
def test_ddim_eta_refused(eta):
    with pytest.raises(InvalidArgumentError, match=r"eta=.* must be a number in \[0, 1\]"):
        SCHEDULERS["DDIMScheduler"](**SD_CFG, eta=eta)
    with pytest.raises(InvalidArgumentError, match=r"eta=.* must be a number in \[0, 1\]"):
        schedulers.resolve("ddim", SD_BASE, eta=eta)


@pytest.mark.parametrize("eta", [0, 0.0, 0.5, 1, 1.0])
def test_ddim_eta_allowed(eta):
    assert schedulers.resolve("ddim", SD_BASE, eta=eta).eta == float(eta)


def test_eta_reaches_ddim_only():
    # diffusers' pipeline passes eta only to schedulers whose step takes it (DDIM among ours)
    assert [n for n, c in SCHEDULERS.items() if "eta" in c.step_options] == ["DDIMScheduler"]
    schedulers.resolve("euler", SD_BASE, eta=NAN).schedule(4)


def test_eta_above_one_is_nan_in_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler

    for eta, finite in ((1.0, True), (1.5, False)):
        ref = DDIMScheduler.from_config(SD_BASE)
        ref.set_timesteps(20)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=gen)
        for t in ref.timesteps:
            x = ref.step(torch.randn(1, 4, 8, 8, generator=gen), t, x, eta=eta, generator=gen).prev_sample
        assert bool(torch.isfinite(x).all()) is finite


# -- C. more steps than training timesteps -----------------------------------------------------------
T_SMALL = 100  # the same rules at any T; small keeps 1000-step schedules out of the test time
SMALL = {**SD_CFG, "num_train_timesteps": T_SMALL}
SPACINGS = ["linspace", "leading", "trailing"]
# (class, spacing, karras) -> the largest accepted num_inference_steps (None: no limit)
KARRAS = {n for n, c in SCHEDULERS.items() if "use_karras_sigmas" in c.defaults}
SIGMA_FAMILY = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                "HeunDiscreteScheduler"}  # fmt: skip
MULTISTEP = {"DPMSolverMultistepScheduler", "UniPCMultistepScheduler"}


def _limit(name, spacing, karras):
    if name in SIGMA_FAMILY and (spacing == "linspace" or (spacing == "trailing" and karras)):
        return None
    if name in MULTISTEP:
        return None if karras else (T_SMALL if spacing == "trailing" else T_SMALL - 1)
    return T_SMALL


def _step_grid(name: str, timesteps: np.ndarray, sigmas: np.ndarray | None, n: int) -> np.ndarray:
    """The schedule's distinct points, without the repeats the algorithm intends (Heun's and PNDM's)."""
    if name == "HeunDiscreteScheduler":
        return sigmas[[0, *range(1, 2 * n - 2, 2), 2 * n - 1]]
    if name == "PNDMScheduler":  # PLMS re-does its first interval: the second timestep twice
        return np.delete(timesteps, 1) if n > 1 else timesteps
    return sigmas if sigmas is not None else timesteps


def _sane(name, schedule, n) -> bool:
    """No zero-length step and every UNet timestep inside the training range."""
    grid = _step_grid(name, np.asarray(schedule.timesteps), getattr(schedule, "sigmas", None), n)
    inside = schedule.timesteps.min() >= 0 and schedule.timesteps.max() <= T_SMALL - 1
    return bool(inside and np.all(np.diff(grid) < 0))


CASES = [(n, sp, k) for n in NAMES if n != "LCMScheduler" for sp in SPACINGS
         for k in ([False, True] if n in KARRAS else [False])]  # fmt: skip


@pytest.mark.parametrize("name,spacing,karras", CASES)
def test_too_many_steps_refused_where_the_schedule_breaks(name, spacing, karras):
    cfg = {**SMALL, "timestep_spacing": spacing, "steps_offset": 0, **({"use_karras_sigmas": True} if karras else {})}
    sched = SCHEDULERS[name](**cfg)
    limit = _limit(name, spacing, karras)
    for n in (T_SMALL - 1, T_SMALL, T_SMALL + 1, 3 * T_SMALL // 2):
        if limit is not None and n > limit:
            with pytest.raises(InvalidArgumentError, match=f"{name}.* needs num_inference_steps <= {limit}") as err:
                sched.schedule(n)
            if n > T_SMALL:
                assert f"num_inference_steps={n} exceeds the model's {T_SMALL} training timesteps" in str(err.value)
        else:
            assert _sane(name, sched.schedule(n), n), (name, spacing, karras, n)


def test_brief_example_message():
    with pytest.raises(InvalidArgumentError) as err:
        schedulers.resolve("ddim", SD_BASE).schedule(1500)
    assert str(err.value) == ("num_inference_steps=1500 exceeds the model's 1000 training timesteps; "
                              "DDIMScheduler needs num_inference_steps <= 1000")  # fmt: skip


def test_lcm_steps_limited_by_original_inference_steps():
    with pytest.raises(InvalidArgumentError, match="exceeds the model's 1000 training timesteps"):
        SCHEDULERS["LCMScheduler"]().schedule(1001)
    with pytest.raises(InvalidArgumentError, match="cannot exceed original_inference_steps=50"):
        SCHEDULERS["LCMScheduler"]().schedule(51)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("LCMScheduler",)])
def test_steps_offset_past_the_last_timestep_refused(name):
    # SD 1.x's corrected config (steps_offset=1, leading) at num_inference_steps=T: timestep T
    sched = SCHEDULERS[name](**{**SD_CFG, "timestep_spacing": "leading"})
    limit = 999 if name in MULTISTEP else 1000
    with pytest.raises(InvalidArgumentError, match="steps_offset=1 puts a timestep at 1000, past the model's last "
                                                   "training timestep 999"):  # fmt: skip
        sched.schedule(limit)
    sched.schedule(limit // 2)


def test_refused_step_counts_break_in_diffusers():
    """Where we refuse, diffusers raises, indexes out of its tables, or repeats a σ / timestep."""
    pytest.importorskip("torch")
    import diffusers

    for name, spacing, karras in CASES:
        limit = _limit(name, spacing, karras)
        if limit is None:
            continue
        n = limit + 1
        cfg = {**SMALL, "timestep_spacing": spacing, "steps_offset": 0, "use_karras_sigmas": karras}
        ref = getattr(diffusers, name).from_config(cfg)
        try:
            ref.set_timesteps(n)
        except ValueError:
            assert name in ("DDIMScheduler", "DDPMScheduler")
            continue
        sigmas = ref.sigmas.numpy() if hasattr(ref, "sigmas") else None
        timesteps = ref.timesteps.numpy().astype(np.float64)
        grid = _step_grid(name, timesteps, sigmas, n)
        broken = np.any(np.diff(grid) >= 0) or timesteps.min() < 0 or timesteps.max() > T_SMALL - 1
        assert broken, (name, spacing, karras, n)


def test_accepted_step_counts_beyond_t_match_diffusers():
    pytest.importorskip("torch")
    from diffusers import EulerDiscreteScheduler

    from scheduler_harness import drive

    x = drive(EulerDiscreteScheduler, {"num_train_timesteps": T_SMALL}, 3 * T_SMALL // 2)
    assert np.isfinite(x).all()


# -- D. custom timesteps and sigmas ------------------------------------------------------------------
TAKE_TIMESTEPS = [n for n in NAMES if SCHEDULERS[n].accepts_timesteps]
TRUNCATING = [n for n in TAKE_TIMESTEPS if SCHEDULERS[n].int_timesteps]


def test_which_classes_take_custom_schedules():
    # as diffusers' set_timesteps signatures
    assert TAKE_TIMESTEPS == ["DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                              "HeunDiscreteScheduler", "LCMScheduler"]  # fmt: skip
    assert TRUNCATING == ["DDPMScheduler", "DPMSolverMultistepScheduler", "LCMScheduler"]
    assert [n for n in NAMES if SCHEDULERS[n].accepts_sigmas] == ["EulerDiscreteScheduler"]


@pytest.mark.parametrize("name", TAKE_TIMESTEPS)
@pytest.mark.parametrize(
    "timesteps,fragment",
    [
        ([500, 700], "strictly descending order (as in diffusers): timesteps[1]=700 follows timesteps[0]=500"),
        ([900, 500, 500], "strictly descending order (as in diffusers): timesteps[2]=500 follows timesteps[1]=500"),
        ([1000, 10], "must start below num_train_timesteps=1000 (as in diffusers): timesteps[0]=1000"),
        ([10, -1], "must not be negative: timesteps[1]=-1"),
        ([900, NAN, 100], "must be finite numbers: timesteps[1]=nan"),
        ([INF, 100], "must be finite numbers: timesteps[0]=inf"),
        ([900, "500"], "must be finite numbers: timesteps[1]='500'"),
        ([900, None], "timesteps[1]=None"),
        ([900, True], "timesteps[1]=True"),
        ("999", "custom timesteps must be a list of numbers, got '999'"),
        (999, "custom timesteps must be a list of numbers, got 999"),
        ([], "custom timesteps must not be empty"),
    ],
)
def test_bad_custom_timesteps_refused(name, timesteps, fragment):
    with pytest.raises(InvalidArgumentError) as err:
        SCHEDULERS[name](**SD_CFG).schedule(timesteps=timesteps)
    assert fragment in str(err.value) and str(err.value).startswith(f"{name}: ")


@pytest.mark.parametrize("name", TAKE_TIMESTEPS)
def test_custom_timesteps_inside_the_training_range_allowed(name):
    sched = SCHEDULERS[name](**SD_CFG)
    assert len(sched.schedule(timesteps=[999.4, 10, 0]).timesteps) >= 3  # below T once truncated, or fractional
    with pytest.raises(InvalidArgumentError, match="start below"):
        sched.schedule(timesteps=[1000.0, 10])


@pytest.mark.parametrize("name", TRUNCATING)
def test_truncation_repeats_refused(name):
    with pytest.raises(InvalidArgumentError, match=r"timesteps\[1\]=500.7 and timesteps\[2\]=500.2 both give 500"):
        SCHEDULERS[name](**SD_CFG).schedule(timesteps=[999, 500.7, 500.2])


@pytest.mark.parametrize("name", [n for n in TAKE_TIMESTEPS if n not in TRUNCATING])
def test_fractional_custom_timesteps_kept(name):
    schedule = SCHEDULERS[name](**SD_CFG).schedule(timesteps=[999, 500.7, 500.2])
    assert 500.7 in np.round(schedule.timesteps.astype(np.float64), 3)


@pytest.mark.parametrize(
    "sigmas,fragment",
    [
        ([14.6, -1.0, 0.0], "must not be negative: sigmas[1]=-1"),
        ([14.6, NAN, 0.0], "must be finite numbers: sigmas[1]=nan"),
        ([INF, 1.0, 0.0], "must be finite numbers: sigmas[0]=inf"),
        ([14.6, 14.6, 0.0], "strictly decreasing (only the last may be 0): sigmas[1]=14.6 follows sigmas[0]=14.6"),
        ([1.0, 3.0, 0.0], "sigmas[1]=3 follows sigmas[0]=1"),
        ([14.6, 0.0, 0.0], "sigmas[2]=0 follows sigmas[1]=0"),
        ([14.6], "at least two values"),
        (["14.6", 0.0], "sigmas[0]='14.6'"),
    ],
)
def test_bad_custom_sigmas_refused(sigmas, fragment):
    with pytest.raises(InvalidArgumentError) as err:
        SCHEDULERS["EulerDiscreteScheduler"](**SD_CFG).schedule(sigmas=sigmas)
    assert fragment in str(err.value)


def test_good_custom_sigmas_allowed():
    euler = SCHEDULERS["EulerDiscreteScheduler"](**SD_CFG)
    assert euler.schedule(sigmas=[14.6, 7.0, 0.0]).sigmas[-1] == 0
    # Align-Your-Steps style lists end on σ_min, not 0
    assert euler.schedule(sigmas=np.array([14.615, 3.861, 0.029])).sigmas[-1] == np.float32(0.029)


# -- end to end: the pipeline passes these through --------------------------------------------------
ISSUE_12_DPM = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True, "solver_type": "heun",
                "final_sigmas_type": "sigma_min"}  # fmt: skip


def test_pipeline_refuses_before_denoising():
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(ROOT / "tests/fixtures/micro-sd1")
    cases = [
        (dict(num_inference_steps=1500, scheduler="ddim"), "exceeds the model's 1000 training timesteps"),
        (dict(scheduler={"_class_name": "DDIMScheduler", "beta_end": "0.012"}), "beta_end='0.012' must be a number"),
        (dict(scheduler="ddim", eta=1.5), "eta=1.5 must be a number in [0, 1]"),
        (dict(scheduler="euler", timesteps=[999, 999]), "timesteps[1]=999 follows timesteps[0]=999"),
        # issue 12: an all-black image with exit 0 in diffusers (NaN latents from the last step)
        (dict(num_inference_steps=20, scheduler=ISSUE_12_DPM), "with use_karras_sigmas=True ends on a repeated sigma"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(InvalidArgumentError) as err:
            pipe("a cat", **{"num_inference_steps": 2, "seed": 0, **kwargs})
        assert fragment in str(err.value)
