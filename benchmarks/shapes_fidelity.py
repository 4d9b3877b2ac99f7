"""Fidelity of the embedded shapes model: does the image show what the prompt says?

    python benchmarks/shapes_fidelity.py [--model DIR] [--n 216] [--steps 20] [--guidance 5] [--out DIR]

Generates, with the lean runtime, one image per prompt for ``--n`` training-split and ``--n``
held-out prompts (captions of scenes drawn with a fixed seed; image seeds 0..n-1), judges each
with the deterministic analyser ``edgediff.runtime.shapes.analyse`` (hand-written geometry, no
learned model) and writes:
- benchmarks/results/shapes_fidelity.md and .json: per attribute (colour, background, shape,
  position, size) the fraction correct, train vs held-out, with the machine, the timings, the
  command and the model folder's identity (the sha256 of its manifest, whose file hashes are
  verified first: a path alone says nothing once a temporary folder is gone);
- benchmarks/results/shapes_contact_sheet.png: samples with their prompts.
(``--out DIR``: those three files go to DIR instead.) The 1-minute load average before and after is
recorded: on a shared machine it says how far to trust the times (the scores do not depend on it).
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

from edgediff.runtime import ModelFolderError, Pipeline, shapes
from edgediff.runtime.model_folder import sha256_file

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT_SEED = 2026  # the scenes and the caption wordings


def prompts_for(split: str, n: int) -> list[str]:
    rng = np.random.default_rng(PROMPT_SEED + (split == "held_out"))
    return [shapes.caption(scene, rng) for scene in shapes.sample_scenes(n, seed=PROMPT_SEED, split=split)]


def model_identity(pipe: Pipeline, given: Path | None) -> dict:
    """What identifies the model run: a name (a repository path for the embedded model) and the sha256 of
    its manifest, which lists every file's sha256 (checked here, so the hash stands for the whole folder)."""
    problems = pipe.folder.verify()
    if problems:
        raise ModelFolderError(f"{pipe.folder.path}: {problems[0]} (a damaged folder's results identify nothing)")
    path = pipe.folder.path.resolve()
    try:
        name = str(path.relative_to(HERE.parent))  # the committed files, e.g. runtime/models/shapes
    except ValueError:
        name = path.name  # a folder outside the repository: its own path means nothing elsewhere
    return {
        "model": name if given is not None else f"embedded ({name})",
        "model_manifest_sha256": sha256_file(path / "edgediff.json"),
    }


def run(pipe: Pipeline, prompts: list[str], steps: int, guidance: float):
    """One image per prompt; image i uses seed i."""
    images, seconds = [], []
    for seed, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        result = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
        seconds.append(time.perf_counter() - t0)
        images.append(np.asarray(result.images[0]))
    return images, seconds


def contact_sheet(rows: list[tuple[str, np.ndarray, dict]], path: Path, cols: int = 6, cell: int = 128) -> None:
    """Images (scaled to ``cell``) with their prompt and a mark for each wrong attribute."""
    text_h = 44
    n_rows = (len(rows) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, n_rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (prompt, image, correct) in enumerate(rows):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
        words, line, lines = prompt.split(), "", []
        for w in words:
            if len(line) + len(w) + 1 > 24:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        wrong = [k for k, ok in correct.items() if not ok]
        lines = lines[:2] + [("wrong: " + ",".join(wrong)) if wrong else "ok"]
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines[:3]), fill="red" if wrong else "black", spacing=1)
    sheet.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    p.add_argument("--n", type=int, default=216)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=RESULTS, help="where the results go (default: benchmarks/results)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from edgediff.runtime.measure import machine_info
    from provenance import command_and_date

    load_before = os.getloadavg()[0]
    pipe = Pipeline.load(args.model)
    machine = machine_info()
    report: dict = {
        **model_identity(pipe, args.model),
        **command_and_date(__file__, argv),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": pipe.folder.scheduler_config.get("_class_name"),
        "n_per_split": args.n,
        "machine": machine,
        "splits": {},
    }
    samples = []
    for split in ("train", "held_out"):
        prompts = prompts_for(split, args.n)
        images, seconds = run(pipe, prompts, args.steps, args.guidance)
        scored = shapes.score(prompts, images)
        report["splits"][split] = {
            **{k: scored[k] for k in (*shapes.ATTRIBUTES, "all")},
            "counts": scored["counts"],
            "seconds_per_image_median": float(np.median(seconds)),
        }
        samples += [(it["prompt"], img, it["correct"]) for it, img in zip(scored["items"][:18], images[:18])]
    report["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shapes_fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    contact_sheet(samples, args.out / "shapes_contact_sheet.png")
    load = report["load_average_1min"]
    where = f"{machine['cpu']}, {machine['usable_cpus']} CPUs, load average {load['before']:.1f}/{load['after']:.1f}"
    lines = [
        "# Embedded shapes model: fidelity",
        "",
        (
            f"`{report['command']}` on {report['date']}, {where}; model {report['model']} (manifest sha256 "
            f"`{report['model_manifest_sha256']}`); {args.steps} steps, guidance {args.guidance}, scheduler "
            f"{report['scheduler']}; prompts: captions of {args.n} scenes per split (scene seed {PROMPT_SEED}), "
            f"image seeds 0..{args.n - 1}; judged by `shapes.analyse`."
        ),
        "",
        "| attribute | train | held-out | held-out target |",
        "|---|---|---|---|",
    ]
    targets = {"colour": 0.95, "background": 0.95, "shape": 0.85, "position": 0.90}
    for k in (*shapes.ATTRIBUTES, "all"):
        tr, ho = report["splits"]["train"][k], report["splits"]["held_out"][k]
        fmt = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        target = f"≥ {100 * targets[k]:.0f} %" if k in targets else ""
        lines.append(f"| {k} | {fmt(tr)} | {fmt(ho)} | {target} |")
    med = [report["splits"][k]["seconds_per_image_median"] * 1000 for k in ("train", "held_out")]
    timing = f"Median generate time per image (64×64, {args.steps} steps, CFG), train / held-out: {med[0]:.0f} / "
    lines += ["", f"{timing}{med[1]:.0f} ms ({where}).", ""]
    (args.out / "shapes_fidelity.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
