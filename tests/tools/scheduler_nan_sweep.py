"""Where diffusers' schedulers return non-finite samples: every scheduler class edgediff implements, over
the cross product of its options that change the numbers, at 1, 2, 3, 5, 10 and 25 steps (PyTorch side;
needs the export extra, takes about 8 minutes on two cores, so it is not part of the test suite).

    python tests/tools/scheduler_nan_sweep.py           # writes benchmarks/results/scheduler_nan_sweep.{json,md}
    python tests/tools/scheduler_nan_sweep.py NAME...   # those classes only, printed, nothing written

Each configuration runs in diffusers with stand-in model outputs (a fixed seeded stream, the same for every
configuration) and, where edgediff accepts it, in edgediff teacher-forced: every step starts from
diffusers' previous sample, so each step is compared on its own. The JSON holds one character per
configuration, in ``cases(name)`` order, for diffusers (``.`` finite, ``N`` NaN/inf at some step, ``E``
raises: its own refusal or a crash, outside the NaN question) and for edgediff (``verdict``);
tests/test_scheduler_nan_sweep.py checks edgediff against it. Configurations are built from option groups
(``GRIDS``) that leave out combinations giving the same numbers twice (``steps_offset`` outside ``leading``
spacing, ``solver_type`` at order 1, spacing under a σ ramp, ...).
"""

from __future__ import annotations

import itertools
import json
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from scheduler_harness import SD_BASE  # noqa: E402 (after the sys.path insert above)

RESULTS = ROOT / "benchmarks/results"
STEPS = (1, 2, 3, 5, 10, 25)
SHAPE = (1, 4, 4, 4)
SEED = 0
# per-step tolerance of the teacher-forced comparison, relative to max(1, max|out|), plus one float32 ulp
# of the step's input (see test_sched_ancestral_sde._drive_forced)
ATOL = 2e-5

SD_CFG = {k: v for k, v in SD_BASE.items() if not k.startswith("_")}
# the training schedules: SD 1.x/2.x's, the class's own defaults, the cosine schedule
BASES = {"sd": SD_CFG, "default": {}, "cosine": {"beta_schedule": "squaredcos_cap_v2"}}
SPACINGS = [
    {"timestep_spacing": "linspace"}, {"timestep_spacing": "trailing"},
    {"timestep_spacing": "leading", "steps_offset": 0}, {"timestep_spacing": "leading", "steps_offset": 1},
]  # fmt: skip


def _opt(key, values):
    return [{key: v} for v in values]


PRED3 = _opt("prediction_type", ["epsilon", "v_prediction", "sample"])
PRED2 = _opt("prediction_type", ["epsilon", "v_prediction"])
ZSNR = _opt("rescale_betas_zero_snr", [False, True])
CLIP = _opt("clip_sample", [False, True])
ALPHA_ONE = _opt("set_alpha_to_one", [False, True])
FINALS = _opt("final_sigmas_type", ["zero", "sigma_min"])

# class -> option groups; a configuration is one choice from each group, merged over BASES[base]
# fmt: off
GRIDS: dict[str, list[list[dict]]] = {
    "PNDMScheduler": [SPACINGS, PRED2, _opt("skip_prk_steps", [True, False]), ALPHA_ONE],
    "DDIMScheduler": [SPACINGS, PRED3, CLIP, ALPHA_ONE, ZSNR, _opt("eta", [0.0, 0.5, 1.0])],
    "DDPMScheduler": [SPACINGS, PRED3, _opt("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"]),
                      CLIP, ZSNR],
    "LMSDiscreteScheduler": [SPACINGS, PRED3, _opt("use_karras_sigmas", [False, True])],
    "EulerDiscreteScheduler": [
        SPACINGS, PRED3, [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}], FINALS, ZSNR,
    ],
    "EulerAncestralDiscreteScheduler": [SPACINGS, PRED2, ZSNR],
    "HeunDiscreteScheduler": [SPACINGS, PRED3, _opt("use_karras_sigmas", [False, True]), CLIP],
    "DPMSolverMultistepScheduler": [
        # the ramps ignore timestep_spacing / steps_offset (their σ span the whole table)
        SPACINGS + [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_lu_lambdas": True}],
        _opt("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"]),
        [{"solver_order": 1}] + [{"solver_order": o, "solver_type": s, "lower_order_final": lf}
                                 for o in (2, 3) for s in ("midpoint", "heun") for lf in (True, False)],
        # euler_at_final only changes a last step onto σ_min (onto 0 the last step is first order anyway)
        [{"final_sigmas_type": "zero"}, {"final_sigmas_type": "sigma_min"},
         {"final_sigmas_type": "sigma_min", "euler_at_final": True}],
        PRED3, ZSNR,
    ],
    "UniPCMultistepScheduler": [
        SPACINGS + [{"use_karras_sigmas": True}],
        [{"solver_order": 1, "solver_type": s, "predict_x0": x0} for s in ("bh1", "bh2") for x0 in (True, False)]
        + [{"solver_order": o, "solver_type": s, "predict_x0": x0, "lower_order_final": lf}
           for o in (2, 3) for s in ("bh1", "bh2") for x0 in (True, False) for lf in (True, False)],
        FINALS, PRED3, ZSNR,
    ],
    "LCMScheduler": [PRED3, CLIP, ZSNR, _opt("original_inference_steps", [50, 4])],
}
# fmt: on


