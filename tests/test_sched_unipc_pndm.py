"""UniPC multistep and PNDM's Runge-Kutta warm-up against their diffusers classes, driven with the
same model outputs and compared at every step (tolerance in scheduler_harness).

UniPC order 3 gets its own loop, ``_drive_unipc_scaled``: its coefficients come from a
φ-recursion with cancellation (g_{k+1} = g_k/h − 1/(k+1)!) and a 2×2/3×3 solve, which turn
1-ulp differences between torch's and numpy's float32 sqrt/log/expm1 (torch's CPU sqrt is not
correctly rounded here) into ~3e-5 relative differences per step. diffusers itself is that far
from a float64 run of its own code (measured 2.8e-5; ours 2.5e-5), so the order-3 tests compare
with 1e-4·max(1, max|x|) and also check we are as close to float64 as diffusers is. The same
loop serves samples that grow large (diffusers' default linear betas: |x| ~ 140), where
``drive``'s unscaled scale_model_input check (2e-5 + 2e-5·|x| per element) flags float32
rounding of the large entries on the small ones.
"""

import itertools

import numpy as np
import pytest

from conftest import needs_torch
from edgediff.runtime.errors import InvalidArgumentError
from edgediff.runtime.schedulers.pndm import PNDM
from edgediff.runtime.schedulers.unipc_multistep import UniPCMultistep
from scheduler_harness import PREDICTIONS, SD_BASE, SPACINGS, STEPS, assert_close_finite, assert_equal_finite, drive

UNIPC_PREDICTIONS = [*PREDICTIONS, "sample"]
# (solver_order, solver_type, predict_x0, lower_order_final, final_sigmas_type); every combination
# diffusers runs without NaN has a representative (see test_unipc_refuses_what_diffusers_breaks)
LOW_ORDER_VARIANTS = [
    (2, "bh2", True, True, "zero"),  # the diffusers default
    (1, "bh2", True, True, "zero"),
    (2, "bh1", True, True, "sigma_min"),
    (2, "bh2", False, True, "sigma_min"),
    (1, "bh1", False, False, "sigma_min"),
    (2, "bh1", True, False, "sigma_min"),
]
ORDER3_VARIANTS = [
    (3, "bh2", True, True, "zero"),
    (3, "bh1", False, True, "sigma_min"),
    (3, "bh2", True, False, "sigma_min"),
]


def _unipc_overrides(pred, spacing, karras, variant):
    order, solver, x0, lower_final, final = variant
    return {"prediction_type": pred, "timestep_spacing": spacing, "use_karras_sigmas": karras, "solver_order": order,
            "solver_type": solver, "predict_x0": x0, "lower_order_final": lower_final,
            "final_sigmas_type": final}  # fmt: skip


def _drive_unipc_scaled(overrides, steps, seed=0, atol=1e-4, base=None):
    """``drive`` for UniPC where it cannot be used (see module docstring): schedule equal, every
    step within ``atol·max(1, max|x|)`` of diffusers, and no further from diffusers' own float64
    run than diffusers' float32 run is (plus atol/4). Returns the largest relative difference."""
    import torch
    from diffusers import UniPCMultistepScheduler

    base = dict(SD_BASE if base is None else base, **overrides)
    ref, ref64 = UniPCMultistepScheduler.from_config(base), UniPCMultistepScheduler.from_config(base)
    ref.set_timesteps(steps)
    ref64.set_timesteps(steps)
    ref64.sigmas = ref64.sigmas.double()  # every scalar of the update in float64
    ours = UniPCMultistep(**{k: v for k, v in base.items() if not k.startswith("_")})
    schedule = ours.schedule(steps)
    assert_equal_finite(schedule.timesteps, ref.timesteps.numpy().astype(np.float32))
    assert schedule.init_noise_sigma == float(ref.init_noise_sigma)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    xr, x64 = torch.from_numpy(x.copy()), torch.from_numpy(x.astype(np.float64))
    state, worst = ours.initial_state(schedule), 0.0
    for i, t in enumerate(ref.timesteps):
        assert ours.scale_model_input(schedule, i, x) is x
        out = rng.standard_normal(x.shape).astype(np.float32)
        xr = ref.step(torch.from_numpy(out), t, xr).prev_sample
        x64 = ref64.step(torch.from_numpy(out.astype(np.float64)), t, x64).prev_sample
        x, state = ours.step(schedule, i, out, x, state)
        assert x.dtype == np.float32 and x.shape == xr.shape
        assert np.isfinite(xr.numpy()).all() and np.isfinite(x64.numpy()).all(), f"step {i}: diffusers not finite"
        assert np.isfinite(x).all(), f"step {i}: not finite"
        scale = max(1.0, float(np.abs(xr.numpy()).max()))
        diff = float(np.abs(x - xr.numpy()).max()) / scale
        assert diff <= atol, f"step {i} (t={float(t)}): {diff:.3g} > {atol}"
        ours_err = float(np.abs(x - x64.numpy()).max()) / scale
        ref_err = float(np.abs(xr.numpy() - x64.numpy()).max()) / scale
        assert ours_err <= ref_err + atol / 4, f"step {i}: float64 error {ours_err:.3g} vs diffusers {ref_err:.3g}"
        worst = max(worst, diff)
    return worst


