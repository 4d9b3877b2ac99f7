"""What every engine and precision does to the images of a trained model: pixel difference from the ONNX
Runtime fp32 images (image-equal to diffusers) and the fidelity judge's scores, on the embedded shapes model.

    python benchmarks/precision_difference.py [--n 108] [--only int8-static ov-bf16]

Copies the embedded model to a temporary folder, makes its variants there as a user would (``edgediff optimize``;
``--int8`` dynamic; ``--int8 static`` calibrated on 8 training captions that are not among the judged prompts,
for ONNX Runtime and OpenVINO), then generates the same prompts with the same seeds in every configuration
(20 DPM++ steps, guidance 5, ``--n`` training-split and ``--n`` held-out prompts of ``shapes_fidelity.py``).
Writes ``benchmarks/results/precision_shapes.{md,json}``. The random-weight SD 1.5 figures (speed, and the
image difference there) are in the peer comparison; random weights say little about how a trained model's
images change, this does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REFERENCE = "ort-f32"
CONFIGS = {  # label -> (Pipeline.load options, what it is)
    REFERENCE: ({}, "ONNX Runtime f32 (edgediff optimize's fused variant; the default)"),
    "ort-int8-dynamic": ({"cpu_variant": "int8", "_int8": "dynamic"}, "ONNX Runtime, int8 dynamic (MatMuls)"),
    "ort-int8-static": ({"cpu_variant": "int8", "_int8": "static"}, "ONNX Runtime, int8 static QDQ (Conv + MatMul)"),
    "ov-f32": ({"engine": "openvino"}, "OpenVINO f32"),
    "ov-bf16": ({"engine": "openvino", "precision": "bf16"}, "OpenVINO bf16"),
    "ov-int8": ({"engine": "openvino", "cpu_variant": "int8"}, "OpenVINO, NNCF int8 (Conv + MatMul), rest f32"),
    "ov-int8-bf16": ({"engine": "openvino", "cpu_variant": "int8", "precision": "bf16"},
                     "OpenVINO, NNCF int8, rest bf16"),
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=108)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--only", nargs="+", default=None, choices=list(CONFIGS), help="these configurations (and fp32)")
    args = p.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from edgediff.engines.ort_optimize import optimize_folder
    from edgediff.runtime import Pipeline, calibrate, measure, shapes
    from edgediff.runtime.bench import machine_info
    from edgediff.runtime.pipeline import embedded_model_path
    from provenance import command_and_date
    from shapes_fidelity import prompts_for

    has_ov = importlib.util.find_spec("openvino") is not None
    has_nncf = has_ov and importlib.util.find_spec("nncf") is not None
    labels = [REFERENCE] + [c for c in (args.only or CONFIGS) if c != REFERENCE]
    skipped = {}
    for label in list(labels):
        engine = CONFIGS[label][0].get("engine")
        if engine == "openvino" and not has_ov:
            skipped[label] = "openvino is not installed"
        elif label.startswith("ov-int8") and not has_nncf:
            skipped[label] = "nncf is not installed"
    labels = [c for c in labels if c not in skipped]
    rng = np.random.default_rng(11)
    calibration_prompts = [shapes.caption(s, rng) for s in shapes.sample_scenes(8, seed=11, split="train")]

    images: dict = {}
    seconds: dict = {}
    variants: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shapes"
        shutil.copytree(embedded_model_path(), folder, ignore=shutil.ignore_patterns("ort-cpu*", "openvino-*"))
        optimize_folder(folder)
        samples = None
        if any(CONFIGS[c][0].get("_int8") == "static" or c.startswith("ov-int8") for c in labels):
            with Pipeline.load(folder) as pipe:
                samples = calibrate.collect(pipe, calibration_prompts, steps=10)
        if any(c.startswith("ov-int8") for c in labels):
            from edgediff.engines.ov_quantize import quantize_unet
            from edgediff.runtime.model_folder import ModelFolder

            variants["ov-int8"] = quantize_unet(ModelFolder.open(folder), samples or [], force=True)
        for label in labels:
            options = dict(CONFIGS[label][0])
            mode = options.pop("_int8", None)
            if mode:  # the one ORT int8 variant of the folder is the kind made last
                variants[label] = optimize_folder(folder, int8=mode, calibration=samples, force=True)["unet"]
            with Pipeline.load(folder, **options) as pipe:
                for split in ("train", "held_out"):
                    prompts = prompts_for(split, args.n)
                    t0 = time.perf_counter()
                    images[label, split] = [
                        np.asarray(pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                        seed=seed).images[0])
                        for seed, prompt in enumerate(prompts)
                    ]  # fmt: skip
                    seconds[label, split] = (time.perf_counter() - t0) / len(prompts)
            print(f"{label}: done", file=sys.stderr, flush=True)

    rows = []
    attrs = (*shapes.ATTRIBUTES, "all")
    for label in labels:
        for split in ("train", "held_out"):
            prompts = prompts_for(split, args.n)
            a = np.stack(images[REFERENCE, split]).astype(np.float64)
            b = np.stack(images[label, split]).astype(np.float64)
            d = np.abs(a - b)
            psnr = [measure.psnr(x, y, 255) for x, y in zip(a, b)]
            score = shapes.score(prompts, images[label, split])
            rows.append({
                "config": label, "what": CONFIGS[label][1], "split": split, "mean_abs": float(d.mean()),
                "max_abs": float(d.max()), "psnr_db_median": float(np.median(psnr)),
                "psnr_db_min": float(np.min(psnr)),
                "fidelity": {k: score[k] for k in attrs}, "seconds_per_image": seconds[label, split],
            })  # fmt: skip
    report = {
        "machine": machine_info(),
        **command_and_date(__file__, argv),
        "n_per_split": args.n,
        "steps": args.steps,
        "guidance": args.guidance,
        "calibration": {"prompts": calibration_prompts, "steps": 10},
        "variants": {k: {x: v.get(x) for x in ("max_relative_difference", "int8_mode")} for k, v in variants.items()},
        "skipped": skipped,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision_shapes.json").write_text(json.dumps(report, indent=1) + "\n")
    m = report["machine"]
    lines = [
        "# Every engine and precision on the trained embedded shapes model",
        "",
        f"`{report['command']}` on {report['date']}; {m['cpu']} ({', '.join(m['flags'])}); {args.n} prompts per "
        f"split, {args.steps} DPM++ steps, guidance {args.guidance}, image seeds 0..{args.n - 1}. Difference from "
        f"`{REFERENCE}` (ONNX Runtime f32, image-equal to diffusers). Static int8 is calibrated on 8 other training "
        "captions x 10 steps. Seconds per image: this tiny model, not a speed measurement.",
        "",
        "| configuration | split | mean abs diff (0-255) | max abs diff | PSNR median (dB) | PSNR worst (dB) | "
        + " | ".join(attrs)
        + " | s / image |",
        "|---|---|---|---|---|---|" + "---|" * len(attrs) + "---|",
    ]
    for r in rows:
        f = r["fidelity"]
        lines.append(
            f"| {r['what']} | {r['split']} | {r['mean_abs']:.2f} | {r['max_abs']:.0f} | {r['psnr_db_median']:.1f} | "
            f"{r['psnr_db_min']:.1f} | " + " | ".join(f"{f[a] * 100:.1f} %" for a in attrs)
            + f" | {r['seconds_per_image']:.2f} |"
        )  # fmt: skip
    for label, why in skipped.items():
        lines.append(f"\nNot run: {label} ({why}).")
    (RESULTS / "precision_shapes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