def cases(name: str) -> list[tuple[str, dict, int]]:
    """(base, overrides, steps) of every configuration of ``name``, in a fixed order."""
    out = []
    for base in BASES:
        for choice in itertools.product(*GRIDS[name]):
            overrides = {k: v for part in choice for k, v in part.items()}
            out += [(base, overrides, n) for n in STEPS]
    return out


def config(name: str, base: str, overrides: dict) -> dict:
    """The scheduler dict for edgediff's ``schedulers.resolve`` (``eta`` included where swept)."""
    return {**BASES[base], **overrides, "_class_name": name}


def stand_ins(n_calls: int, init_sigma: float):
    rng = np.random.default_rng(SEED)
    x = (rng.standard_normal(SHAPE) * init_sigma).astype(np.float32)
    return x, [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n_calls)]


def run_diffusers(name: str, base: str, overrides: dict, steps: int, inputs=None):
    """('.', samples) finite, ('N', samples) non-finite (samples up to the first bad one), ('E', message).
    With ``inputs`` (a float32 run's samples) diffusers' own code runs in float64 (every float tensor of the
    scheduler cast up: its arithmetic, not its float32 tables), each step from the float32 run's sample."""
    import inspect

    import diffusers
    import torch

    cfg = {**BASES[base], **{k: v for k, v in overrides.items() if k != "eta"}}
    dtype = torch.float32 if inputs is None else torch.float64
    try:
        ref = getattr(diffusers, name).from_config(cfg)
        ref.set_timesteps(steps)
        for key, value in vars(ref).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(ref, key, value.to(dtype))
        x, outs = stand_ins(len(ref.timesteps), float(ref.init_noise_sigma))
        xr, samples = torch.from_numpy(x).to(dtype), [x]
        accepted = inspect.signature(ref.step).parameters
        kwargs = {"eta": overrides["eta"]} if "eta" in overrides else {}
        if "generator" in accepted:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(SEED)
        for i, (t, out) in enumerate(zip(ref.timesteps, outs)):
            if inputs is not None:
                xr = torch.from_numpy(inputs[i]).to(dtype)
            scaled = ref.scale_model_input(xr, t)
            if not torch.isfinite(scaled).all():
                return "N", samples
            xr = ref.step(torch.from_numpy(out).to(dtype), t, xr, **kwargs).prev_sample
            samples.append(xr.numpy().copy())
            if not torch.isfinite(xr).all():
                return "N", samples
    except Exception as e:
        return "E", f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
    return ".", samples


def _resolve(name: str, base: str, overrides: dict, table=None):
    from edgediff.runtime import schedulers

    sched = schedulers.resolve(config(name, base, overrides), {})
    if table is not None:  # diffusers' own ᾱ table (see run_edgediff)
        sched.alphas_cumprod = table
        if hasattr(sched, "final_alpha_cumprod"):
            sched.final_alpha_cumprod = np.float32(1.0) if sched.config["set_alpha_to_one"] else table[0]
    return sched


def diffusers_table(name: str, base: str, overrides: dict) -> np.ndarray:
    import diffusers

    cfg = {**BASES[base], **{k: v for k, v in overrides.items() if k != "eta"}}
    return getattr(diffusers, name).from_config(cfg).alphas_cumprod.numpy().copy()


