"""LoRA memory and time on a full-size model (issue 17): a rank-64 LoRA on every attention and convolution layer of
an SD 1.5-architecture UNet, applied at load, switched for another, removed.

    python benchmarks/lora_apply.py --model ~/.cache/edgediff/full-size/sd15-onnx   # needs its weights maps:
    edgediff weights-map ~/.cache/edgediff/full-size/sd15-onnx ~/.cache/edgediff/full-size/sd15-diffusers

Each scenario runs in its own process (peak RSS is per process), on ONNX Runtime's CPU provider with the exported
graph (``cpu_variant="off"``: what a pipeline with LoRAs loads, so the base row is the like-for-like one):

- ``base``: the model without LoRAs;
- ``lora``: loaded with LoRA A: the time to merge (read, ΔW, add) and the load around it;
- ``switch``: loaded with A, then ``set_loras([B])``: the time of the switch, and the peak over both;
- ``remove``: loaded with A, then ``set_loras([])``: back to the base image, bit for bit (checked);
- ``ov_base``, ``ov_lora``: the same on OpenVINO f32, which fuses the exported graph itself (so it is the fast
  image-equal engine with LoRAs: ONNX Runtime's fused CPU variant cannot take them).
- ``diffusers_lora``: the peer, diffusers fp32 on the same CPU with ``load_lora_weights`` + ``fuse_lora`` of LoRA A
  (``--source``: the diffusers folder the model was exported from); ratios against it go in the table's note.

Each makes one 512x512 image with 3 steps (guidance 7.5), so the peak includes a UNet call. The LoRAs are random
(fp16 factors, kohya format, alpha = rank), made from the model's own weights map so every attention linear and
every convolution of the UNet is targeted. The limit the issue sets: applying must not hold more than one extra
copy of the weights it changes, so ``lora`` peak - ``base`` peak is reported beside the changed weights' size.
Results: ``benchmarks/results/lora_sd15.{json,md}``, with the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GIB = 2**30
CALL = dict(num_inference_steps=3, guidance_scale=7.5, width=512, height=512, seed=1)
PROMPT = "a lighthouse at dusk, oil painting"


def make_lora(model: Path, path: Path, rank: int, seed: int) -> dict:
    """A kohya file with a rank-``rank`` LoRA on every attention linear and every convolution of the UNet."""
    from safetensors.numpy import save_file

    table = json.loads((model / "unet" / "weights_map.json").read_text())["weights"]
    rng = np.random.default_rng(seed)
    tensors, changed = {}, 0
    for name, entry in table.items():
        shape = entry["shape"]
        module = name.removesuffix(".weight")
        if not (len(shape) == 4 or ".attentions." in module):
            continue
        out, inner = shape[0], int(np.prod(shape[1:]))
        r = min(rank, out, inner)
        base = "lora_unet_" + module.replace(".", "_")
        down_shape = [r, *shape[1:]] if len(shape) == 4 else [r, shape[1]]
        up_shape = [out, r, 1, 1] if len(shape) == 4 else [out, r]
        tensors[f"{base}.lora_down.weight"] = (rng.standard_normal(down_shape) / np.sqrt(inner)).astype(np.float16)
        tensors[f"{base}.lora_up.weight"] = (rng.standard_normal(up_shape) * 0.01).astype(np.float16)
        tensors[f"{base}.alpha"] = np.asarray(float(r), np.float32)
        changed += 1
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return {"modules": changed, "file_bytes": path.stat().st_size}


def _rss() -> tuple[int, int]:
    """(resident bytes now, of which anonymous: the process's own memory, not mapped file pages)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(fields[key].split()[0]) * 1024  # noqa: E731
    return kib("VmRSS"), kib("RssAnon")


def diffusers_worker(source: Path, lora_a: Path, threads: int | None) -> dict:
    """The peer: diffusers (fp32, CPU) loading the same LoRA file with ``load_lora_weights`` and fusing it, as its
    docs recommend for inference; the same 3-step 512 px image, its UNet calls timed by a step callback."""
    import torch
    from diffusers import StableDiffusionPipeline

    from edgediff.runtime.measure import peak_rss_bytes

    if threads:
        torch.set_num_threads(threads)
    out: dict = {"scenario": "diffusers_lora"}
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out["base_load_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    pipe.load_lora_weights(str(lora_a), adapter_name="a")
    pipe.fuse_lora(lora_scale=1.0)
    out["merge_s"] = time.perf_counter() - t
    out["load_s"] = time.perf_counter() - t0
    out["peak_after_load"] = peak_rss_bytes()
    out["rss_after_load"], out["anon_after_load"] = _rss()
    marks = []
    t = time.perf_counter()
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=CALL["num_inference_steps"], guidance_scale=CALL["guidance_scale"],
             width=CALL["width"], height=CALL["height"], generator=torch.Generator("cpu").manual_seed(CALL["seed"]),
             callback_on_step_end=lambda p, i, ts, kw: (marks.append(time.perf_counter()), kw)[1])  # fmt: skip
    out["image_s"] = time.perf_counter() - t
    steps = [b - a for a, b in itertools.pairwise(marks)]  # (the first step also holds the text encoder)
    out["unet_call_s"] = float(np.median(steps)) if steps else out["image_s"] / CALL["num_inference_steps"]
    out["peak"] = peak_rss_bytes()
    return out


def worker(model: Path, scenario: str, lora_a: Path, lora_b: Path, threads: int | None) -> dict:
    from edgediff.runtime import Pipeline, lora_apply
    from edgediff.runtime.measure import peak_rss_bytes
    from edgediff.runtime.model_folder import ModelFolder

    out: dict = {"scenario": scenario}
    engine = "openvino" if scenario.startswith("ov_") else "onnxruntime"
    options: dict = {"engine": engine, **({"threads": threads} if threads else {})}
    options.update({"precision": "f32"} if engine == "openvino" else {"cpu_variant": "off"})
    scenario = scenario.removeprefix("ov_")
    t0 = time.perf_counter()
    if scenario != "base":  # the merge alone, timed apart (Pipeline.load repeats it: the load time includes it)
        mf = ModelFolder.open(model)
        t = time.perf_counter()
        merged = lora_apply.merged_weights(mf, lora_apply.as_loras([(lora_a, 1.0)]), lazy=True)
        for weights in merged.values():  # each merged and dropped: the merge's time, not its memory
            for name in weights:
                weights[name]
        out["merge_s"] = time.perf_counter() - t
        out["changed_bytes"] = sum(w.nbytes for w in merged.values())  # type: ignore[attr-defined]
        out["changed_initializers"] = sum(len(w) for w in merged.values())
        del merged
        t0 = time.perf_counter()
    pipe = Pipeline.load(model, loras=[(lora_a, 1.0)] if scenario != "base" else None, **options)
    out["load_s"] = time.perf_counter() - t0
    out["unet_load_s"] = pipe.load_times.get("unet")
    out["peak_after_load"] = peak_rss_bytes()
    out["rss_after_load"], out["anon_after_load"] = _rss()
    if scenario == "switch":
        t = time.perf_counter()
        out["recreated"] = pipe.set_loras([(lora_b, 1.0)])
        out["switch_s"] = time.perf_counter() - t
    elif scenario == "remove":
        t = time.perf_counter()
        pipe.set_loras([])
        out["switch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = pipe(PROMPT, **CALL)
    out["image_s"] = time.perf_counter() - t
    out["unet_call_s"] = float(np.median(result.unet_calls))
    out["peak"] = peak_rss_bytes()
    image = np.asarray(result.images[0])
    np.save(RESULTS / f".lora_{out['scenario']}.npy", image)
    pipe.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/edgediff/full-size/sd15-onnx")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scenarios", default="base,lora,switch,remove")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/edgediff/lora-bench")
    parser.add_argument(
        "--source",
        type=Path,
        default=Path.home() / ".cache/edgediff/full-size/sd15-diffusers",
        help="the diffusers folder for the diffusers_lora scenario (the peer)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    a, b = args.work / f"a_rank{args.rank}.safetensors", args.work / f"b_rank{args.rank}.safetensors"
    if args.worker == "diffusers_lora":
        print(json.dumps(diffusers_worker(args.source, a, args.threads)))
        return
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, a, b, args.threads)))
        return
    from edgediff.runtime.measure import machine_info

    args.work.mkdir(parents=True, exist_ok=True)
    files = {}
    for seed, path in ((1, a), (2, b)):
        if not path.is_file():
            files[path.name] = make_lora(args.model, path, args.rank, seed)
    previous = RESULTS / "lora_sd15.json"
    kept = json.loads(previous.read_text())["rows"] if previous.is_file() else []  # rows of earlier runs stay
    rows = []
    for scenario in args.scenarios.split(","):
        cmd = [sys.executable, __file__, "--model", str(args.model), "--rank", str(args.rank), "--work",
               str(args.work), "--source", str(args.source), "--worker", scenario]  # fmt: skip
        cmd += ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{scenario} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    images = {r["scenario"]: np.load(RESULTS / f".lora_{r['scenario']}.npy") for r in rows
              if (RESULTS / f".lora_{r['scenario']}.npy").is_file()}  # fmt: skip
    for r in rows:
        base = "ov_base" if r["scenario"].startswith("ov_") else "base"
        if base in images and r["scenario"] in images:
            r["max_diff_vs_base"] = int(np.abs(images[r["scenario"]].astype(int) - images[base]).max())
        if r["scenario"] == "ov_lora" and "lora" in images:
            r["max_diff_vs_onnxruntime"] = int(np.abs(images["ov_lora"].astype(int) - images["lora"]).max())
    for p in RESULTS.glob(".lora_*.npy"):
        p.unlink()
    done = {r["scenario"] for r in rows}
    rows = [r for r in kept if r["scenario"] not in done] + rows
    report = {"machine": machine_info(), "model": str(args.model), "rank": args.rank, "call": CALL, "rows": rows,
              "lora_files": {p.name: p.stat().st_size for p in (a, b)}}  # fmt: skip
    (RESULTS / "lora_sd15.json").write_text(json.dumps(report, indent=1) + "\n")
    by = {r["scenario"]: r for r in rows}
    lines = [f"# LoRA at load time on {args.model.name} (rank {args.rank}, every attention and conv layer)", "",
             f"Machine: {report['machine'].get('cpu')}, {report['machine'].get('usable_cpus')} cores, flags "
             f"{' '.join(report['machine'].get('flags', []))}; onnxruntime "
             f"{report['machine'].get('libraries', {}).get('onnxruntime')}. Command: "
             "`python benchmarks/lora_apply.py`.", "",
             "| scenario | load s | merge s | switch s | resident after load GiB (own) | peak during load GiB "
             "| peak with the image GiB | UNet call s | max diff vs base |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['load_s']:.1f} | {r.get('merge_s', 0):.1f} | {r.get('switch_s', 0):.1f} | "
            f"{r['rss_after_load'] / GIB:.2f} ({r['anon_after_load'] / GIB:.2f}) | {r['peak_after_load'] / GIB:.2f} | "
            f"{r['peak'] / GIB:.2f} | {r['unet_call_s']:.2f} | {r.get('max_diff_vs_base', '-')} |"
        )
    if "base" in by and "lora" in by:
        changed = by["lora"]["changed_bytes"] / GIB
        held = (by["lora"]["anon_after_load"] - by["base"]["anon_after_load"]) / GIB
        peak = (by["lora"]["peak_after_load"] - by["base"]["peak_after_load"]) / GIB
        lines += ["", f"Changed weights: {by['lora']['changed_initializers']} initializers, {changed:.2f} GiB. "
                  f"With the LoRA the loaded pipeline holds {held:.2f} GiB more of its own memory than without "
                  f"({held / changed:.2f} copies of the changed weights); while the UNet's session is created the "
                  f"peak is {peak:.2f} GiB higher ({peak / changed:.2f} copies)."]  # fmt: skip
    if "diffusers_lora" in by and "lora" in by:
        d, e = by["diffusers_lora"], by["lora"]
        ratio = lambda key, row=e: f"{row[key] / d[key]:.2f}x"  # noqa: E731
        ov = f"{ratio('unet_call_s', by['ov_lora'])}" if "ov_lora" in by else "not run"
        lines += [
            "",
            "Against diffusers with the same LoRA (load_lora_weights + fuse_lora, fp32), same run: "
            f"load with the LoRA {ratio('load_s')} diffusers' time, resident {ratio('rss_after_load')}, peak "
            f"during load {ratio('peak_after_load')}, UNet call {ratio('unet_call_s')} (OpenVINO: {ov}).",
        ]
    (RESULTS / "lora_sd15.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
