"""Euler ancestral, DPM-Solver++ SDE ("DPM++ 2M SDE"), third-order DPM-Solver++ and the
exponential / Lu σ schedules against diffusers, step by step with the same model outputs and the
same noise stream (tolerance in scheduler_harness)."""

import itertools

import numpy as np
import pytest

from conftest import HAS_TORCH, needs_torch
from edgediff.runtime import schedulers
from edgediff.runtime.errors import InvalidArgumentError
from edgediff.runtime.rng import TorchCPUGenerator
from edgediff.runtime.schedulers.dpmsolver_multistep import DPMSolverMultistep
from edgediff.runtime.schedulers.euler import EulerDiscrete
from edgediff.runtime.schedulers.euler_ancestral import EulerAncestralDiscrete
from scheduler_harness import (
    PREDICTIONS,
    SD_BASE,
    SPACINGS,
    STEPS,
    assert_close_finite,
    assert_refused_where_diffusers_breaks,
    drive,
)  # fmt: skip

SEEDS = [0, 1, 1234]
ALGOS = ["dpmsolver++", "sde-dpmsolver++"]
SD_CFG = {k: v for k, v in SD_BASE.items() if not k.startswith("_")}


def _final_overrides(karras: bool, final: str) -> dict:
    """Karras σ end at σ_min, so with ``final_sigmas_type="sigma_min"`` the last interval is empty
    (h = 0) and diffusers' heun / third-order coefficients are 0/0 = NaN (edgediff refuses that:
    test_zero_length_last_step_refused); ``euler_at_final`` (a first-order last step, exact for
    h = 0) is what such a configuration needs."""
    return {"final_sigmas_type": final, **({"euler_at_final": True} if karras and final == "sigma_min" else {})}


def _drive_forced(diffusers_cls, ours_cls, overrides, steps, seed=0):
    """Teacher-forced comparison: every step gets diffusers' previous sample as input, so each step
    is checked on its own. Tolerance per step: the harness's 2e-5·max(1, |out|) plus 2^-22·max|in|
    (about one float32 ulp of the largest input). Returns the largest per-step |ours − diffusers|.

    Needed for zero-terminal-SNR schedules in σ-space: σ_max = 4096, the input is ~4096·N(0, 1)
    and the first step cancels it down to O(1); in diffusers' own float32 arithmetic
    σ_down = sqrt(σ_to² − σ_up²) is then about one ulp of σ_to², so any 1-ulp difference in the σ
    table (torch's float32 sqrt is not correctly rounded; numpy's is) moves the result by one ulp
    of the input (~1e-3 against an O(1) output). Free-running, that offset is carried into every
    later step; forced, each step is held to the usual tolerance plus that one input ulp.
    """
    import torch

    base = dict(SD_BASE, **overrides)
    ref = diffusers_cls.from_config(base)
    ours = ours_cls(**{k: v for k, v in base.items() if not k.startswith("_")})
    ref.set_timesteps(steps)
    schedule = ours.schedule(steps)
    assert_close_finite(schedule.timesteps, ref.timesteps.numpy().astype(np.float32), atol=1e-3)
    assert_close_finite(schedule.sigmas, ref.sigmas.numpy(), rtol=1e-5)  # rescaled ᾱ: ~2e-6
    assert abs(schedule.init_noise_sigma - float(ref.init_noise_sigma)) <= 1e-6 * schedule.init_noise_sigma
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 4, 8, 8)) * float(ref.init_noise_sigma)).astype(np.float32)
    state = ours.initial_state(schedule)
    g_ref, g_ours = torch.Generator("cpu").manual_seed(seed), TorchCPUGenerator(seed)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        xt = torch.from_numpy(x.copy())
        scaled_ref = ref.scale_model_input(xt, t).numpy()
        assert_close_finite(ours.scale_model_input(schedule, i, x), scaled_ref, rtol=2e-5, atol=2e-5)
        out = rng.standard_normal(x.shape).astype(np.float32)
        xr = ref.step(torch.from_numpy(out), t, xt, generator=g_ref).prev_sample.numpy()
        mine, state = ours.step(schedule, i, out, x, state, g_ours)
        assert mine.dtype == np.float32 and mine.shape == xr.shape
        assert np.isfinite(xr).all() and np.isfinite(mine).all(), f"step {i}: non-finite sample"
        diff = float(np.abs(mine - xr).max())
        tol = 2e-5 * max(1.0, float(np.abs(xr).max())) + 2.0**-22 * float(np.abs(x).max())
        assert diff <= tol, f"step {i} (t={float(t)}): max diff {diff} > {tol}"
        worst = max(worst, diff)
        x = xr
    assert np.isfinite(x).all(), "non-finite result"
    return worst