def run_edgediff(name: str, base: str, overrides: dict, steps: int, samples=None, table=None, exact=None):
    """('refused', message) or ('accepted', x). With diffusers' ``samples`` each step starts from diffusers'
    previous sample (teacher-forced) and x is the worst per-step excess over the tolerance (<= 0: matching;
    inf: non-finite); without them the run is free and x says whether every sample is finite. ``table``
    replaces edgediff's ᾱ table (diffusers' own, for telling the step from the table). With ``exact`` (diffusers'
    float64 run from the same inputs) x compares edgediff's worst error against that run with twice diffusers'
    own (<= 0: ill-conditioned steps, float32 noise on both sides, edgediff's no worse than diffusers')."""
    from edgediff.runtime.errors import InvalidArgumentError
    from edgediff.runtime.rng import TorchCPUGenerator

    try:
        sched = _resolve(name, base, overrides, table)
        schedule = sched.schedule(steps)
    except InvalidArgumentError as e:
        return "refused", str(e)
    x, outs = stand_ins(len(schedule.timesteps), schedule.init_noise_sigma)
    state, gen = sched.initial_state(schedule), TorchCPUGenerator(SEED)
    worst, ref_error = -np.inf, 0.0
    with np.errstate(all="ignore"):
        for i, out in enumerate(outs):
            x_in = x if samples is None else samples[i]
            sched.scale_model_input(schedule, i, x_in)
            x, state = sched.step(schedule, i, out, x_in, state, gen)
            if not np.isfinite(x).all():
                return "accepted", (False if samples is None else np.inf)
            if samples is not None:
                want = samples[i + 1]
                tol = ATOL * max(1.0, float(np.abs(want).max())) + 2.0**-22 * float(np.abs(x_in).max())
                if exact is None:
                    worst = max(worst, float(np.abs(x - want).max()) - tol)
                else:  # edgediff's error against float64, less twice diffusers' own (worst over the steps)
                    worst = max(worst, float(np.abs(x - exact[i + 1]).max()) - tol)
                    ref_error = max(ref_error, float(np.abs(want - exact[i + 1]).max()))
    return "accepted", (True if samples is None else worst - 2 * ref_error)


# edgediff's verdict, one character per configuration:
#   r  refused                     a  accepted, matches diffusers step by step
#   t  accepted, matches once given diffusers' ᾱ table (the tables differ: torch's float32 sqrt, zero-SNR rescaling)
#   p  accepted, ill-conditioned steps differ, but edgediff's error against diffusers' float64 run is at most twice
#      diffusers' own float32 error (plus the tolerance)
#   m  accepted, does not match (the worst excess is in the Markdown table)
#   f  accepted where diffusers raises; every sample finite      x  accepted, a non-finite sample
def verdict(name: str, base: str, overrides: dict, steps: int) -> tuple[str, str, object]:
    """(diffusers outcome, edgediff verdict, detail: edgediff's refusal / diffusers' error / the worst excess)."""
    kind, data = run_diffusers(name, base, overrides, steps)
    if kind == "E":
        v, d = run_edgediff(name, base, overrides, steps)
        return kind, "r" if v == "refused" else ("f" if d else "x"), data
    v, d = run_edgediff(name, base, overrides, steps, data if kind == "." else None)
    if v == "refused":
        return kind, "r", d
    if kind == "N":
        return kind, "x" if d is False else "f", None
    if d <= 0:
        return kind, "a", d
    table = diffusers_table(name, base, overrides)
    if not np.array_equal(table, _resolve(name, base, overrides).alphas_cumprod):
        if run_edgediff(name, base, overrides, steps, data, table)[1] <= 0:
            return kind, "t", d
    else:
        table = None
    kind64, data64 = run_diffusers(name, base, overrides, steps, inputs=data)
    if kind64 == "." and run_edgediff(name, base, overrides, steps, data, table, data64)[1] <= 0:
        return kind, "p", d
    return kind, "m", d


def sweep(names=None, log=print) -> dict:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    results = {}
    for name in names or GRIDS:
        start = time.time()
        rows = [verdict(name, *case) for case in cases(name)]
        results[name] = rows
        log(f"{name}: {len(rows)} configs, {dict(Counter(k + v for k, v, _ in rows))}, {time.time() - start:.0f}s")
    return results


def _summary(rows) -> dict:
    c = Counter(k + v for k, v, _ in rows)
    return {
        "configs": len(rows),
        "diffusers non-finite": sum(v for k, v in c.items() if k[0] == "N"),
        "of those refused": c["Nr"],
        "diffusers finite": sum(v for k, v in c.items() if k[0] == "."),
        "finite, refused": c[".r"],
        "finite, matched": c[".a"],
        "matched with diffusers' table": c[".t"],
        "as exact as diffusers": c[".p"],
        "not matched": c[".m"],
        "diffusers raises": sum(v for k, v in c.items() if k[0] == "E"),
        "raises, refused": c["Er"],
        "raises, accepted (finite)": c["Ef"],
    }


def _rule(message: str) -> str:
    """A message with its numbers (not those inside names: float32, sigma_t^2) elided, to group configurations."""
    return re.sub(r"(?<![\w^.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?(?!\w)", "…", message)


