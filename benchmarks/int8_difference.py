"""What the opt-in int8 UNet does to images of a trained model: pixel difference from the fp32
images and the fidelity judge's scores for both, on the embedded shapes model.

    python benchmarks/int8_difference.py [--n 108]

Copies the embedded model to a temporary folder, runs `edgediff optimize` (fp32 variants) and
`edgediff optimize --int8` there, then generates the same prompts with the same seeds with both
(20 DPM++ steps, guidance 5, ``--n`` training-split and ``--n`` held-out prompts of
``shapes_fidelity.py``). Writes ``benchmarks/results/int8_shapes.{md,json}``. The random-weight
SD 1.5 figures are in the peer comparison (``image_vs_edgediff`` of its int8 row); random weights
say little about how a trained model's images change, this does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=108)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    args = p.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from edgediff.engines.ort_optimize import optimize_folder
    from edgediff.runtime import Pipeline, measure, shapes
    from edgediff.runtime.bench import machine_info
    from edgediff.runtime.pipeline import embedded_model_path
    from provenance import command_and_date
    from shapes_fidelity import prompts_for

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shapes"
        shutil.copytree(embedded_model_path(), folder)
        optimize_folder(folder)
        int8_report = optimize_folder(folder, int8=True)["unet"]
        images, seconds = {}, {}
        for label, options in (("fp32", {}), ("int8", {"cpu_variant": "int8"})):
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

    splits = {}
    for split in ("train", "held_out"):
        prompts = prompts_for(split, args.n)
        a = np.stack(images["fp32", split]).astype(np.float64)
        b = np.stack(images["int8", split]).astype(np.float64)
        d = np.abs(a - b)
        psnr = [measure.psnr(x, y, 255) for x, y in zip(a, b)]
        scores = {label: shapes.score(prompts, images[label, split]) for label in ("fp32", "int8")}
        splits[split] = {
            "mean_abs": float(d.mean()),
            "max_abs": float(d.max()),
            "psnr_db_median": float(np.median(psnr)),
            "psnr_db_min": float(np.min(psnr)),
            "fidelity": {label: {k: s[k] for k in (*shapes.ATTRIBUTES, "all")} for label, s in scores.items()},
            "seconds_per_image": {label: seconds[label, split] for label in ("fp32", "int8")},
        }
    report = {
        "machine": machine_info(),
        **command_and_date(__file__, argv),
        "n_per_split": args.n,
        "steps": args.steps,
        "guidance": args.guidance,
        "unet_output_max_relative_difference_random_inputs": int8_report["max_relative_difference"],
        "splits": splits,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8_shapes.json").write_text(json.dumps(report, indent=1) + "\n")
    attrs = (*shapes.ATTRIBUTES, "all")
    lines = [
        "# int8 UNet (opt-in) on the trained embedded shapes model",
        "",
        f"`{report['command']}` on {report['date']}, {report['machine']['cpu']}; {args.n} prompts per split, "
        f"{args.steps} DPM++ steps, guidance {args.guidance}, image seeds 0..{args.n - 1}; fp32 = `edgediff "
        "optimize`'s variant, int8 = `edgediff optimize --int8`'s.",
        "",
        "| split | mean abs diff (0-255) | max abs diff | PSNR median (dB) | PSNR worst (dB) | "
        + " | ".join(f"{a} fp32 → int8" for a in attrs)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(attrs),
    ]
    for split, r in splits.items():
        f = r["fidelity"]
        lines.append(
            f"| {split} | {r['mean_abs']:.2f} | {r['max_abs']:.0f} | {r['psnr_db_median']:.1f} | "
            f"{r['psnr_db_min']:.1f} | "
            + " | ".join(f"{f['fp32'][a] * 100:.1f} → {f['int8'][a] * 100:.1f} %" for a in attrs)
            + " |"
        )
    (RESULTS / "int8_shapes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