# -- Euler ancestral ---------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("steps,pred,spacing,seed", list(itertools.product(STEPS, PREDICTIONS, SPACINGS, SEEDS)))
def test_euler_ancestral(steps, pred, spacing, seed):
    from diffusers import EulerAncestralDiscreteScheduler

    overrides = {"prediction_type": pred, "timestep_spacing": spacing}
    drive(EulerAncestralDiscreteScheduler, overrides, steps, seed=seed, ours_cls=EulerAncestralDiscrete)


@needs_torch
@pytest.mark.parametrize(
    "steps,schedule,spacing,offset",
    list(itertools.product(STEPS, ["linear", "scaled_linear"], SPACINGS, [0, 1])),
)
def test_euler_ancestral_class_defaults(steps, schedule, spacing, offset):
    """diffusers' own defaults (beta 1e-4..0.02, steps_offset 0). Not the cosine schedule: its
    σ_max ≈ 2e4 makes σ_to² − σ_up² negative in float32 at some step counts and diffusers' step
    returns NaN (refused: test_euler_ancestral_steep_step_refused)."""
    from diffusers import EulerAncestralDiscreteScheduler

    overrides = {"beta_schedule": schedule, "timestep_spacing": spacing, "steps_offset": offset}
    drive(EulerAncestralDiscreteScheduler, overrides, steps, seed=steps, base={}, ours_cls=EulerAncestralDiscrete)


@needs_torch
@pytest.mark.parametrize("steps,pred,spacing", list(itertools.product(STEPS, PREDICTIONS, SPACINGS)))
def test_euler_ancestral_zero_snr(steps, pred, spacing):
    from diffusers import EulerAncestralDiscreteScheduler

    ours = EulerAncestralDiscrete(**SD_CFG, rescale_betas_zero_snr=True)
    assert ours.alphas_cumprod[-1] == 2.0**-24  # diffusers floors ᾱ_T for this class too
    overrides = {"prediction_type": pred, "timestep_spacing": spacing, "rescale_betas_zero_snr": True}
    _drive_forced(EulerAncestralDiscreteScheduler, EulerAncestralDiscrete, overrides, steps, seed=steps)