def write(results: dict) -> None:
    import diffusers
    import torch

    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version()}  # fmt: skip
    classes = {n: {"configs": len(rows), "diffusers": "".join(k for k, _, _ in rows),
                   "edgediff": "".join(v for _, v, _ in rows)} for n, rows in results.items()}  # fmt: skip
    table = {"versions": versions, "steps": list(STEPS), "shape": list(SHAPE), "seed": SEED, "classes": classes}
    (RESULTS / "scheduler_nan_sweep.json").write_text(json.dumps(table, indent=1) + "\n")
    heads = list(_summary([]))
    lines = [
        "# Where diffusers' schedulers go non-finite, and what edgediff does there",
        "",
        "`python tests/tools/scheduler_nan_sweep.py` (" + ", ".join(f"{k} {v}" for k, v in versions.items()) + "). "
        "Every class edgediff implements over the cross product of its options (`GRIDS` there) on three training "
        f"schedules (SD's scaled_linear, the class defaults, cosine) at {', '.join(map(str, STEPS))} steps, driven "
        f"with stand-in model outputs (seeded normal, shape {SHAPE}). Where both run, edgediff is compared "
        f"teacher-forced, step by step, within {ATOL:g}·max(1, max|out|) plus one float32 ulp of the input. "
        "tests/test_scheduler_nan_sweep.py checks this table (benchmarks/results/scheduler_nan_sweep.json).",
        "",
        "| class | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    totals = Counter()
    for name, rows in results.items():
        s = _summary(rows)
        totals.update(s)
        lines.append(f"| {name} | " + " | ".join(str(s[h]) for h in heads) + " |")
    lines.append("| **all** | " + " | ".join(f"**{totals[h]}**" for h in heads) + " |")
    lines += [
        "",
        "Reading it: *finite, refused* are DDIM configurations at eta=1 where 1 − ᾱ_prev − σ_t² is within float32 "
        "rounding of 0 (ᾱ_t ≈ 0: zero-SNR or cosine schedules): one ulp of torch's scalar sqrt decides between NaN "
        "(the *non-finite* ones of the same rule) and noise, so edgediff refuses the whole zone. *Matched with "
        "diffusers' table*: edgediff's ᾱ table differs from diffusers' (zero-SNR rescaling: torch's float32 sqrt is "
        "one ulp off in about 20% of values), and ill-conditioned steps (σ up to 4096) amplify that; given "
        "diffusers' table, every step matches. *As exact as diffusers*: ill-conditioned steps (cancellation of "
        "terms ~1e4 times the result: PNDM and DDIM on the cosine schedule, UniPC's noise-prediction form or order "
        "3 on zero-SNR / cosine schedules) where edgediff's error against diffusers' own code run in float64 is at "
        "most twice diffusers' float32 error. *Not matched*: the same, where edgediff's error is two to three "
        "times diffusers' (both are float32 noise of the cancelling terms). *Raises, accepted*: diffusers' "
        "step-index search starts at the second of two equal leading timesteps (Karras / exponential σ near "
        "σ_max = 4096 or on the cosine schedule round to the same timestep) and runs past its schedule; edgediff "
        "indexes steps by position and runs them finite.",
    ]
    lines += ["", "## Non-finite in diffusers: the edgediff rule that refuses them", ""]
    groups = Counter()
    for name, rows in results.items():
        for k, v, d in rows:
            if k == "N":
                groups[(name, _rule(d.split(": ", 1)[-1]) if v == "r" else "NOT REFUSED")] += 1
    lines += [f"- {name}, {count} configs: {why}" for (name, why), count in sorted(groups.items())]
    lines += ["", "## diffusers raises (its own refusal or a crash; not a NaN question)", ""]
    groups = Counter()
    for name, rows in results.items():
        for k, v, d in rows:
            if k == "E":
                groups[(name, _rule(d), {"r": "refused", "f": "runs, finite", "x": "runs, NON-FINITE"}[v])] += 1
    lines += [f"- {name}, {count} configs: `{msg}`; edgediff: {v}" for (name, msg, v), count in sorted(groups.items())]
    lines += ["", "## Finite in diffusers but not matched step by step", ""]
    groups, worst = Counter(), {}
    for name, rows in results.items():
        for (base, overrides, _steps), (_k, v, d) in zip(cases(name), rows):
            if v == "m":
                key = (name, base, bool(overrides.get("rescale_betas_zero_snr")))
                groups[key] += 1
                worst[key] = max(worst.get(key, 0.0), d)
    for (name, base, z), count in sorted(groups.items()):
        lines.append(f"- {name}, {base} schedule{', zero SNR' if z else ''}: {count} configs, worst excess "
                     f"{worst[(name, base, z)]:.3g}·max(1, max|out|)")  # fmt: skip
    (RESULTS / "scheduler_nan_sweep.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    results = sweep(argv or None)
    if argv:  # a partial run prints, never overwrites the committed table
        for name, rows in results.items():
            print(name, _summary(rows))
        return 0
    write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
