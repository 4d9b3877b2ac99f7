"""edgediff against what users would run instead, on the same model, size, steps, scheduler and
thread count, on this machine, in one run:

- diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (PyTorch, CPU, fp32),
- optimum's ``ORTStableDiffusionPipeline`` / ``ORTStableDiffusionXLPipeline`` (ONNX Runtime, CPU) on the same
  ONNX folder,
- edgediff (ONNX Runtime, CPU).

    python benchmarks/peer_comparison.py                       # SD 1.5 architecture, 512 and 256 px
    python benchmarks/peer_comparison.py --sizes 256 --runs 1  # quicker
    python benchmarks/peer_comparison.py --sizes 512 256 --edgediff 'edgediff={}' \
        --edgediff 'low-memory={"low_memory": true}' --edgediff 'int8={"cpu_variant": "int8"}'
    python benchmarks/peer_comparison.py --arch sdxl-base --sizes 1024 512 --steps 4 --runs 0 --no-optimize
    python benchmarks/peer_comparison.py --arch sdxl-base --sizes 512 --mode turbo --decoders full tiny

``--mode``: ``standard`` (DPM++ 2M, ``--steps`` at ``--guidance``), ``turbo`` (SD/SDXL-Turbo-shaped: 1 step of
Euler ancestral on trailing timesteps, guidance 0) or ``lcm`` (LCM-shaped: 4 steps of LCM, guidance 1, so one
batch-1 UNet call per step); ``--decoders full tiny`` runs each contender with the full VAE and with the tiny
autoencoder (TAESD architecture, random weights) too. ``--runs 0`` times the first image itself (full-size SDXL
at 1024 px costs minutes per image on a small CPU).

The model is the random-weight SD 1.5-architecture model of ``full_size_models.py`` (built and
exported first if missing; ``edgediff optimize`` is run on it, as users run it on a CPU, and
``--int8`` when an ``--edgediff`` configuration asks for the int8 variant). Every contender runs
in its own fresh process, one after the other, so cold start (process start to first PNG written)
and peak memory (the process's peak RSS) are its own. Per contender and size: one cold image,
``--warmup`` untimed images, ``--runs`` timed images; every UNet call is timed by wrapping the
pipeline's UNet. Results (with the machine) go to ``benchmarks/results/peers_<arch>.{json,md}``
and a chart ``peers_<arch>.png``; ratios are edgediff over each peer from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "a photograph of an astronaut riding a horse"
CONTENDERS = ("diffusers", "optimum", "edgediff")
PEERS = ("diffusers", "optimum")


# ----------------------------------------------------------------------------------------- worker
def _worker(args) -> dict:
    """Runs inside the contender's own process; prints one JSON line."""
    t_spawn = args.spawn_time
    import numpy as np

    from edgediff.runtime.measure import peak_rss_bytes

    size, steps, guidance, threads = args.size, args.steps, args.guidance, args.threads
    tiny = args.decoder == "tiny"
    unet_calls: list[float] = []
    decodes: list[float] = []
    stages: dict[str, float] = {}  # edgediff: the last image's per-stage seconds (host = loop minus UNet calls)
    out_png = Path(args.tmp) / f"{args.worker}-{size}.png"
    xl = args.arch.startswith("sdxl")

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            unet_calls.append(time.perf_counter() - t0)
            return r

        return wrapper

    if args.worker == "edgediff":
        from edgediff.runtime import Pipeline
        from edgediff.runtime.image import save_png

        t0 = time.perf_counter()
        pipe = Pipeline.load(args.folder, threads=threads, **json.loads(args.edgediff_options))
        load = time.perf_counter() - t0

        scheduler = {"standard": "dpmpp_2m", "lcm": "lcm",
                     "turbo": {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}}[
            args.mode]  # fmt: skip

        def generate(seed):
            r = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size, seed=seed,
                     scheduler=scheduler, decoder=args.decoder)  # fmt: skip
            unet_calls.extend(r.unet_calls)
            decodes.append(r.timings["vae_decoder"])
            stages.clear()
            stages.update(r.timings)
            return r.images[0]

        def save(image):
            save_png(image, out_png)
    else:
        import torch

        torch.set_num_threads(threads)
        import diffusers

        t0 = time.perf_counter()
        if args.worker == "diffusers":
            if xl:
                pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(args.source, add_watermarker=False,
                                                                           local_files_only=True)  # fmt: skip
            else:
                pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                    args.source, safety_checker=None, requires_safety_checker=False, local_files_only=True
                )
            if tiny:
                pipe.vae = diffusers.AutoencoderTiny.from_pretrained(args.tiny_vae, local_files_only=True)
        else:
            import onnxruntime as ort
            import optimum.onnxruntime as ortd

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            if args.no_prepack:  # as edgediff's {"prepack": false}: no packed second copy of the weights
                so.add_session_config_entry("session.disable_prepacking", "1")
            cls = ortd.ORTStableDiffusionXLPipeline if xl else ortd.ORTStableDiffusionPipeline
            pipe = cls.from_pretrained(args.folder, export=False, session_options=so)
        config = pipe.scheduler.config
        pipe.scheduler = {
            "standard": lambda: diffusers.DPMSolverMultistepScheduler.from_config(config),
            "lcm": lambda: diffusers.LCMScheduler.from_config(config),
            "turbo": lambda: diffusers.EulerAncestralDiscreteScheduler.from_config(
                config, timestep_spacing="trailing"
            ),
        }[args.mode]()
        pipe.set_progress_bar_config(disable=True)
        load = time.perf_counter() - t0
        pipe.unet.forward = timed(pipe.unet.forward)  # nn.Module / ORTUnet __call__ -> instance forward
        decode = pipe.vae.decode

        def timed_decode(*a, **k):
            t0 = time.perf_counter()
            r = decode(*a, **k)
            decodes.append(time.perf_counter() - t0)
            return r

        pipe.vae.decode = timed_decode

        def generate(seed):
            g = torch.Generator("cpu").manual_seed(seed)
            with torch.inference_mode():
                return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
                            generator=g).images[0]  # fmt: skip

        def save(image):
            image.save(out_png)

    runs = []
    for i in range(1 + args.warmup + args.runs):
        before = len(unet_calls)
        t0 = time.perf_counter()
        image = generate(i)
        end_to_end = time.perf_counter() - t0
        if i == 0:
            save(image)
            cold_start = time.time() - t_spawn
        runs.append({"end_to_end": end_to_end, "unet_calls": unet_calls[before:]})
    timed_runs = runs[1 + args.warmup :] or runs[:1]  # --runs 0: the first image is the timed one
    calls = [c for r in timed_runs for c in r["unet_calls"]]
    return {
        "contender": args.worker,
        "size": size,
        "load_s": load,
        "cold_start_s": cold_start,
        "first_image_s": runs[0]["end_to_end"],
        "end_to_end_s": [r["end_to_end"] for r in timed_runs],
        "end_to_end_median_s": float(np.median([r["end_to_end"] for r in timed_runs])),
        "unet_calls_per_image": len(timed_runs[0]["unet_calls"]),
        "unet_call_median_s": float(np.median(calls)),
        "unet_call_p90_s": float(np.percentile(calls, 90)),
        "vae_decode_median_s": float(np.median(decodes[-len(timed_runs) :])) if decodes else None,
        "peak_rss_bytes": peak_rss_bytes(),
        **({"stages_s": dict(stages)} if stages else {}),
    }