@needs_torch
@pytest.mark.parametrize("steps", [1, 4])
def test_euler_ancestral_draws_every_step(steps):
    """One draw per step, the last one (σ_up = 0) included: both streams end at the same place."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    g_ref, g_ours = torch.Generator("cpu").manual_seed(5), TorchCPUGenerator(5)
    ref = EulerAncestralDiscreteScheduler.from_config(SD_BASE)
    ours = EulerAncestralDiscrete(**SD_CFG)
    ref.set_timesteps(steps)
    schedule = ours.schedule(steps)
    x = np.zeros((1, 4, 8, 8), np.float32)
    xr = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        xr = ref.step(torch.zeros_like(xr), t, xr, generator=g_ref).prev_sample
        x, _ = ours.step(schedule, i, np.zeros_like(x), x, None, g_ours)
        assert_close_finite(x, xr.numpy(), atol=1e-5)
    assert_close_finite(g_ours.randn((1, 4, 8, 8)), torch.randn((1, 4, 8, 8), generator=g_ref).numpy(), atol=1e-6)


# -- DPM-Solver++ SDE, order 3, σ schedules ---------------------------------------------------


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,karras,order,solver,lower_final,final",
    [
        (s, p, sp, k, o, so, lf, f)
        for s, p, sp, k in itertools.product(STEPS, [*PREDICTIONS, "sample"], SPACINGS, [False, True])
        for o, so, lf, f in [
            (2, "midpoint", True, "zero"),
            (2, "heun", False, "sigma_min"),
            (2, "heun", True, "zero"),
            (1, "midpoint", True, "zero"),
        ]
    ],
)
def test_dpmpp_2m_sde(steps, pred, spacing, karras, order, solver, lower_final, final):
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"algorithm_type": "sde-dpmsolver++", "prediction_type": pred, "timestep_spacing": spacing,
                 "use_karras_sigmas": karras, "solver_order": order, "solver_type": solver,
                 "lower_order_final": lower_final, **_final_overrides(karras, final)}  # fmt: skip
    drive(DPMSolverMultistepScheduler, overrides, steps, seed=steps)


@needs_torch
@pytest.mark.parametrize("steps,seed,karras", list(itertools.product(STEPS, SEEDS, [False, True])))
def test_dpmpp_2m_sde_seeds(steps, seed, karras):
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": karras}
    drive(DPMSolverMultistepScheduler, overrides, steps, seed=seed)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,karras,algo,lower_final,final",
    [
        (s, p, sp, k, a, lf, f)
        for s, p, sp, k, a in itertools.product(STEPS, [*PREDICTIONS, "sample"], SPACINGS, [False, True], ALGOS)
        for lf, f in [(True, "zero"), (False, "sigma_min")]
    ],
)
def test_dpmpp_3m(steps, pred, spacing, karras, algo, lower_final, final):
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"algorithm_type": algo, "solver_order": 3, "prediction_type": pred, "timestep_spacing": spacing,
                 "use_karras_sigmas": karras, "lower_order_final": lower_final,
                 **_final_overrides(karras, final)}  # fmt: skip
    drive(DPMSolverMultistepScheduler, overrides, steps, seed=steps)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,schedule,algo,order",
    list(itertools.product(STEPS, [*PREDICTIONS, "sample"], ["exponential", "lu"], ALGOS, [1, 2, 3])),
)
def test_dpm_sigma_schedules(steps, pred, schedule, algo, order):
    from diffusers import DPMSolverMultistepScheduler

    key = "use_exponential_sigmas" if schedule == "exponential" else "use_lu_lambdas"
    overrides = {key: True, "prediction_type": pred, "algorithm_type": algo, "solver_order": order}
    drive(DPMSolverMultistepScheduler, overrides, steps, seed=order)


@needs_torch
@pytest.mark.parametrize(
    "steps,schedule,sigmas,algo",
    list(itertools.product(STEPS, ["linear", "squaredcos_cap_v2"], ["interp", "lu"], ALGOS)),
)
def test_dpm_beta_schedules(steps, schedule, sigmas, algo):
    """Lu timesteps are rounded except under the cosine schedule (then truncated to int64).
    (Karras/exponential with the cosine schedule are left out: their first two timesteps coincide
    and diffusers' step-index search then runs past the end of its own schedule.)"""
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"beta_schedule": schedule, "use_lu_lambdas": sigmas == "lu", "algorithm_type": algo}
    drive(DPMSolverMultistepScheduler, overrides, steps, base={})


@needs_torch
@pytest.mark.parametrize(
    "steps,euler_final,final,algo,order",
    list(itertools.product(STEPS, [False, True], ["zero", "sigma_min"], ALGOS, [1, 2, 3])),
)
def test_dpm_euler_at_final(steps, euler_final, final, algo, order):
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"euler_at_final": euler_final, "lower_order_final": False, "final_sigmas_type": final,
                 "algorithm_type": algo, "solver_order": order}  # fmt: skip
    drive(DPMSolverMultistepScheduler, overrides, steps)


@needs_torch
@pytest.mark.parametrize(
    "steps,spacing,pred,algo,order", list(itertools.product(STEPS, SPACINGS, PREDICTIONS, ALGOS, [2, 3]))
)
def test_dpm_zero_snr(steps, spacing, pred, algo, order):
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"rescale_betas_zero_snr": True, "timestep_spacing": spacing, "prediction_type": pred,
                 "algorithm_type": algo, "solver_order": order}  # fmt: skip
    drive(DPMSolverMultistepScheduler, overrides, steps)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,schedule,algo", list(itertools.product([50, 100], PREDICTIONS, ["interp", "karras"], ALGOS))
)
def test_dpm_3m_long(steps, pred, schedule, algo):
    """Third order over many small steps: (e^{-h} − 1 + h)/h² − ½ loses most of its float32 digits
    for small h, in diffusers as here, so a one-ulp difference in a σ (torch's float32 sqrt is not
    correctly rounded) shows; measured up to 6.3e-5·max(1, |x|) at 100 steps."""
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"solver_order": 3, "prediction_type": pred, "use_karras_sigmas": schedule == "karras",
                 "algorithm_type": algo}  # fmt: skip
    drive(DPMSolverMultistepScheduler, overrides, steps, atol=2e-4)


@needs_torch
@pytest.mark.parametrize("order,algo", list(itertools.product([1, 2, 3], ALGOS)))
def test_dpm_custom_timesteps(order, algo):
    from diffusers import DPMSolverMultistepScheduler

    overrides = {"solver_order": order, "algorithm_type": algo}
    drive(DPMSolverMultistepScheduler, overrides, timesteps=[999, 800, 600, 400, 200, 1], seed=order)


# -- Euler with exponential σ -----------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,final",
    list(itertools.product(STEPS, [*PREDICTIONS, "sample"], SPACINGS, ["zero", "sigma_min"])),
)
def test_euler_exponential(steps, pred, spacing, final):
    from diffusers import EulerDiscreteScheduler

    overrides = {"use_exponential_sigmas": True, "prediction_type": pred, "timestep_spacing": spacing,
                 "final_sigmas_type": final}  # fmt: skip
    drive(EulerDiscreteScheduler, overrides, steps)


@needs_torch
@pytest.mark.parametrize("steps,schedule", list(itertools.product(STEPS, ["scaled_linear", "squaredcos_cap_v2"])))
def test_euler_exponential_sigma_range(steps, schedule):
    """σ_min/σ_max from the config replace the ends of the schedule, as in diffusers."""
    from diffusers import EulerDiscreteScheduler

    overrides = {"use_exponential_sigmas": True, "beta_schedule": schedule, "sigma_min": 0.05, "sigma_max": 10.0}
    drive(EulerDiscreteScheduler, overrides, steps)
    drive(EulerDiscreteScheduler, {"use_exponential_sigmas": True, "beta_schedule": schedule}, steps)


# -- what diffusers turns into NaN: refused ---------------------------------------------------


@pytest.mark.parametrize("steps", [2, 3, 5, 20])
@pytest.mark.parametrize("ramp", ["use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas"])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("order,solver", [(2, "heun"), (3, "midpoint"), (3, "heun")])
def test_zero_length_last_step_refused(steps, ramp, algo, order, solver):
    """A σ ramp ends at σ_min, so final_sigmas_type="sigma_min" repeats it: a zero-length last step whose heun /
    third-order update is 0/0. Refused (NaN in diffusers, checked with torch); each suggested fix is accepted."""
    overrides = {ramp: True, "algorithm_type": algo, "solver_order": order, "solver_type": solver,
                 "final_sigmas_type": "sigma_min", "lower_order_final": False}  # fmt: skip
    if order == 3 and steps == 2:  # the second step is second order: midpoint stays finite there
        overrides["solver_type"] = "heun"
    cls = "DPMSolverMultistepScheduler"
    if HAS_TORCH:
        from diffusers import DPMSolverMultistepScheduler as cls
    msg = assert_refused_where_diffusers_breaks(cls, overrides, steps, f"{ramp}=True ends on a repeated sigma")
    assert ("third-order" in msg) == (order == 3 and steps > 2)
    fixes = [("final_sigmas_type", "zero"), ("euler_at_final", True)] + [("lower_order_final", True)] * (steps < 15)
    for key, value in fixes:
        assert f"{key}={value!r}" in msg
        if HAS_TORCH:
            drive(cls, {**overrides, key: value}, steps, seed=steps)
        else:
            DPMSolverMultistep(**SD_CFG, **{**overrides, key: value}).schedule(steps)
    assert ("lower_order_final" in msg) == (steps < 15)  # from 15 steps diffusers ignores it at the last step


