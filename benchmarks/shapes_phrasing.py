"""Phrasing robustness of the embedded shapes model: does it follow prompts worded as no training caption is?

    python benchmarks/shapes_phrasing.py [--model DIR] [--n 200] [--steps 20] [--guidance 5] [--trained-with v1]

For ``--n`` scenes of the training combinations (so only the wording is new), generates one image from a
held-out-phrasing prompt (``shapes.held_out_phrasing_prompts``: templates and some words that no training recipe
uses) and, as the paired control, one from a training caption of the same scene (``shapes.caption`` with the
``--trained-with`` recipe), both with image seed i for scene i, and judges them with ``shapes.analyse``
(as ``shapes_fidelity.py`` does, whose functions it reuses). Writes benchmarks/results/shapes_phrasing.md and
.json (``--out DIR`` to put them elsewhere): per attribute the fraction correct, held-out phrasing vs training
wording; the held-out prompts split by whether they hold a word the training captions never use; position
accuracy by the position phrase used; scores per held-out template; the machine, the command, the date and the
model's manifest sha256.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from edgediff.runtime import Pipeline, shapes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from shapes_fidelity import PROMPT_SEED, RESULTS, model_identity, run  # noqa: E402


def _fractions(items: list[dict]) -> dict:
    return {**shapes.fractions(items), "n": len(items)}


def position_phrase(prompt: str, position: str) -> str:
    """The wording of ``position`` that ``prompt`` uses (the longest held-out variant it contains)."""
    for phrase in sorted(shapes.HELD_OUT_WORDS["pos"][position], key=len, reverse=True):
        if re.search(rf"(?<![a-z-]){re.escape(phrase)}(?![a-z-])", prompt):
            return phrase
    return "(unstated)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--trained-with", choices=shapes.PHRASINGS, default="v1",
                   help="the caption recipe the model was trained with (shapes-v1: v1)")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS, help="where the results go (default: benchmarks/results)")
    args = p.parse_args(argv)
    from edgediff.runtime.measure import machine_info
    from provenance import command_and_date

    load_before = os.getloadavg()[0]
    pipe = Pipeline.load(args.model)
    machine = machine_info()
    scenes, held_prompts = shapes.held_out_phrasing_prompts(args.n, seed=PROMPT_SEED, split="train")
    rng = np.random.default_rng(PROMPT_SEED)
    train_prompts = [shapes.caption(s, rng, args.trained_with) for s in scenes]
    seen_words = shapes.phrasing_words(args.trained_with)
    report: dict = {
        **model_identity(pipe, args.model),
        **command_and_date(__file__, argv),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": pipe.folder.scheduler_config.get("_class_name"),
        "n": args.n,
        "trained_with": args.trained_with,
        "scenes": f"shapes.sample_scenes({args.n}, seed={PROMPT_SEED}, split='train')",
        "machine": machine,
        "wordings": {},
    }
    per_item = {}
    for name, prompts in (("held_out_phrasing", held_prompts), ("training_wording", train_prompts)):
        images, seconds = run(pipe, prompts, args.steps, args.guidance)
        scored = shapes.score(prompts, images)
        per_item[name] = scored["items"]
        report["wordings"][name] = {
            **_fractions(scored["items"]),
            "seconds_per_image_median": float(np.median(seconds)),
        }
    held = per_item["held_out_phrasing"]
    unseen = [bool(set(re.findall(r"[a-z]+", it["prompt"].lower())) - seen_words) for it in held]
    report["held_out_by_vocabulary"] = {
        "only_trained_words": _fractions([it for it, u in zip(held, unseen) if not u]),
        "some_untrained_word": _fractions([it for it, u in zip(held, unseen) if u]),
    }
    by_phrase: dict[str, list[bool]] = {}
    for scene, it in zip(scenes, held):
        if "position" in it["correct"]:
            by_phrase.setdefault(position_phrase(it["prompt"], scene.position), []).append(it["correct"]["position"])
    report["held_out_position_by_phrase"] = {
        k: {"n": len(v), "position": sum(v) / len(v)} for k, v in sorted(by_phrase.items())
    }
    by_template: dict[int, list[dict]] = {}
    for scene, it in zip(scenes, held):
        by_template.setdefault(shapes.held_out_template(scene, it["prompt"]), []).append(it)
    report["held_out_by_template"] = {
        shapes.HELD_OUT_TEMPLATES[i]: _fractions(items) for i, items in sorted(by_template.items())
    }
    report["items"] = [
        {"scene": vars(s), "held_out_prompt": h["prompt"], "held_out_correct": h["correct"],
         "training_prompt": t["prompt"], "training_correct": t["correct"]}
        for s, h, t in zip(scenes, held, per_item["training_wording"])
    ]  # fmt: skip
    report["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shapes_phrasing.json").write_text(json.dumps(report, indent=2) + "\n")

    fmt = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    load = report["load_average_1min"]
    where = f"{machine['cpu']}, {machine['usable_cpus']} CPUs, load average {load['before']:.1f}/{load['after']:.1f}"
    voc = report["held_out_by_vocabulary"]
    lines = [
        "# Embedded shapes model: robustness to phrasing",
        "",
        (
            f"`{report['command']}` on {report['date']}, {where}; model {report['model']} (manifest sha256 "
            f"`{report['model_manifest_sha256']}`, trained with caption recipe {args.trained_with}); {args.steps} "
            f"steps, guidance {args.guidance}, scheduler {report['scheduler']}; {args.n} scenes of the training "
            f"combinations (scene seed {PROMPT_SEED}), each prompted twice with image seed i: a held-out phrasing "
            f"(`shapes.held_out_phrasing_prompts`, wordings no training recipe uses) and a training caption "
            f"(recipe {args.trained_with}); judged by `shapes.analyse`."
        ),
        "",
        f"| attribute | held-out phrasing | training wording | held-out, only trained words (n="
        f"{voc['only_trained_words']['n']}) | held-out, some untrained word (n={voc['some_untrained_word']['n']}) |",
        "|---|---|---|---|---|",
    ]
    for k in (*shapes.ATTRIBUTES, "all"):
        cells = [report["wordings"]["held_out_phrasing"][k], report["wordings"]["training_wording"][k],
                 voc["only_trained_words"][k], voc["some_untrained_word"][k]]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(map(fmt, cells)) + " |")
    lines += [
        "",
        "Held-out phrasing, position right by the phrase used:",
        "",
        "| phrase | n | position |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['n']} | {fmt(v['position'])} |" for k, v in report["held_out_position_by_phrase"].items()]
    lines += ["", "Held-out phrasing by template:", ""]
    lines += ["| template | n | colour | background | shape | position | all |", "|---|---|---|---|---|---|---|"]
    for t, v in report["held_out_by_template"].items():
        cells = [fmt(v[k]) for k in ("colour", "background", "shape", "position", "all")]
        lines.append(f"| `{t}` | {v['n']} | " + " | ".join(cells) + " |")
    med = report["wordings"]["held_out_phrasing"]["seconds_per_image_median"] * 1000
    lines += ["", f"Median generate time per image (64×64, {args.steps} steps, CFG): {med:.0f} ms ({where}).", ""]
    (args.out / "shapes_phrasing.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
