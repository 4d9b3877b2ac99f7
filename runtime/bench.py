"""``edgediff bench``: latency of one model folder, stage by stage, on this machine.

Protocol (as ONNX Runtime's and TensorRT's own Stable Diffusion benchmarks): engine load time per
component, one cold first run, ``warmup`` more untimed runs, then ``runs`` timed runs. Over the
timed runs: median and p90 of each stage, median / p90 / p99 of every UNet call, host-side time
per step (everything in the loop that is not an engine call: scheduler, guidance, copies; the
bench passes no progress callback, and the pipeline's ``host`` leaves a callback's time out),
steps per second, peak resident memory, each engine's own ``stats()`` where it has them
(TensorRT: CUDA-event times per call, device memory), and the machine. ``report_json`` is the
schema that ``--json`` prints; ``format_table`` the terminal view.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .measure import best_seconds, machine_info, peak_rss_bytes

SCHEMA_VERSION = 1
STAGES = ("tokenize", "text_encoder", "unet", "host", "denoise", "vae_decoder", "postprocess", "image_encode", "total")


def _percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def summary(values) -> dict[str, Any]:
    """median, p90, p99, mean, min, max (seconds) of ``values``."""
    return {
        "median": _percentile(values, 50),
        "p90": _percentile(values, 90),
        "p99": _percentile(values, 99),
        "mean": float(np.mean(values)) if len(values) else None,
        "min": float(np.min(values)) if len(values) else None,
        "max": float(np.max(values)) if len(values) else None,
        "n": len(values),
    }


def cpu_peak_gflops(machine: dict[str, Any], threads: int | None) -> float | None:
    """Nominal fp32 peak of the cores used: cores x GHz x FLOP per cycle (two FMA pipes:
    32 with AVX2+FMA, 64 with AVX-512). A nominal figure at the reported clock, not a measurement."""
    if machine.get("arch") not in ("x86_64", "AMD64") or not machine.get("cpu_mhz"):
        return None
    per_cycle = 64 if "avx512f" in machine["flags"] else 32 if "fma" in machine["flags"] else 16
    cores = min(threads or machine["usable_cpus"], machine["usable_cpus"])
    return cores * machine["cpu_mhz"] / 1000 * per_cycle


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved fp32 GFLOP/s of numpy's BLAS on an n x n matrix product (best of ``repeats``): a
    measured ceiling to set the UNet's rate against, where the nominal peak needs a clock the
    machine may not report (a VM shows its base clock, the cores boost above it)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats) / 1e9


def run_bench(
    model: str | os.PathLike | None = None,
    *,
    prompt: str = "a red circle on a blue background",
    steps: int = 20,
    width: int | None = None,
    height: int | None = None,
    batch: int = 1,
    guidance: float = 7.5,
    scheduler: str | None = None,
    engine: str = "onnxruntime",
    providers: list[str] | None = None,
    threads: int | None = None,
    warmup: int = 1,
    runs: int = 3,
    low_memory: bool = False,
    memory_limit: int | str | None = "auto",
    engine_options: dict[str, Any] | None = None,
    seed: int = 0,
    flops: bool = True,
    progress=None,
) -> dict[str, Any]:
    """Run the protocol and return the report (``report_json`` schema)."""
    from .errors import InvalidArgumentError
    from .pipeline import Pipeline

    for name, v, lo in (("runs", runs, 1), ("warmup", warmup, 0), ("batch", batch, 1), ("steps", steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {v!r}")
    options = dict(engine_options or {})
    if threads is not None and engine in ("onnxruntime", "openvino"):
        options["threads"] = threads
    machine = machine_info()
    t0 = time.perf_counter()
    pipe = Pipeline.load(
        model, engine=engine, providers=providers, low_memory=low_memory, memory_limit=memory_limit, **options
    )
    load_total = time.perf_counter() - t0
    call: dict[str, Any] = dict(
        prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
        scheduler=scheduler, num_images_per_prompt=batch,
    )  # fmt: skip
    records = []
    try:
        for i in range(1 + warmup + runs):
            if progress:
                progress(i, 1 + warmup + runs)
            t_run = time.perf_counter()
            result = pipe(seed=seed + i, **call)
            t_enc = time.perf_counter()
            for image in result.images:  # PNG encode, as `edgediff generate` writes it (to memory here)
                image.save(io.BytesIO(), format="PNG")
            timings = dict(result.timings, image_encode=time.perf_counter() - t_enc)
            timings["total"] = time.perf_counter() - t_run  # end to end: prompt in, PNG bytes out
            records.append((timings, result.unet_calls))
        params = result.parameters
        unet_flops = unet_input_shapes = None
        if flops:
            unet_input_shapes = _unet_shapes(pipe, params, batch, guidance)
            if unet_input_shapes is not None:
                unet_flops = _count_flops(pipe.folder.component_path("unet"), unet_input_shapes)
        files = {name: str(getattr(eng, "model_file", "")) for name, eng in pipe.engines.items()}
        device = {}
        for name, eng in pipe.engines.items():
            stats = getattr(eng, "stats", None)
            if callable(stats):
                device[name] = stats()
    finally:
        pipe.close()

    cold, timed = records[0], records[1 + warmup :]
    stages = {}
    for stage in STAGES:
        values = [t[stage] for t, _ in timed if stage in t]
        stages[stage] = summary(values)
    unet_calls = [c for _, calls in timed for c in calls]
    n_steps = len(timed[0][1])
    denoise = stages["denoise"]["median"]
    unet_call = summary(unet_calls)
    report = {
        "schema": SCHEMA_VERSION,
        "machine": machine,
        "model": str(pipe.folder.path),
        "settings": {
            "engine": engine,
            "providers": providers,
            "threads": threads,
            "low_memory": low_memory,
            "steps": n_steps,
            "width": params["width"],
            "height": params["height"],
            "batch": batch,
            "guidance": guidance,
            "scheduler": params["scheduler"],
            "warmup": warmup,
            "runs": runs,
            "unet_batch": batch * (2 if guidance > 1 else 1),
            "engine_options": options,
        },
        "engine_files": files,
        "load": {"total": load_total, **{f"{k}": v for k, v in pipe.load_times.items()}},
        "cold_run": {k: v for k, v in cold[0].items()},
        "stages": stages,
        "unet_call": unet_call,
        "host_per_step": stages["host"]["median"] / n_steps if stages["host"]["median"] is not None else None,
        "host_fraction": stages["host"]["median"] / denoise if denoise else None,
        "steps_per_second": n_steps / denoise if denoise else None,
        "images_per_second": batch / stages["total"]["median"],
        "peak_rss_bytes": peak_rss_bytes(),
        "device": device or None,
        "unet_flops": unet_flops,
        "unet_input_shapes": unet_input_shapes,
    }
    if unet_flops and unet_call["median"]:
        report["unet_gflops_per_s"] = unet_flops / unet_call["median"] / 1e9
        peak = cpu_peak_gflops(machine, threads) if not device else None
        report["cpu_peak_gflops"] = peak
        report["unet_fraction_of_peak"] = report["unet_gflops_per_s"] / peak if peak else None
        if not device:
            report["sgemm_gflops"] = sgemm_gflops()
            report["unet_fraction_of_sgemm"] = report["unet_gflops_per_s"] / report["sgemm_gflops"]
            report.update(_precision_ceiling(engine, options, threads, report["sgemm_gflops"]))
            if report.get("ceiling_gflops"):
                report["unet_fraction_of_ceiling"] = report["unet_gflops_per_s"] / report["ceiling_gflops"]
    return report


def unet_precision(engine: str, options: dict[str, Any]) -> str:
    """The arithmetic the UNet ran in: ``int8`` (an int8 variant), else the engine's precision (f32 by default)."""
    if options.get("cpu_variant") == "int8":
        return "int8"
    return str(options.get("precision", "f32")) if engine == "openvino" else "f32"