@needs_torch
@pytest.mark.parametrize("steps", [3, 5])
def test_euler_ancestral_steep_step_refused(steps):
    """The cosine schedule's σ_max ≈ 2e4 before a small σ: σ_to² − σ_up² rounds below 0 (NaN in diffusers)."""
    from diffusers import EulerAncestralDiscreteScheduler

    overrides = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}
    if steps == 3:
        fragment = "too steep for float32"
        assert_refused_where_diffusers_breaks(EulerAncestralDiscreteScheduler, overrides, steps, fragment, base={})
    else:  # the same schedule at other step counts is fine, in both
        drive(EulerAncestralDiscreteScheduler, overrides, steps, base={}, ours_cls=EulerAncestralDiscrete)


# -- errors ------------------------------------------------------------------------------------


def test_noise_needs_a_generator():
    ea = EulerAncestralDiscrete(**SD_CFG)
    schedule = ea.schedule(4)
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match="generator"):
        ea.step(schedule, 0, x, x, ea.initial_state(schedule), None)
    sde = DPMSolverMultistep(**SD_CFG, algorithm_type="sde-dpmsolver++")
    schedule = sde.schedule(4)
    with pytest.raises(InvalidArgumentError, match="generator"):
        sde.step(schedule, 0, x, x, sde.initial_state(schedule), None)
    ode = DPMSolverMultistep(**SD_CFG)  # the ODE solver needs none
    schedule = ode.schedule(4)
    out, _ = ode.step(schedule, 0, x, x, ode.initial_state(schedule), None)
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    "cls,overrides",
    [
        (EulerAncestralDiscrete, {"prediction_type": "sample"}),  # diffusers: NotImplementedError
        (EulerAncestralDiscrete, {"timestep_spacing": "karras"}),
        (DPMSolverMultistep, {"algorithm_type": "dpmsolver"}),
        (DPMSolverMultistep, {"algorithm_type": "sde-dpmsolver"}),
        (DPMSolverMultistep, {"use_beta_sigmas": True}),
        (DPMSolverMultistep, {"use_flow_sigmas": True}),
        (DPMSolverMultistep, {"solver_order": 4}),
        (EulerDiscrete, {"use_beta_sigmas": True}),
    ],
)
def test_unsupported_options_raise(cls, overrides):
    with pytest.raises(InvalidArgumentError, match="not supported"):
        cls(**SD_CFG, **overrides)


@pytest.mark.parametrize("cls", [EulerDiscrete, DPMSolverMultistep])
def test_one_sigma_schedule_only(cls):
    with pytest.raises(InvalidArgumentError, match="only one of"):
        cls(**SD_CFG, use_karras_sigmas=True, use_exponential_sigmas=True)


@pytest.mark.parametrize(
    "cls,key",
    [
        (EulerDiscrete, "use_exponential_sigmas"),
        (DPMSolverMultistep, "use_exponential_sigmas"),
        (DPMSolverMultistep, "use_lu_lambdas"),
    ],
)
def test_custom_timesteps_rejected_with_sigma_schedules(cls, key):
    with pytest.raises(InvalidArgumentError, match=key):
        cls(**SD_CFG, **{key: True}).schedule(timesteps=[900, 500, 100])


def test_euler_ancestral_takes_steps_only():
    ea = EulerAncestralDiscrete(**SD_CFG)
    with pytest.raises(InvalidArgumentError, match="does not accept custom timesteps"):
        ea.schedule(timesteps=[900, 500])
    with pytest.raises(InvalidArgumentError, match="does not accept custom sigmas"):
        ea.schedule(sigmas=[14.0, 1.0, 0.0])


def test_euler_ancestral_names():
    assert EulerAncestralDiscrete.class_name == "EulerAncestralDiscreteScheduler"
    assert EulerAncestralDiscrete.short_name == "euler_a"
    assert schedulers.SCHEDULERS[EulerAncestralDiscrete.class_name] is EulerAncestralDiscrete
    assert type(schedulers.resolve("euler_a", SD_BASE)) is EulerAncestralDiscrete