# ----------------------------------------------------------------------------------------- parent
def _run_contender(name, size, options: dict, args, source, folder, tmp, decoder: str = "full") -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--size", str(size), "--steps", str(args.steps),
           "--guidance", str(args.guidance), "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--runs", str(args.runs), "--source", str(source), "--folder", str(folder), "--tmp", str(tmp),
           "--edgediff-options", json.dumps(options), "--arch", args.arch, "--mode", args.mode,
           "--decoder", decoder, "--tiny-vae", str(args.tiny_vae)]  # fmt: skip
    cmd += ["--no-prepack"] if args.no_prepack else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd += ["--spawn-time", repr(time.time())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"contender": name, "size": size, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return a / b if a and b else None


def summarise(results: list[dict]) -> list[dict]:
    """One row per (size, edgediff configuration, peer): edgediff's figure over the peer's."""
    ok = sorted((r for r in results if "error" not in r), key=lambda r: -r["size"])

    def worker(r):  # results written before --decoders have neither key
        return r.get("worker", r["contender"] if r["contender"] in PEERS else "edgediff"), r.get("decoder", "full")

    peers = {(r["size"], *worker(r)): r for r in ok if worker(r)[0] in PEERS}
    ours_rows = [r for r in ok if worker(r)[0] not in PEERS]
    pairs = [(ours, peers.get((ours["size"], name, worker(ours)[1]))) for ours in ours_rows for name in PEERS]
    return [{
        "size": ours["size"], "edgediff": ours["contender"], "peer": peer["contender"],
        "unet_call": _ratio(ours["unet_call_median_s"], peer["unet_call_median_s"]),
        "end_to_end": _ratio(ours["end_to_end_median_s"], peer["end_to_end_median_s"]),
        "cold_start": _ratio(ours["cold_start_s"], peer["cold_start_s"]),
        "peak_rss": _ratio(ours["peak_rss_bytes"], peer["peak_rss_bytes"]),
    } for ours, peer in pairs if peer is not None]  # fmt: skip


def image_difference(a_png: Path, b_png: Path) -> dict | None:
    """Pixel difference of two PNGs (0..255 scale): mean and max |a - b| and PSNR in dB."""
    import numpy as np
    from PIL import Image

    from edgediff.runtime.measure import psnr

    if not (a_png.is_file() and b_png.is_file()):
        return None
    a, b = (np.asarray(Image.open(f).convert("RGB"), np.float64) for f in (a_png, b_png))
    if a.shape != b.shape:
        return None
    d = np.abs(a - b)
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "psnr_db": psnr(a, b, 255)}


# Issue 5's targets, judged at the largest size measured: (name, what is compared, limit).
TARGETS = (
    ("UNet call vs diffusers", "unet_call", "diffusers", 0.40),
    ("end to end vs diffusers", "end_to_end", "diffusers", 0.45),
    ("end to end vs optimum", "end_to_end", "optimum", 0.90),
    ("cold start vs diffusers", "cold_start", "diffusers", 0.50),
    ("peak memory vs diffusers", "peak_rss", "diffusers", 0.80),
)


def judge_targets(report: dict) -> list[dict]:
    """Each target against each edgediff configuration at the largest size: the measured value,
    the limit, met or not, and value / limit (how far off)."""
    rows = []
    ratios = report["ratios"]
    if not ratios:
        return rows
    size = max(r["size"] for r in ratios)
    for name, key, peer, limit in TARGETS:
        for r in ratios:
            if r["size"] == size and r["peer"] == peer and r[key] is not None:
                rows.append({"target": name, "edgediff": r["edgediff"], "value": r[key], "limit": limit})
    largest = report["settings"].get("largest_component_bytes")
    for r in report["results"]:
        if r.get("size") != size or "error" in r:
            continue
        stages = r.get("stages_s")
        if stages and stages.get("denoise"):
            rows.append({"target": "host time share of the denoising loop", "edgediff": r["contender"],
                         "value": stages["host"] / stages["denoise"], "limit": 0.01})  # fmt: skip
        if largest and r.get("options", {}).get("low_memory"):
            rows.append({"target": "low-memory peak vs largest component + 1 GB", "edgediff": r["contender"],
                         "value": r["peak_rss_bytes"] / (largest + 1e9), "limit": 1.0})  # fmt: skip
    for row in rows:
        row["met"] = row["value"] <= row["limit"]
        row["of_limit"] = row["value"] / row["limit"]
    return rows