# -- UniPC -----------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,karras,variant",
    list(itertools.product(STEPS, UNIPC_PREDICTIONS, SPACINGS, [False, True], LOW_ORDER_VARIANTS)),
)
def test_unipc(steps, pred, spacing, karras, variant):
    from diffusers import UniPCMultistepScheduler

    drive(UniPCMultistepScheduler, _unipc_overrides(pred, spacing, karras, variant), steps, ours_cls=UniPCMultistep)


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,karras,variant",
    [
        c
        for c in itertools.product(STEPS, UNIPC_PREDICTIONS, SPACINGS, [False, True], ORDER3_VARIANTS)
        if not (c[3] and c[4] == (3, "bh2", True, False, "sigma_min") and c[0] > 2)  # NaN in diffusers (refused)
    ],
)
def test_unipc_order3(steps, pred, spacing, karras, variant):
    _drive_unipc_scaled(_unipc_overrides(pred, spacing, karras, variant), steps)


@needs_torch
@pytest.mark.parametrize(
    "overrides",
    [
        {"timestep_spacing": "leading", "steps_offset": 0},
        {"disable_corrector": [0, 1, 3]},
        {"disable_corrector": [0], "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        {"rescale_betas_zero_snr": True, "use_karras_sigmas": True, "prediction_type": "v_prediction"},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "final_sigmas_type": "sigma_min"},
        # (cosine + Karras repeats t=999 at the start; diffusers then starts at index 1: not comparable)
        {"beta_schedule": "squaredcos_cap_v2"},
        {"solver_type": "midpoint"},  # a DPM-Solver config switched to UniPC: diffusers makes it bh2
        {"solver_type": "heun", "solver_order": 1},
    ],
)
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_unipc_options(overrides, steps):
    from diffusers import UniPCMultistepScheduler

    drive(UniPCMultistepScheduler, overrides, steps, ours_cls=UniPCMultistep)


@needs_torch
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_unipc_diffusers_defaults(steps, order):
    # diffusers' own defaults: linear betas 1e-4..0.02, σ_max = 157, samples grow to |x| ~ 140
    _drive_unipc_scaled({"solver_order": order}, steps, base={}, atol=2e-5 if order < 3 else 1e-4)


@needs_torch
def test_unipc_defaults_and_zero_snr_floor():
    import inspect

    from diffusers import UniPCMultistepScheduler

    params = inspect.signature(UniPCMultistepScheduler.__init__).parameters
    assert UniPCMultistep.defaults == {k: p.default for k, p in params.items() if k != "self"}
    assert UniPCMultistep.zero_snr_floor
    cfg = dict(SD_BASE, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ref = UniPCMultistepScheduler.from_config(cfg).alphas_cumprod.numpy()
    ours = UniPCMultistep(**cfg).alphas_cumprod
    assert_close_finite(ours, ref, rtol=2e-6, atol=1e-9)
    assert ours[-1] == ref[-1] == 2.0**-24


@pytest.mark.parametrize(
    "overrides",
    [
        {"thresholding": True},
        {"prediction_type": "flow_prediction"},
        {"use_flow_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"use_dynamic_shifting": True},
        {"solver_order": 4},
        {"solver_type": "bh3"},
        {"solver_p": object()},
        {"final_sigmas_type": "sigma_max"},
    ],
)
def test_unipc_unsupported_options_raise(overrides):
    with pytest.raises(InvalidArgumentError, match="not supported"):
        UniPCMultistep(**SD_BASE, **overrides)


# (overrides, steps): what diffusers turns into NaN/inf or a singular-matrix error
BROKEN_IN_DIFFUSERS = [
    ({"solver_type": "bh1"}, 4),  # B(h) = −h = −inf at σ = 0
    ({"predict_x0": False}, 4),  # σ_t·(e^h − 1) = 0·inf
    ({"lower_order_final": False}, 4),  # order-2 step onto σ = 0
    ({"lower_order_final": False, "solver_order": 3}, 7),  # singular solve
    ({"lower_order_final": False, "solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 7),
]


@pytest.mark.parametrize("overrides,steps", BROKEN_IN_DIFFUSERS)
def test_unipc_refuses_what_diffusers_breaks(overrides, steps):
    with pytest.raises(InvalidArgumentError, match=r"NaN|singular"):
        UniPCMultistep(**SD_BASE, **overrides).schedule(steps)


@needs_torch
@pytest.mark.parametrize("overrides,steps", BROKEN_IN_DIFFUSERS)
def test_unipc_refused_combinations_are_broken_in_diffusers(overrides, steps):
    import torch
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler.from_config(dict(SD_BASE, **overrides))
    ref.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    try:
        for t in ref.timesteps:
            x = ref.step(torch.randn(1, 4, 8, 8, generator=gen), t, x).prev_sample
    except RuntimeError as err:  # torch.linalg.LinAlgError
        assert "singular" in str(err)
    else:
        assert not torch.isfinite(x).all()


def test_unipc_refused_guards_depend_on_steps():
    # one step is first order, so diffusers is fine there: so are we
    UniPCMultistep(**SD_BASE, lower_order_final=False).schedule(1)
    UniPCMultistep(**SD_BASE, lower_order_final=False, solver_order=3, use_karras_sigmas=True,
                   final_sigmas_type="sigma_min").schedule(2)  # fmt: skip


def test_unipc_custom_schedules_rejected_as_in_diffusers():
    # diffusers' set_timesteps takes `sigmas` only with use_flow_sigmas (not supported) and no `timesteps`
    s = UniPCMultistep(**SD_BASE)
    with pytest.raises(InvalidArgumentError, match="custom sigmas"):
        s.schedule(sigmas=[14.6, 3.0, 0.0])
    with pytest.raises(InvalidArgumentError, match="custom timesteps"):
        s.schedule(timesteps=[999, 500])


def test_unipc_step_is_pure():
    s = UniPCMultistep(**SD_BASE, solver_order=3)
    schedule = s.schedule(10)
    rng = np.random.default_rng(0)
    x, state = rng.standard_normal((1, 4, 8, 8)).astype(np.float32), s.initial_state(schedule)
    for i in range(4):
        x, state = s.step(schedule, i, rng.standard_normal(x.shape).astype(np.float32), x, state)
    out = rng.standard_normal(x.shape).astype(np.float32)
    kept = [m.copy() for m in state.model_outputs], state.last_sample.copy()
    a, state_a = s.step(schedule, 4, out, x, state)
    b, state_b = s.step(schedule, 4, out, x, state)
    assert_equal_finite(a, b)
    assert all(np.array_equal(m, k) for m, k in zip(state.model_outputs, kept[0]))
    assert_equal_finite(state.last_sample, kept[1])
    assert state_a.this_order == state_b.this_order == 3 and len(state_a.model_outputs) == 3
    assert a.dtype == np.float32 and schedule.timesteps.dtype == np.float32 and schedule.sigmas.dtype == np.float32


# -- PNDM with the Runge-Kutta warm-up ---------------------------------------------------------
PRK_STEPS = [4, 5, 7, 20]  # diffusers' PRK schedule needs >= 4 steps


@needs_torch
@pytest.mark.parametrize(
    "steps,pred,spacing,prk,offset",
    list(itertools.product(PRK_STEPS, PREDICTIONS, SPACINGS, [True, False], [0, 1])),
)
def test_pndm_prk(steps, pred, spacing, prk, offset):
    from diffusers import PNDMScheduler

    overrides = {"prediction_type": pred, "timestep_spacing": spacing, "skip_prk_steps": not prk,
                 "steps_offset": offset}  # fmt: skip
    drive(PNDMScheduler, overrides, steps)


@needs_torch
@pytest.mark.parametrize("steps", [4, 20])
def test_pndm_prk_class_defaults(steps):
    from diffusers import PNDMScheduler

    drive(PNDMScheduler, {}, steps, base={})  # diffusers' own defaults: skip_prk_steps=False
    drive(PNDMScheduler, {"skip_prk_steps": False, "set_alpha_to_one": True}, steps)


def test_pndm_prk_schedule():
    s = PNDM(**dict(SD_BASE, skip_prk_steps=False))
    schedule = s.schedule(4)  # leading + 1: 1, 251, 501, 751; δ = 125
    assert schedule.timesteps.tolist() == [751, 626, 626, 501, 501, 376, 376, 251, 251, 126, 126, 1, 1]
    assert len(s.schedule(20).timesteps) == 20 + 9
    assert len(PNDM(**SD_BASE).schedule(20).timesteps) == 20 + 1


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_prk_needs_four_steps(steps):
    with pytest.raises(InvalidArgumentError, match=">= 4"):
        PNDM(**dict(SD_BASE, skip_prk_steps=False)).schedule(steps)
    PNDM(**SD_BASE).schedule(steps)  # PLMS alone is fine


@needs_torch
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_prk_below_four_steps_fails_in_diffusers(steps):
    from diffusers import PNDMScheduler

    with pytest.raises(ValueError):
        PNDMScheduler.from_config(dict(SD_BASE, skip_prk_steps=False)).set_timesteps(steps)
