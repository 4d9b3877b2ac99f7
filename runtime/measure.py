"""What the export check, `edgediff bench`, the CPU variants and the benchmark scripts all measure, in one
place: how far one image or tensor is from another (PSNR), the process's peak memory, and the machine
(``machine_info``: here, not in the bench, because the engines record it too and may not import the bench)."""

from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "neon",
          "asimd", "asimddp", "bf16", "i8mm", "sve")  # fmt: skip
_LIBRARIES = ("edgediff", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "pillow", "onnx", "tensorrt",
              "cuda-python", "openvino", "nncf", "torch", "diffusers", "optimum-onnx")  # fmt: skip


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    """Peak signal-to-noise ratio of ``a`` against ``b`` in dB (inf when equal); ``peak`` is the
    signal's range: 255 for uint8 images, max|reference| for a network's outputs."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10((peak or 1.0) ** 2 / mse)


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (a GEMM ceiling's measurement)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (Linux / macOS), None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, the SIMD flags that matter for inference, memory, OS and library versions."""
    cpu, flags, mhz = platform.processor() or platform.machine(), set(), None
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
        flags = set(m.group(1).split()) if m else set()
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.MULTILINE)
        mhz = float(m.group(1)) if m else None
    except OSError:
        pass
    memory = None
    try:
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        memory = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    versions = {}
    for lib in _LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": cores,
        "cpu_mhz": mhz,
        "flags": sorted(f for f in _FLAGS if f in flags),
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions,
        "gpu": _gpu_name(),
    }


def _gpu_name() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