def write_markdown(path: Path, report: dict) -> None:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# Peer comparison: {s['arch']} architecture (random weights), {s['steps']} steps "
        f"{s.get('scheduler', 'DPM++ 2M')}, guidance {s['guidance']}, batch 1 (UNet batch "
        f"{2 if s['guidance'] > 1 else 1})",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs ({', '.join(m['flags'])}), "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB; {m['os']}; threads {s['threads']} for every contender.",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()),
        f"Run: `{s['command']}` on {s['date']}; {s['warmup']} warm-up + {s['runs']} timed images per contender "
        "after the cold one, each contender in its own fresh process.",
        "",
        "| size | contender | UNet call median (s) | UNet p90 (s) | VAE decode (s) | end to end median (s) "
        "| cold start (s) | load (s) | peak RSS (GiB) | image vs diffusers: mean / max abs (0-255) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['contender']} | failed: {r['error']} | | | | | | | |")
            continue
        diff = r.get("image_vs_diffusers")
        lines.append(
            f"| {r['size']} | {r['contender']} | {r['unet_call_median_s']:.2f} | {r['unet_call_p90_s']:.2f} | "
            + (f"{r['vae_decode_median_s']:.2f}" if r.get("vae_decode_median_s") is not None else "-")
            + f" | {r['end_to_end_median_s']:.1f} | {r['cold_start_s']:.1f} | {r['load_s']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | "
            + (
                "-"
                if r.get("worker", r["contender"]) == "diffusers" or not diff
                else f"{diff['mean_abs']:.2f} / {diff['max_abs']:.0f}"
            )
            + " |"
        )
    variants = [r for r in report["results"] if r.get("image_vs_edgediff")]
    if variants:
        lines += ["", "Image difference of each edgediff configuration from edgediff's default (seed 0):", ""]
        lines += [f"- {r['size']} px, {r['contender']}: mean {r['image_vs_edgediff']['mean_abs']:.2f}, max "
                  f"{r['image_vs_edgediff']['max_abs']:.0f} (0-255), PSNR {r['image_vs_edgediff']['psnr_db']:.1f} dB"
                  for r in variants]  # fmt: skip
    lines += [
        "",
        "Ratios, edgediff / peer (lower is better for edgediff):",
        "",
        "| size | edgediff | peer | UNet call | end to end | cold start | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["ratios"]:
        lines.append(
            f"| {row['size']} | {row['edgediff']} | {row['peer']} | "
            + " | ".join(
                "-" if row[k] is None else f"{row[k]:.2f}"
                for k in ("unet_call", "end_to_end", "cold_start", "peak_rss")
            )
            + " |"
        )
    targets = judge_targets(report)
    if targets:
        size = max(r["size"] for r in report["ratios"])
        lines += ["", f"Issue 5's targets at {size} px (value / limit > 1: missed by that factor):", "",
                  "| target | edgediff configuration | measured | limit | met | value / limit |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {t['target']} | {t['edgediff']} | {t['value']:.3g} | {t['limit']:g} | "
                  f"{'yes' if t['met'] else 'no'} | {t['of_limit']:.2f} |" for t in targets]  # fmt: skip
        lines += ["", "Why the missed targets are missed on this machine, and what was tried: "
                  "[cpu_targets.md](cpu_targets.md)."]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def draw_chart(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if "error" not in r]
    sizes = sorted({r["size"] for r in ok}, reverse=True)
    metrics = (("unet_call_median_s", "UNet call (s)"), ("end_to_end_median_s", "end to end (s)"),
               ("cold_start_s", "cold start (s)"), ("peak_rss_bytes", "peak RSS (GiB)"))  # fmt: skip
    fig, axes = plt.subplots(len(sizes), len(metrics), figsize=(4 * len(metrics), 3 * len(sizes)), squeeze=False)
    colours = {"diffusers": "#7f7f7f", "optimum": "#1f77b4"}
    for i, size in enumerate(sizes):
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            rows = [r for r in ok if r["size"] == size]
            values = [r[key] / (2**30 if key == "peak_rss_bytes" else 1) for r in rows]
            ax.bar(
                [r["contender"] for r in rows], values, color=[colours.get(r["contender"], "#d62728") for r in rows]
            )
            ax.tick_params(axis="x", labelsize=7, rotation=20)
            ax.set_title(f"{size}x{size}: {label}", fontsize=10)
            for k, v in enumerate(values):
                ax.text(k, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    m = report["machine"]
    fig.suptitle(f"{report['settings']['arch']} (random weights), {report['settings']['steps']} steps, "
                 f"{m['cpu']} x{report['settings']['threads']} threads", fontsize=11)  # fmt: skip
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="edgediff vs diffusers and optimum on this machine.")
    p.add_argument("--arch", default="sd15", choices=("sd15", "sd21-base", "sdxl-base"))
    p.add_argument("--mode", default="standard", choices=("standard", "turbo", "lcm"))
    p.add_argument("--decoders", nargs="+", default=["full"], choices=("full", "tiny"))
    p.add_argument("--no-optimize", action="store_true", help="run edgediff without `edgediff optimize`'s variant")
    p.add_argument("--no-prepack", action="store_true", help="optimum's sessions without weight prepacking")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--edgediff", dest="variants", action="append", metavar="LABEL=JSON",
                   help="an edgediff configuration to run: a label and the JSON of its Pipeline.load options, "
                        'e.g. \'lowmem={"low_memory": true}\' (repeatable; default: edgediff={})')  # fmt: skip
    p.add_argument("--edgediff-options", default="{}", help=argparse.SUPPRESS)  # worker-only
    p.add_argument("--label", default="", help="suffix of the results files")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="only re-render the .md and .png of an earlier run's JSON (no benchmarking)",
    )
    p.add_argument("--root", type=Path, default=None, help="where full_size_models.py keeps the models")
    p.add_argument("--model", nargs=2, metavar=("DIFFUSERS_DIR", "EDGEDIFF_DIR"),
                   help="compare on these folders instead of the random-weight --arch model")  # fmt: skip
    # worker-only
    p.add_argument("--worker", choices=CONTENDERS)
    p.add_argument("--decoder", default="full")
    p.add_argument("--tiny-vae", type=Path, default=None)
    p.add_argument("--size", type=int)
    p.add_argument("--source")
    p.add_argument("--folder")
    p.add_argument("--tmp")
    p.add_argument("--spawn-time", type=float)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    sys.path.insert(0, str(HERE))
    from full_size_models import DEFAULT_ROOT, ensure
    from provenance import command_and_date

    if args.report:
        report = json.loads(args.report.read_text())
        if "largest_component_bytes" not in report["settings"]:
            folder = Path(args.model[1]) if args.model else (args.root or DEFAULT_ROOT) / f"{args.arch}-onnx"
            report["settings"]["largest_component_bytes"] = largest_component_bytes(folder)
        _write(args.report.with_suffix(""), report)
        return

    import tempfile

    from edgediff.runtime.bench import machine_info

    # label -> Pipeline.load options; parsed here so a typo fails before hours of benchmarking
    variants = {label: json.loads(options) for label, options in (v.split("=", 1) for v in args.variants or
                                                                  ["edgediff={}"])}  # fmt: skip
    if args.mode != "standard":  # the shapes of the few-step models' calls
        args.steps, args.guidance = (1, 0.0) if args.mode == "turbo" else (4, 1.0)
    root = args.root or DEFAULT_ROOT
    args.tiny_vae = root / "taesd-diffusers"
    source, folder = args.model or ensure(args.arch, root, tiny_vae="tiny" in args.decoders)
    if "edgediff" in args.contenders and not args.no_optimize:  # as users run it on a CPU: after `edgediff optimize`
        from edgediff.engines.ort_optimize import optimize_folder

        optimize_folder(folder)  # skipped when up to date
        if any(options.get("cpu_variant") == "int8" for options in variants.values()):
            optimize_folder(folder, int8=True)
    runs = [(size, name, label + (" tiny" if decoder == "tiny" else ""), options, decoder)
            for size in args.sizes for decoder in args.decoders for name in args.contenders
            for label, options in (variants.items() if name == "edgediff" else [(name, {})])
            if not (decoder == "tiny" and name == "optimum")]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, name, label, options, decoder in runs:
            print(f"{label} {size}x{size} ...", file=sys.stderr, flush=True)
            r = _run_contender(name, size, options, args, source, folder, tmp, decoder)
            r.update(contender=label, options=options, worker=name, decoder=decoder)
            # every contender's first image (seed 0), kept under its label to compare with the others'
            image = Path(tmp) / f"image-{label}-{size}.png"
            if (Path(tmp) / f"{name}-{size}.png").is_file():
                (Path(tmp) / f"{name}-{size}.png").rename(image)
            suffix = " tiny" if decoder == "tiny" else ""
            r["image_vs_diffusers"] = image_difference(Path(tmp) / f"image-diffusers{suffix}-{size}.png", image)
            if name == "edgediff" and label != f"edgediff{suffix}":
                r["image_vs_edgediff"] = image_difference(Path(tmp) / f"image-edgediff{suffix}-{size}.png", image)
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    report = {
        "machine": machine_info(),
        "settings": {
            "arch": "given folders" if args.model else args.arch,
            "steps": args.steps,
            "guidance": args.guidance,
            "threads": args.threads,
            "warmup": args.warmup,
            "runs": args.runs,
            "scheduler": {"standard": "DPM++ 2M", "turbo": "Euler ancestral, trailing", "lcm": "LCM"}[args.mode],
            "mode": args.mode,
            "decoders": args.decoders,
            "optimized": not args.no_optimize,
            "peer_prepacking": not args.no_prepack,
            "prompt": PROMPT,
            "edgediff_variants": variants,
            **command_and_date(__file__, argv),
            "largest_component_bytes": largest_component_bytes(folder),
        },
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    _write(RESULTS / f"peers_{args.arch}{args.label}", report)


def largest_component_bytes(folder: Path) -> int:
    """Bytes of the largest exported component (its model.onnx and external data): the UNet."""
    from edgediff.runtime.model_folder import ModelFolder

    mf = ModelFolder.open(folder)
    return max(mf.component_bytes(c) for c in mf.required_components)


def _write(stem: Path, report: dict) -> None:
    """The derived tables (ratios, targets) are computed here from the results, then written."""
    report["ratios"] = summarise(report["results"])
    report["targets"] = judge_targets(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(stem.with_suffix(".md"), report)
    draw_chart(stem.with_suffix(".png"), report)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
