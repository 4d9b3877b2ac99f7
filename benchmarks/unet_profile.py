"""Where one UNet call's time goes, by operator, in each CPU engine configuration: the measurement behind the
"why" of a missed target (``benchmarks/results/cpu_targets.md``).

    python benchmarks/unet_profile.py --size 512                      # every configuration
    python benchmarks/unet_profile.py --size 256 --only ort-f32 ov-bf16

ONNX Runtime: its profiler (``enable_profiling``) on the session the engine would run (``edgediff optimize``'s
fused variant, or the int8 one); OpenVINO: ``PERF_COUNT`` and the infer request's profiling info, grouped by the
executed node type and kernel. One warm-up call, then one profiled call, batch 2, on random inputs; each
configuration in its own process. The FLOPs of the convolutions and of everything else are counted on the
exported ONNX graph, so the convolutions' GFLOP/s can be set against the engine's own GEMM ceiling at that
precision (``edgediff bench``'s). Writes ``benchmarks/results/unet_profile_<arch>_<size>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS = {
    "ort-f32": {"engine": "onnxruntime"},
    "ort-int8": {"engine": "onnxruntime", "cpu_variant": "int8"},
    "ov-f32": {"engine": "openvino", "precision": "f32"},
    "ov-bf16": {"engine": "openvino", "precision": "bf16"},
    "ov-int8": {"engine": "openvino", "precision": "f32", "cpu_variant": "int8"},
    "ov-int8-bf16": {"engine": "openvino", "precision": "bf16", "cpu_variant": "int8"},
}


def _feeds(folder: Path, size: int):
    import numpy as np

    from edgediff.runtime.model_folder import ModelFolder

    mf = ModelFolder.open(folder)
    shapes = mf.spec("unet").input_shapes(mf.symbols(1, size, size), guidance=True)
    rng = np.random.default_rng(0)
    return {
        k: (rng.standard_normal(v).astype(np.float32) if v else np.array(500, np.float32)) for k, v in shapes.items()
    }


def _worker(folder: Path, size: int, config: dict, threads: int) -> dict:
    feeds = _feeds(folder, size)
    by_op: dict[str, float] = defaultdict(float)
    if config["engine"] == "onnxruntime":
        import onnxruntime as ort

        from edgediff.engines.onnxruntime import make_session_options, saved_cpu_variant

        unet = folder / "unet" / "model.onnx"
        path = saved_cpu_variant(unet, "unet", "int8" if config.get("cpu_variant") == "int8" else "fp32") or unet
        so = make_session_options(threads, "disable" if path != unet else "all")
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"edgediff-unet-profile-{os.getpid()}")
        session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        t0 = time.perf_counter()
        session.run(None, feeds)
        wall = time.perf_counter() - t0
        profile = Path(session.end_profiling())
        events = json.loads(profile.read_text())
        runs = [e for e in events if e.get("name") == "model_run"]
        last_start = runs[-1]["ts"] if runs else 0
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
                by_op[e["args"]["op_name"]] += e["dur"] / 1e6
        profile.unlink(missing_ok=True)
        kernel = {}
    else:
        from edgediff.engines.openvino import OvEngine

        eng = OvEngine(folder / "unet" / "model.onnx", "unet", precision=config["precision"], threads=threads,
                       cpu_variant=config.get("cpu_variant", "auto"))  # fmt: skip
        eng.config["PERF_COUNT"] = True
        eng.run(feeds)
        request = eng.request
        t0 = time.perf_counter()
        eng.run(feeds)
        wall = time.perf_counter() - t0
        kernel: dict[str, float] = defaultdict(float)
        for info in request.profiling_info:
            seconds = info.real_time.total_seconds()
            by_op[info.node_type] += seconds
            kernel[f"{info.node_type} [{info.exec_type}]"] += seconds
    return {"wall_s": wall, "by_op_s": dict(by_op), "by_kernel_s": dict(kernel)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), default=None)
    p.add_argument("--worker", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from full_size_models import DEFAULT_ROOT

    folder = args.model or DEFAULT_ROOT / f"{args.arch}-onnx"
    if args.worker:
        print(json.dumps(_worker(folder, args.size, CONFIGS[args.worker], args.threads)))
        return
    from edgediff.runtime.bench import machine_info
    from edgediff.runtime.flops import count_flops
    from edgediff.runtime.model_folder import ModelFolder
    from provenance import command_and_date

    mf = ModelFolder.open(folder)
    shapes = mf.spec("unet").input_shapes(mf.symbols(1, args.size, args.size), guidance=True)
    flops = count_flops(mf.component_path("unet"), {k: list(v) for k, v in shapes.items()})
    rows = {}
    for label in args.only or CONFIGS:
        cmd = [sys.executable, __file__, "--worker", label, "--size", str(args.size), "--threads", str(args.threads)]
        cmd += ["--model", str(folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        rows[label] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                       else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]})  # fmt: skip
        print(label, json.dumps(rows[label])[:300], file=sys.stderr, flush=True)
    report = {"machine": machine_info(), **command_and_date(__file__, argv), "size": args.size,
              "unet_flops": flops["total"], "flops_by_op": flops["by_op"], "results": rows}  # fmt: skip
    stem = RESULTS / f"unet_profile_{args.arch}_{args.size}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    conv = flops["by_op"].get("Conv", 0.0)
    lines = [
        f"# One UNet call by operator: {args.arch}, {args.size} px, batch 2, {args.threads} threads",
        "",
        f"`{report['command']}` on {report['date']}; {report['machine']['cpu']} "
        f"({', '.join(report['machine']['flags'])}). UNet: {flops['total'] / 1e9:.0f} GFLOP per call, of which "
        f"convolutions {conv / 1e9:.0f} GFLOP (ONNX graph count).",
        "",
    ]
    for label, r in rows.items():
        if "error" in r:
            lines += [f"## {label}: failed: {r['error']}", ""]
            continue
        total = sum(r["by_op_s"].values()) or 1.0
        conv_s = sum(v for k, v in r["by_op_s"].items() if "conv" in k.lower())
        lines += [f"## {label}: {r['wall_s']:.2f} s per call ({flops['total'] / r['wall_s'] / 1e9:.0f} GFLOP/s); "
                  f"convolutions {conv_s:.2f} s ({conv / conv_s / 1e9 if conv_s else 0:.0f} GFLOP/s)", "",
                  "| operator | seconds | share |", "|---|---|---|"]  # fmt: skip
        for op, sec in sorted(r["by_op_s"].items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"| {op} | {sec:.3f} | {sec / total * 100:.1f} % |")
        if r.get("by_kernel_s"):
            top = sorted(r["by_kernel_s"].items(), key=lambda kv: -kv[1])[:6]
            lines += ["", "Kernels: " + "; ".join(f"{k} {v:.2f} s" for k, v in top)]
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
