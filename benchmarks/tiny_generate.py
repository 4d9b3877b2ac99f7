"""One tiny generate, timed two ways: inside the pipeline and as a whole `edgediff generate` process.

    python benchmarks/tiny_generate.py [--runs 10] [--steps 20]

Model: the committed ``tests/fixtures/micro-sd1`` (32×32, PNDM, random weights; no torch needed).
Pipeline: ``edgediff bench``'s protocol (1 cold + 1 warm-up + ``--runs`` timed), median per stage.
Process: ``--runs`` runs of ``edgediff generate PROMPT --model micro-sd1 --steps N -o tmp.png`` in a
fresh process each (interpreter start, imports, load, generate, PNG write), wall-clock median.
The load average before and after is recorded: on a shared machine it says how far to trust the
times. Writes ``benchmarks/results/tiny_generate.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = HERE.parent / "tests" / "fixtures" / "micro-sd1"
PROMPT = "a red circle on a blue background"


def process_seconds(steps: int, runs: int) -> list[float]:
    exe = shutil.which("edgediff", path=str(Path(sys.executable).parent)) or shutil.which("edgediff")
    if exe is None:
        raise SystemExit("error: no `edgediff` command beside this Python or on PATH; pip install -e . first")
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [exe, "generate", PROMPT, "--model", str(MODEL), "--steps", str(steps), "-o", str(Path(tmp) / "x.png")]
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            seconds.append(time.perf_counter() - t0)
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import numpy as np

    from edgediff.runtime.bench import machine_info, run_bench
    from edgediff.runtime.model_folder import sha256_file
    from provenance import command_and_date

    load_before = os.getloadavg()
    bench = run_bench(MODEL, prompt=PROMPT, steps=args.steps, warmup=1, runs=args.runs, flops=False)
    proc = process_seconds(args.steps, args.runs)
    report = {
        "machine": machine_info(),
        **command_and_date(__file__, argv),
        "model": "tests/fixtures/micro-sd1",
        "model_manifest_sha256": sha256_file(MODEL / "edgediff.json"),
        "settings": {
            "steps": args.steps,
            "unet_calls": bench["settings"]["steps"],  # PNDM: one more than steps (its first PLMS step)
            **{k: bench["settings"][k] for k in ("width", "height", "scheduler", "guidance", "runs")},
        },
        "pipeline_total_s": bench["stages"]["total"],
        "pipeline_stages_median_s": {k: v["median"] for k, v in bench["stages"].items() if v["n"]},
        "process_s": {"median": float(np.median(proc)), "min": min(proc), "max": max(proc), "all": proc},
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tiny_generate.json").write_text(json.dumps(report, indent=1) + "\n")
    m, s, tot = report["machine"], report["settings"], report["pipeline_total_s"]
    load = report["load_average_1min"]
    setup = (
        f"`{report['command']}` on {report['date']}, {m['cpu']} ({m['usable_cpus']} CPUs), onnxruntime "
        f"{m['libraries'].get('onnxruntime')}; model `{report['model']}`, {s['width']}×{s['height']}, {s['steps']} "
        f"steps {s['scheduler']} ({s['unet_calls']} UNet calls), guidance {s['guidance']}; load average (1 min) "
        f"{load['before']:.2f} before, {load['after']:.2f} after."
    )
    rows = [
        ("pipeline call (prompt in, PNG bytes out)", tot["median"], tot["min"], tot["max"], tot["n"]),
        ("whole `edgediff generate` process", report["process_s"]["median"], min(proc), max(proc), len(proc)),
    ]
    lines = ["# One tiny generate", "", setup, "", "| measure | median | min | max | runs |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {med:.3f} s | {lo:.3f} s | {hi:.3f} s | {n} |" for label, med, lo, hi, n in rows]
    lines.append("")
    (RESULTS / "tiny_generate.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
