"""Two measurements the export check, `edgediff bench` and the benchmark scripts all take, in one
place: how far one image or tensor is from another (PSNR), and the process's peak memory."""

from __future__ import annotations

import math
import sys

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    """Peak signal-to-noise ratio of ``a`` against ``b`` in dB (inf when equal); ``peak`` is the
    signal's range: 255 for uint8 images, max|reference| for a network's outputs."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10((peak or 1.0) ** 2 / mse)


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (Linux / macOS), None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB
