"""The NaN sweep's table (benchmarks/results/scheduler_nan_sweep.json, written by
tests/tools/scheduler_nan_sweep.py): edgediff refuses every configuration where diffusers returns NaN/inf,
and accepts the ones where diffusers is finite, matching it step by step.

Torch-free: every configuration of the table (refused exactly where the table says, and never where
diffusers is finite except by the one documented rule), a subset run for finiteness. With torch: a
representative subset re-run in diffusers and compared (the table still describes this diffusers).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import needs_torch
from edgediff.runtime.errors import InvalidArgumentError
from edgediff.runtime.schedulers import SCHEDULERS
from tools.scheduler_nan_sweep import GRIDS, RESULTS, _resolve, cases, run_edgediff, verdict

TABLE = json.loads((RESULTS / "scheduler_nan_sweep.json").read_text())["classes"]
NAMES = list(GRIDS)
# The one refusal of configurations diffusers happens to run finite: DDIM at eta=1 where 1 − ᾱ_prev − σ_t² is
# within float32 rounding of 0, and one ulp of torch's sqrt decides between NaN and noise (ddim._check_direction).
ROUNDING_ZONE = "within float32 rounding of 0"
# edgediff verdicts that mean "accepted and matching" (see the tool: a, t, p)
MATCHING = set("atp")


def _table(name: str) -> list[tuple]:
    entry = TABLE[name]
    rows = list(zip(cases(name), entry["diffusers"], entry["edgediff"]))
    assert len(rows) == entry["configs"] == len(entry["diffusers"]) == len(entry["edgediff"])
    return rows


def _refusals(name: str) -> list[str | None]:
    """edgediff's refusal (message) or None for every configuration of ``name``, one construction per config."""
    out, built = [], {}
    for base, overrides, steps in cases(name):
        key = (base, tuple(overrides.items()))
        if key not in built:
            try:
                built[key] = _resolve(name, base, overrides)
            except InvalidArgumentError as e:
                built[key] = str(e)
        sched = built[key]
        if isinstance(sched, str):
            out.append(sched)
            continue
        try:
            sched.schedule(steps)
            out.append(None)
        except InvalidArgumentError as e:
            out.append(str(e))
    return out


def _subset(rows, per_class: int) -> list[int]:
    """Indices: an even stride over the table plus the first three of every (diffusers, edgediff) outcome."""
    stride = max(1, len(rows) // per_class)
    chosen, seen = set(range(0, len(rows), stride)), Counter()
    for i, (_, k, v) in enumerate(rows):
        if seen[k + v] < 3:
            chosen.add(i)
            seen[k + v] += 1
    return sorted(chosen)


def test_every_class_is_swept():
    assert set(TABLE) == set(SCHEDULERS) == set(GRIDS)
    for name in NAMES:
        assert TABLE[name]["configs"] == len(cases(name)), f"{name}: re-run tests/tools/scheduler_nan_sweep.py"


@pytest.mark.parametrize("name", NAMES)
def test_refused_exactly_where_the_table_says(name):
    rows = _table(name)
    for ((base, overrides, steps), k, v), message in zip(rows, _refusals(name)):
        where = f"{name} {base} {overrides} at {steps} steps"
        assert (message is not None) == (v == "r"), f"{where}: table says {v!r}, edgediff says {message!r}"
        if k == "N":  # diffusers returns NaN/inf: refused, saying why
            assert message is not None and "NaN" in message, f"{where}: NaN in diffusers, accepted"
        elif k == "." and message is not None:
            assert ROUNDING_ZONE in message, f"{where}: finite in diffusers, refused: {message}"


@pytest.mark.parametrize("name", NAMES)
def test_table_counts(name):
    """Every NaN of diffusers is refused; the only finite refusals are DDIM's rounding zone; what does not match is
    listed in the Markdown table (UniPC's noise-prediction form, mostly on zero-SNR / cosine schedules: float32
    noise of cancelling terms on both sides)."""
    rows = _table(name)
    c = Counter(k + v for _, k, v in rows)
    assert not {code for code in c if code[0] == "N" and code != "Nr"}, c
    assert c[".r"] == 0 or name == "DDIMScheduler", c
    assert not {code for code in c if code[1] == "x"}, c  # edgediff never non-finite where it accepts
    for (base, overrides, steps), _, v in rows:
        if v == "m":  # only UniPC's noise-prediction form, whose steps cancel terms ~1e3 times the result
            assert name == "UniPCMultistepScheduler" and not overrides["predict_x0"], (base, overrides, steps)


@pytest.mark.parametrize("name", NAMES)
def test_accepted_configs_run_finite(name):
    rows = _table(name)
    for i in _subset(rows, 60):
        (base, overrides, steps), _, v = rows[i]
        if v != "r":
            assert run_edgediff(name, base, overrides, steps) == ("accepted", True), (name, base, overrides, steps)


@needs_torch
@pytest.mark.parametrize("name", NAMES)
def test_subset_against_diffusers(name):
    """diffusers' outcome and edgediff's verdict, live, on a representative subset: NaN in diffusers where the
    table says so (the oracle justifies each refusal), and step-by-step agreement where it is finite."""
    rows = _table(name)
    for i in _subset(rows, 40):
        (base, overrides, steps), k, v = rows[i]
        k_now, v_now, detail = verdict(name, base, overrides, steps)
        where = f"{name} {base} {overrides} at {steps} steps"
        assert k_now == k, f"{where}: diffusers gives {k_now!r}, the table {k!r} (re-run the sweep?)"
        if k == "." and v != "m" and v != "r":
            assert v_now in MATCHING, f"{where}: {v_now!r} (worst excess {detail})"
        else:
            assert v_now == v, f"{where}: {v_now!r}, the table {v!r}"


def test_markdown_table_is_committed():
    text = (RESULTS / "scheduler_nan_sweep.md").read_text()
    assert "| **all** |" in text and all(name in text for name in NAMES)
    assert Path(RESULTS / "scheduler_nan_sweep.json").stat().st_size < 400_000
