"""The GPU check, in one command, for a machine with an NVIDIA GPU (under 8 minutes on a data-centre card):

    python benchmarks/gpu_check.py                     # uses what is installed
    python benchmarks/gpu_check.py --wheels /wheels    # first installs what is missing from those wheels (offline)

1. installs what is missing (torch, diffusers, transformers, onnxruntime-gpu, onnx, edgediff itself without
   dependencies) from ``--wheels`` with ``pip --no-index`` (the GPU machines reach no package index);
2. runs ``pytest -m "gpu or tensorrt"`` (the tests that skip on CPU machines) and records the outcome;
3. builds the random-weight SD 1.5-architecture model (``full_size_models.py``) and exports it with ``--fp16``;
4. times diffusers fp16 on CUDA (PyTorch, ``torch_dtype=float16``) against edgediff on ONNX Runtime's CUDA
   provider on the fp16 export: 512 px, 20 steps DPM++ 2M, guidance 7.5, batch 1 (UNet batch 2), one
   warm-up image and ``--runs`` timed images each; every UNet call timed (CUDA-synchronised for torch);
5. reports per UNet call, end to end, and the UNet's achieved TFLOP/s (FLOPs counted on the ONNX graph)
   against the card's dense fp16 tensor-core peak (a table of published figures; ``--peak-tflops`` overrides),
   plus the image difference between the two, to ``benchmarks/results/gpu_check.{json,md}``.

Each timed contender runs in its own process (``--worker``), so one's CUDA memory and caches do not help the
other. ``--budget`` (seconds, default 480) stops before a stage that would not fit and says which did not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PROMPT = "a photograph of an astronaut riding a horse"
# Dense fp16 tensor-core TFLOP/s (fp32 accumulate where the vendor states both; no sparsity), by name substring.
PEAK_FP16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0,
    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "T4": 65.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0,
}  # fmt: skip
NEEDED = {  # import name -> distribution to install from --wheels when missing
    "torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "onnx": "onnx",
    "onnxruntime": "onnxruntime-gpu", "safetensors": "safetensors", "pytest": "pytest", "sympy": "sympy",
}  # fmt: skip


def peak_tflops(gpu_name: str | None) -> float | None:
    """The published dense fp16 peak of the card whose name contains a table key (the longest match wins)."""
    if not gpu_name:
        return None
    matches = [k for k in PEAK_FP16_TFLOPS if k.lower() in gpu_name.lower()]
    return PEAK_FP16_TFLOPS[max(matches, key=len)] if matches else None


def install(wheels: Path | None) -> list[str]:
    """pip-install the missing distributions from ``wheels`` (offline); returns what was installed."""
    missing = [dist for mod, dist in NEEDED.items() if importlib.util.find_spec(mod) is None]
    done = []
    if missing and wheels is None:
        raise SystemExit(f"missing {missing}: give --wheels DIR holding their wheels (no index is reachable here)")
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), *missing]
        subprocess.run(cmd, check=True)
        done += missing
    if importlib.util.find_spec("edgediff") is None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)]
        subprocess.run(cmd, check=True)
        done.append("edgediff (editable, no dependencies)")
    return done


def run_gpu_tests(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu or tensorrt", "-p", "no:cacheprovider", "-rs"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "outcome": f"timed out after {timeout:.0f} s"}
    tail = proc.stdout.strip().splitlines()[-15:]
    return {"command": " ".join(cmd), "returncode": proc.returncode, "seconds": time.time() - t0, "tail": tail}


# ------------------------------------------------------------------------------------------- workers
def _worker(args) -> dict:
    import numpy as np

    calls: list[float] = []
    if args.worker == "diffusers":
        import diffusers
        import torch

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.source, torch_dtype=torch.float16,
                                                                 safety_checker=None, requires_safety_checker=False,
                                                                 local_files_only=True).to("cuda")  # fmt: skip
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        forward = pipe.unet.forward

        def timed(*a, **k):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = forward(*a, **k)
            torch.cuda.synchronize()
            calls.append(time.perf_counter() - t0)
            return out

        pipe.unet.forward = timed

        def generate(seed):
            g = torch.Generator("cpu").manual_seed(seed)
            with torch.inference_mode():
                return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.size,
                            height=args.size, generator=g).images[0]  # fmt: skip
    else:
        from edgediff.runtime import Pipeline

        pipe = Pipeline.load(args.folder, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                             memory_limit=None)  # fmt: skip

        def generate(seed):
            r = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.size,
                     height=args.size, seed=seed, scheduler="dpmpp_2m")  # fmt: skip
            calls.extend(r.unet_calls)
            return r.images[0]

    runs = []
    image = None
    for _i in range(1 + args.runs):
        before = len(calls)
        t0 = time.perf_counter()
        image = generate(0)
        runs.append({"end_to_end": time.perf_counter() - t0, "calls": calls[before:]})
    image.save(Path(args.tmp) / f"{args.worker}.png")
    timed_runs = runs[1:] or runs
    unet = [c for r in timed_runs for c in r["calls"]]
    return {"contender": args.worker, "end_to_end_median_s": float(np.median([r["end_to_end"] for r in timed_runs])),
            "unet_call_median_s": float(np.median(unet)), "unet_calls_per_image": len(timed_runs[0]["calls"]),
            "first_image_s": runs[0]["end_to_end"]}  # fmt: skip


def _run_worker(name: str, args, source: Path, folder: Path, tmp: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--source", str(source), "--folder", str(folder), "--tmp",
           str(tmp), "--size", str(args.size), "--steps", str(args.steps), "--guidance", str(args.guidance),
           "--runs", str(args.runs)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"contender": name, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"contender": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- report
def summarise(report: dict) -> list[str]:
    """The markdown lines of a report (tested on recorded JSON)."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"# GPU check: SD 1.5 architecture (random weights), {s['size']} px, {s['steps']} steps DPM++ 2M, "
        f"guidance {s['guidance']}, batch 1",
        "",
        f"GPU: {m.get('gpu') or 'none found'}; dense fp16 peak {report.get('peak_tflops') or '?'} TFLOP/s. "
        f"CPU: {m.get('cpu')}. Run `{s.get('command', '')}` on {s.get('date', '')}.",
        "",
        f'`pytest -m "gpu or tensorrt"`: {_tests_line(report.get("gpu_tests") or {})}',
        "",
        "| contender | UNet call median (ms) | end to end median (s) | UNet TFLOP/s | share of peak |",
        "|---|---|---|---|---|",
    ]
    flops = report.get("unet_flops")
    for r in report.get("results", []):
        if "error" in r:
            lines.append(f"| {r['contender']} | failed: {r['error']} | | | |")
            continue
        tflops = flops / r["unet_call_median_s"] / 1e12 if flops else None
        share = f"{tflops / report['peak_tflops'] * 100:.0f} %" if tflops and report.get("peak_tflops") else "-"
        lines.append(f"| {r['contender']} | {r['unet_call_median_s'] * 1000:.1f} | {r['end_to_end_median_s']:.2f} | "
                     f"{f'{tflops:.0f}' if tflops else '-'} | {share} |")  # fmt: skip
    ratios = report.get("ratios") or {}
    if ratios:
        lines += ["", "edgediff / diffusers fp16: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if v)]
    if report.get("image_difference"):
        d = report["image_difference"]
        lines.append(f"Image difference edgediff vs diffusers fp16: mean {d['mean']:.2f}, max {d['max']} (0-255).")
    for note in report.get("not_run", []):
        lines.append(f"Not run: {note}")
    return lines


def _tests_line(t: dict) -> str:
    if not t:
        return "not run"
    if "outcome" in t:
        return t["outcome"]
    return (t.get("tail") or ["?"])[-1]


def ratios(results: list[dict]) -> dict:
    by = {r["contender"]: r for r in results if "error" not in r}
    if "edgediff" not in by or "diffusers" not in by:
        return {}
    e, d = by["edgediff"], by["diffusers"]
    return {"unet_call": e["unet_call_median_s"] / d["unet_call_median_s"],
            "end_to_end": e["end_to_end_median_s"] / d["end_to_end_median_s"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="GPU check: gpu/tensorrt tests and diffusers fp16 vs edgediff CUDA")
    p.add_argument("--wheels", type=Path, default=None, help="a folder of wheels to install missing packages from")
    p.add_argument("--root", type=Path, default=Path.home() / ".cache" / "edgediff" / "gpu-check")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--worker", choices=("diffusers", "edgediff"))
    p.add_argument("--source")
    p.add_argument("--folder")
    p.add_argument("--tmp")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    t_start = time.time()

    def left() -> float:
        return args.budget - (time.time() - t_start)

    installed = install(args.wheels)
    sys.path.insert(0, str(HERE))
    from edgediff.runtime.measure import machine_info
    from provenance import command_and_date

    machine = machine_info()
    report: dict = {"machine": machine, "installed": installed, "not_run": [],
                    "settings": {"size": args.size, "steps": args.steps, "guidance": args.guidance, "runs": args.runs,
                                 **command_and_date(__file__, argv)}}  # fmt: skip
    report["peak_tflops"] = args.peak_tflops or peak_tflops(machine.get("gpu"))
    if not machine.get("gpu"):
        report["not_run"].append("no NVIDIA GPU found (nvidia-smi): nothing was timed")
    else:
        report["gpu_tests"] = (
            {"outcome": "skipped (--skip-tests)"}
            if args.skip_tests
            else run_gpu_tests(min(150.0, max(30.0, left() - 300)))
        )
        from edgediff.export import export_model
        from edgediff.export.random_model import build_full_size_pipeline

        source, folder = args.root / "sd15-diffusers", args.root / "sd15-onnx-fp16"
        if not (source / "model_index.json").exists():
            build_full_size_pipeline(source, "sd15")
        if not (folder / "model_index.json").exists():
            export_model(source, folder, fp16=True, device="cuda")
        from edgediff.runtime.flops import count_flops
        from edgediff.runtime.model_folder import ModelFolder

        mf = ModelFolder.open(folder)
        shapes = mf.spec("unet").input_shapes(mf.symbols(1, args.size, args.size), guidance=True)
        report["unet_flops"] = count_flops(folder / "unet" / "model.onnx", {k: list(v) for k, v in shapes.items()})[
            "total"
        ]
        tmp = args.root / "images"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        results = []
        for name in ("diffusers", "edgediff"):
            if left() < 30:
                report["not_run"].append(f"{name}: out of the {args.budget:.0f} s budget")
                continue
            results.append(_run_worker(name, args, source, folder, tmp, timeout=max(30.0, left() - 10)))
        report["results"] = results
        report["ratios"] = ratios(results)
        if all((tmp / f"{n}.png").exists() for n in ("diffusers", "edgediff")):
            import numpy as np
            from PIL import Image

            a, b = (np.asarray(Image.open(tmp / f"{n}.png"), np.int16) for n in ("diffusers", "edgediff"))
            report["image_difference"] = {"mean": float(np.abs(a - b).mean()), "max": int(np.abs(a - b).max())}
    report["seconds"] = time.time() - t_start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "gpu_check.md").write_text("\n".join(summarise(report)) + "\n")
    print("\n".join(summarise(report)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