def _precision_ceiling(engine: str, options: dict[str, Any], threads: int | None, sgemm: float) -> dict[str, Any]:
    """The ceiling of the precision the UNet ran in: numpy's SGEMM for f32, the engine's own dense GEMM for
    bf16 / f16 / int8 (2048 x 2048, best of 5), None where the engine cannot measure it."""
    precision = unet_precision(engine, options)
    if precision == "f32":
        return {"unet_precision": precision, "ceiling_gflops": sgemm, "ceiling_of": "numpy SGEMM (fp32)"}
    from .engine import engine_class

    try:  # the engine class's own dense GEMM (OrtEngine / OvEngine.gemm_gflops)
        value = engine_class(engine).gemm_gflops(precision, threads)
    except Exception:  # a ceiling that cannot be measured must not fail the benchmark
        value = None
    what = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime MatMulInteger"}.get(engine, engine)
    return {"unet_precision": precision, "ceiling_gflops": value, "ceiling_of": f"{what} {precision} GEMM"}


def _unet_shapes(pipe, params: dict, batch: int, guidance: float) -> dict[str, list[int]] | None:
    """The UNet's input shapes of the run, from the I/O contract (None when the model's D is unknown)."""
    if pipe.folder.text_embedding_dim is None:
        return None
    symbols = pipe.folder.symbols(batch, params["height"], params["width"])
    shapes = pipe.folder.spec("unet").input_shapes(symbols, guidance=guidance > 1)
    return {name: list(shape) for name, shape in shapes.items()}


