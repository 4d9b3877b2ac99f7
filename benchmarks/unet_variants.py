"""What each CPU engine setting (ONNX Runtime, OpenVINO) does to one UNet call: time, load, memory, and output.

    python benchmarks/unet_variants.py                  # SD 1.5 architecture, 512 and 256 px
    python benchmarks/unet_variants.py --sizes 256 --calls 2
    python benchmarks/unet_variants.py --only OpenVINO fused  # the configurations whose label has a word

OpenVINO's static-shape configurations compile on the first call (for that call's shapes), so their
cold call includes the compile. "cache on, cold" empties the model folder's compiled-model cache
first and writes it; "cache on, warm" loads from it (off by default on the CPU: these rows are why).

Each configuration runs in its own fresh process (so load time and peak memory are its own) on
the same random inputs (batch 2, as with guidance); the first call is the cold one and is
reported apart, the median is over the rest. The output of every configuration is compared with
the exported graph's at ONNX Runtime's default settings: max |difference| / max |reference|.
Needs `edgediff optimize MODEL` and `edgediff optimize MODEL --int8` run first for the variants
(configurations whose files are missing are reported as such). Results go to
``benchmarks/results/unet_variants_<arch>.{md,json}`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

CONFIGS = {  # label -> engine options (threads added from --threads; "engine" picks the engine, default ORT)
    "exported graph, ORT level all (ORT's default)": {"cpu_variant": "off"},
    "exported graph, ORT level basic": {"cpu_variant": "off", "optimization": "basic"},
    "edgediff optimize: fused, flash attention, saved (default)": {},
    "  + prepack off": {"prepack": False},
    "  + memory arena off": {"mem_arena": False},
    "  + I/O binding": {"io_binding": True},
    "edgediff optimize --int8 (opt-in)": {"cpu_variant": "int8"},
    "OpenVINO f32, static shapes (default)": {"engine": "openvino"},
    "OpenVINO f32, static shapes, cache on, cold": {"engine": "openvino", "cache": True, "_clear_cache": True},
    "OpenVINO f32, static shapes, cache on, warm": {"engine": "openvino", "cache": True},
    "OpenVINO f32, dynamic shapes": {"engine": "openvino", "shapes": "dynamic"},
    "OpenVINO bf16, static shapes (opt-in)": {"engine": "openvino", "precision": "bf16"},
}


def _worker(args) -> dict:
    import shutil

    import numpy as np

    from edgediff.runtime.engine import create_engine
    from edgediff.runtime.measure import peak_rss_bytes
    from edgediff.runtime.model_folder import ModelFolder

    options = json.loads(args.options)
    kind = options.pop("engine", "onnxruntime")
    if options.pop("_clear_cache", False):
        shutil.rmtree(Path(args.unet).parent.parent / "openvino-cache" / "unet", ignore_errors=True)
    t0 = time.perf_counter()
    engine = create_engine(kind, args.unet, "unet", threads=args.threads, **options)
    load = time.perf_counter() - t0
    rss_load = peak_rss_bytes()
    folder = ModelFolder.open(Path(args.unet).parent.parent)
    rng = np.random.default_rng(0)
    shapes = folder.spec("unet").input_shapes(folder.symbols(1, args.size, args.size), guidance=True)
    feeds = {
        "sample": rng.standard_normal(shapes["sample"], dtype=np.float32),
        "timestep": np.array(500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"], dtype=np.float32),
    }
    calls = []
    for _ in range(args.calls):
        t = time.perf_counter()
        out = engine.run(feeds)
        calls.append(time.perf_counter() - t)
    np.save(args.out, next(iter(out.values())))
    return {
        "file": str(engine.model_file),
        "load_s": load,
        "cold_call_s": calls[0],
        "call_median_s": float(np.median(calls[1:])) if len(calls) > 1 else calls[0],
        "calls_s": calls,
        "rss_after_load_bytes": rss_load,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def run(unet: Path, size: int, calls: int, threads: int, only: list[str] | None = None) -> list[dict]:
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for label, options in CONFIGS.items():
            if only and not any(w.lower() in label.lower() for w in only) and reference is not None:
                continue  # (the first configuration always runs: it is the reference)
            out = Path(tmp) / f"{len(rows)}.npy"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--unet",
                str(unet),
                "--size",
                str(size),
                "--calls",
                str(calls),
                "--threads",
                str(threads),
                "--options",
                json.dumps(options),
                "--out",
                str(out),
            ]
            print(f"{size} px: {label.strip()} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            row = {"size": size, "config": label, "options": options}
            if proc.returncode != 0:
                row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
            else:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                result = np.load(out)
                if reference is None:
                    reference = result
                row["max_rel_diff_vs_exported"] = float(np.abs(result - reference).max() / np.abs(reference).max())
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def write_markdown(path: Path, report: dict) -> None:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# One UNet call per CPU engine setting: {s['arch']} architecture (random weights), batch 2",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs ({', '.join(m['flags'])}); threads {s['threads']}. "
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()),
        f"Run: `{s['command']}` on {s['date']}; each configuration in a fresh process, {s['calls']} calls "
        "(the first is the cold one; the median is over the others).",
        "",
        "| size | configuration | call median (s) | cold call (s) | load (s) | RSS after load (GiB) | peak RSS (GiB) "
        "| output vs exported (max rel.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        name = r["config"].replace("  + ", "&nbsp;&nbsp;+ ")
        if "error" in r:
            lines.append(f"| {r['size']} | {name} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['size']} | {name} | {r['call_median_s']:.2f} | {r['cold_call_s']:.2f} | {r['load_s']:.2f} | "
            f"{r['rss_after_load_bytes'] / 2**30:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
            f"{r['max_rel_diff_vs_exported']:.1e} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15", choices=("sd15", "sd21-base"))
    p.add_argument("--model", type=Path, default=None, help="an edgediff model folder instead of --arch's")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="only the configurations whose label contains one of these (and the first, the reference)",
    )
    p.add_argument("--label", default="", help="suffix of the results files")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--unet", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--options", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    sys.path.insert(0, str(HERE))
    from edgediff.runtime.measure import machine_info
    from full_size_models import DEFAULT_ROOT, ensure
    from provenance import command_and_date

    folder = args.model or ensure(args.arch, DEFAULT_ROOT)[1]
    results = [row for size in args.sizes for row in run(Path(folder) / "unet" / "model.onnx", size, args.calls,
                                                          args.threads, args.only)]  # fmt: skip
    report = {
        "machine": machine_info(),
        "settings": {
            "arch": "given folder" if args.model else args.arch,
            "threads": args.threads,
            "calls": args.calls,
            **command_and_date(__file__, argv),
        },
        "results": results,
    }
    stem = RESULTS / f"unet_variants_{args.arch if not args.model else Path(args.model).name}{args.label}"
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(stem.with_suffix(".md"), report)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
