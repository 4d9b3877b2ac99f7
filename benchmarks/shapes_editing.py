"""Image-to-image and inpainting on the embedded shapes model: does the edit follow the prompt, and does the rest stay?

    python benchmarks/shapes_editing.py [--model DIR] [--n 48] [--steps 20] [--guidance 5] [--out DIR]

Edits (``edgediff.runtime.shapes.edit_cases``, training-split scenes drawn as the input pictures):
- img2img, ``background``: the prompt captions the scene with another background colour; strengths 0.6, 0.7, 0.8;
- inpainting, ``colour``: a mask over the object (grown by ``shapes.MASK_GROW`` px), the prompt asks for another
  object colour; strength 1.0 (diffusers' default), the embedded model's standard UNet (the blend path).
Each image is judged by ``shapes.score_edits``: ``asked`` (the changed attribute reads as asked), ``kept`` (the
other attributes read as in the input), and for inpainting the mean |output − input| over the pixels well
outside the mask (``shapes.FAR_GROW`` px beyond it). Negative controls, run the same way: img2img at strength
0.15 (too weak to change anything), img2img with the strength reversed (``get_timesteps`` keeping the head of the
schedule: 0.8 runs as 0.2), inpainting with the mask inverted. Image i uses seed i.

Writes benchmarks/results/shapes_editing.{md,json} (with the machine and the command) and shapes_editing.png
(the README's examples: input, img2img, mask, inpainting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgediff.runtime import Pipeline, shapes
from edgediff.runtime import pipeline as pipeline_module

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EDIT_SEED = 5
# (label, kind, strength, breakage): the measured runs, then the negative controls
RUNS = [
    ("img2img 0.6", "background", 0.6, None),
    ("img2img 0.7", "background", 0.7, None),
    ("img2img 0.8", "background", 0.8, None),
    ("inpaint 1.0", "colour", 1.0, None),
    ("inpaint 1.0, keep_unmasked", "colour", 1.0, "keep_unmasked"),
    ("control: img2img 0.15 (too weak)", "background", 0.15, None),
    ("control: img2img 0.8, strength reversed", "background", 0.8, "reversed"),
    ("control: inpaint, mask inverted", "colour", 1.0, "inverted"),
]


def run_edits(pipe: Pipeline, edits, strength: float, breakage: str | None, steps: int, guidance: float):
    images, seconds = [], []
    begin = pipeline_module._begin_index
    if breakage == "reversed":  # the wrong end of the schedule: int(n * (1 - s)) steps
        pipeline_module._begin_index = lambda n, s, order: begin(n, 1 - s + 1e-9, order)
    try:
        for seed, e in enumerate(edits):
            mask = e.mask if breakage != "inverted" or e.mask is None else 255 - e.mask
            t0 = time.perf_counter()
            result = pipe(e.prompt, image=e.image, mask_image=mask, strength=strength, num_inference_steps=steps,
                          guidance_scale=guidance, seed=seed, keep_unmasked=breakage == "keep_unmasked")  # fmt: skip
            seconds.append(time.perf_counter() - t0)
            images.append(np.asarray(result.images[0]))
    finally:
        pipeline_module._begin_index = begin
    return images, seconds


def examples(pipe: Pipeline, path: Path, steps: int, guidance: float, cell: int = 112) -> list[dict]:
    """The README's picture, one row per example: input → img2img (strength 0.7), then input, mask → inpainting."""
    rows = list(zip(shapes.edit_cases("background", 3, seed=11), shapes.edit_cases("colour", 3, seed=11)))
    text_h, gap = 30, 6
    xs = [0, cell + gap, 2 * (cell + gap) + 3 * gap, 3 * (cell + gap) + 3 * gap, 4 * (cell + gap) + 3 * gap]
    sheet = Image.new("RGB", (xs[-1] + cell, len(rows) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    captions = []
    for r, (bg_edit, colour_edit) in enumerate(rows):
        outs = [
            pipe(e.prompt, image=e.image, mask_image=e.mask, strength=s, num_inference_steps=steps,
                 guidance_scale=guidance, seed=r).images[0]
            for e, s in ((bg_edit, 0.7), (colour_edit, 1.0))
        ]  # fmt: skip
        tiles = [bg_edit.image, outs[0], colour_edit.image, colour_edit.mask, outs[1]]
        y = r * (cell + text_h)
        for x, tile in zip(xs, tiles):
            img = tile if isinstance(tile, Image.Image) else Image.fromarray(tile)
            sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((2, y + cell + 2), f"img2img 0.7: -> {bg_edit.after.background} background", fill="black")
        draw.text((xs[2], y + cell + 2), f"inpaint: -> {colour_edit.after.colour} {colour_edit.after.shape}",
                  fill="black")  # fmt: skip
        captions += [{"mode": "img2img 0.7", "prompt": bg_edit.prompt, "seed": r},
                     {"mode": "inpaint 1.0", "prompt": colour_edit.prompt, "seed": r}]  # fmt: skip
    sheet.save(path)
    return captions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from edgediff.runtime.measure import machine_info
    from provenance import command_and_date
    from shapes_fidelity import model_identity

    load_before = os.getloadavg()[0]
    pipe = Pipeline.load(args.model)
    report: dict = {**model_identity(pipe, args.model), **command_and_date(__file__, argv), "n": args.n,
                    "steps": args.steps, "guidance": args.guidance,
                    "scheduler": pipe.folder.scheduler_config.get("_class_name"), "unet_kind": pipe.folder.unet_kind,
                    "machine": machine_info(), "runs": {}}  # fmt: skip
    cases = {kind: shapes.edit_cases(kind, args.n, seed=EDIT_SEED) for kind in shapes.EDIT_KINDS}
    for label, kind, strength, breakage in RUNS:
        images, seconds = run_edits(pipe, cases[kind], strength, breakage, args.steps, args.guidance)
        scored = shapes.score_edits(cases[kind], images)
        report["runs"][label] = {**{k: v for k, v in scored.items() if k != "items"},
                                 "seconds_per_image_median": float(np.median(seconds))}  # fmt: skip
        print(label, {k: round(v, 3) for k, v in report["runs"][label].items()})
    args.out.mkdir(parents=True, exist_ok=True)
    report["examples"] = examples(pipe, args.out / "shapes_editing.png", args.steps, args.guidance)
    report["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    (args.out / "shapes_editing.json").write_text(json.dumps(report, indent=2) + "\n")
    m, load = report["machine"], report["load_average_1min"]
    lines = [
        "# Embedded shapes model: image-to-image and inpainting",
        "",
        f"`{report['command']}` on {report['date']}, {m['cpu']}, {m['usable_cpus']} CPUs, load average "
        f"{load['before']:.1f}/{load['after']:.1f}; model {report['model']} (manifest sha256 "
        f"{report['model_manifest_sha256'][:12]}…, UNet {report['unet_kind']}), {args.n} edits per run, "
        f"{args.steps} steps {report['scheduler']}, guidance {args.guidance:g}, image i seed i.",
        "",
        "| run | asked | kept | both | far pixels moved, mean / max (/255) | s per image (median) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in report["runs"].items():
        far = f"{r['far_diff_mean']:.1f} / {r['far_diff_max']:.1f}" if "far_diff_mean" in r else "—"
        lines.append(f"| {label} | {r['asked']:.2f} | {r['kept']:.2f} | {r['both']:.2f} | {far} | "
                     f"{r['seconds_per_image_median']:.3f} |")  # fmt: skip
    lines += [
        "",
        "asked: the changed attribute (img2img: background; inpainting: the object's colour) reads as the prompt "
        "asks. kept: shape, position, size and the other colour read as in the input. far pixels: more than "
        f"{shapes.FAR_GROW} px outside the inpainting mask (the object grown by {shapes.MASK_GROW} px); without "
        "keep_unmasked they are the VAE's rendering of the input, as in diffusers.",
        "",
        "What this cannot show: in the shapes world the prompt restates every attribute that stays, and the VAE "
        "renders only the palette, so a pipeline that ignored the picture and regenerated from the prompt would "
        "also score well here (measured while building this: the model puts the object where the prompt implies "
        "even at strength 0.5, and tinted or extra details do not survive its VAE). That the picture is used as "
        "diffusers uses it is shown by the parity tests (tests/test_img2img.py, tests/test_inpaint.py) and the "
        "torch-free goldens, whose negative controls (no blend, inverted mask) fail by more than 10/255.",
        "",
        "![examples](shapes_editing.png)",
    ]
    (args.out / "shapes_editing.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'shapes_editing.md'}")


if __name__ == "__main__":
    main()