def _count_flops(path: Path, shapes: dict[str, list[int]]) -> float | None:
    try:
        from .flops import count_flops
    except ImportError:  # onnx not installed: the lean install has no graph reader
        return None
    try:
        return count_flops(path, shapes)["total"]
    except Exception:  # a graph we cannot analyse must not fail the benchmark
        return None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.0f} MiB"


def format_table(report: dict[str, Any]) -> str:
    """The terminal view of a report."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"model      {report['model']}",
        f"machine    {m['cpu']} ({m['usable_cpus']} CPUs, {', '.join(m['flags']) or 'no SIMD flags read'})"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        "libraries  " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()),
        f"settings   {s['engine']}{' ' + ','.join(s['providers']) if s['providers'] else ''} "
        f"{unet_precision(s['engine'], s.get('engine_options') or {})}, "
        f"{s['width']}x{s['height']}, batch {s['batch']} (UNet batch {s['unet_batch']}), {s['steps']} steps "
        f"{s['scheduler']}, guidance {s['guidance']}, threads {s['threads'] or 'default'}"
        f"{', low-memory' if s['low_memory'] else ''}; {s['warmup']} warm-up + {s['runs']} timed runs",
        "",
        "load       " + ", ".join(f"{k} {_ms(v)} ms" for k, v in report["load"].items()),
        f"cold run   {_ms(report['cold_run']['total'])} ms (first call after load)",
        "",
        f"{'stage':<14}{'median ms':>12}{'p90 ms':>12}",
    ]
    for stage in STAGES:
        st = report["stages"][stage]
        if st["n"]:
            lines.append(f"{stage:<14}{_ms(st['median']):>12}{_ms(st['p90']):>12}")
    u = report["unet_call"]
    lines += [
        "",
        f"UNet call    median {_ms(u['median'])} ms, p90 {_ms(u['p90'])} ms, p99 {_ms(u['p99'])} ms ({u['n']} calls)",
        f"host/step    {_ms(report['host_per_step'])} ms ({(report['host_fraction'] or 0) * 100:.2f} % of the loop)",
        f"steps/s      {report['steps_per_second']:.2f}",
        f"peak RSS     {_mib(report['peak_rss_bytes'])}",
    ]
    if report.get("unet_flops"):
        line = (
            f"UNet         {report['unet_flops'] / 1e9:.1f} GFLOP per call, {report['unet_gflops_per_s']:.1f} GFLOP/s"
        )
        if report.get("cpu_peak_gflops"):
            line += (
                f" = {report['unet_fraction_of_peak'] * 100:.0f} % of the CPU's nominal "
                f"{report['cpu_peak_gflops']:.0f} GFLOP/s"
                + (" (at the reported clock; this CPU boosts above it)" if report["unet_fraction_of_peak"] > 1 else "")
            )
        if report.get("sgemm_gflops"):
            share = report["unet_fraction_of_sgemm"] * 100
            line += f", {share:.0f} % of numpy's SGEMM ({report['sgemm_gflops']:.0f} GFLOP/s)"
        lines.append(line)
        if report.get("ceiling_gflops") and report.get("unet_precision") != "f32":
            share = report["unet_fraction_of_ceiling"] * 100
            lines.append(f"ceiling      {report['unet_precision']}: {share:.0f} % of {report['ceiling_of']} "
                         f"({report['ceiling_gflops']:.0f} GFLOP/s)")  # fmt: skip
    for name, stats in (report.get("device") or {}).items():  # per-call lists (every call since load): medians
        parts = [f"{k} median {np.median(v):.2f}" if isinstance(v, list) else f"{k} {v}"
                 for k, v in stats.items() if v != []]  # fmt: skip
        lines.append(f"{name:<13}" + ", ".join(parts))
    return "\n".join(lines)
