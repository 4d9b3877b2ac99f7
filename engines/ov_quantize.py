"""``edgediff optimize --int8 static --engine openvino``: the UNet quantised to int8 by NNCF for OpenVINO.

NNCF's post-training quantisation (``nncf.quantize``) of the OpenVINO model read from the folder's
ONNX UNet: convolutions and MatMuls get int8 weights and int8 activations whose ranges NNCF
measures on ``calibration`` (the UNet inputs of real fp32 runs, ``runtime/calibrate.py``), with the
``TRANSFORMER`` model type (SmoothQuant on the linear layers, the softmax and normalisations kept in
floating point) and the ``MIXED`` preset (symmetric weights, asymmetric activations). The result is
an OpenVINO IR, ``MODEL/openvino-int8/unet/model.xml`` + ``.bin``, with ``key.json``: the source
file's identity and the OpenVINO version it was made with. ``OvEngine(cpu_variant="int8")`` loads it
only while that key matches; a stale one is reported and refused with this command.

Before it is written, the int8 model's output is compared with the fp32 model's on a calibration
input (mid-schedule): max |difference| / (1 + max |fp32|) must stay under ``TOLERANCE``. As for ONNX
Runtime's int8, that bound only catches a broken quantisation; the image check (the embedded
model's fidelity, the benchmarks' image difference) is the real one.

Needs ``nncf`` (the ``int8`` extra) besides ``openvino``. Imported only by the ``optimize`` command.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.files import replace_dir

from . import openvino as ove

logger = logging.getLogger(__name__)

TOLERANCE = 0.5


class QuantizeError(EdgediffError, RuntimeError):
    """The int8 model could not be made or does not reproduce the original's outputs closely enough."""


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / (1 + np.abs(a).max()))


def quantize_unet(folder, calibration: list[dict], calibration_info: dict | None = None, force: bool = False,
                  tolerance: float = TOLERANCE) -> dict:  # fmt: skip
    """Write ``MODEL/openvino-int8/unet`` from ``calibration`` (UNet input samples); returns the report
    (``{"skipped": ...}`` when an up-to-date variant exists and ``force`` is off)."""
    try:
        import nncf
    except ImportError:
        raise QuantizeError("OpenVINO int8 needs NNCF: pip install 'edgediff[int8]'") from None
    if not calibration:
        raise QuantizeError("OpenVINO int8 needs calibration samples (edgediff optimize --int8 static collects them)")
    source = folder.component_path("unet")
    if not force and ove.int8_variant(source, "unet") is not None:
        return {"skipped": "up to date"}
    final = folder.path / ove.INT8_DIR / "unet"
    work = final.parent / f".unet.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    try:
        core = ove.core()
        model = core.read_model(str(source))
        names = [ove._port_name(p) for p in model.inputs]
        dataset = nncf.Dataset([{n: sample[n] for n in names} for sample in calibration])
        nncf_logger = logging.getLogger("nncf")
        level = nncf_logger.level
        nncf_logger.setLevel(logging.ERROR)
        try:
            quantized = nncf.quantize(
                model,
                dataset,
                subset_size=len(calibration),
                model_type=nncf.ModelType.TRANSFORMER,
                preset=nncf.QuantizationPreset.MIXED,
            )
        finally:
            nncf_logger.setLevel(level)
        import openvino as ov

        ov.save_model(quantized, str(work / "model.xml"), compress_to_fp16=False)
        del quantized
        probe = calibration[len(calibration) // 2]
        feeds = {n: probe[n] for n in names}
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        a = core.compile_model(model, "CPU", config).create_infer_request().infer(feeds)[0]
        del model
        b = core.compile_model(str(work / "model.xml"), "CPU", config).create_infer_request().infer(feeds)[0]
        error = _relative_difference(np.asarray(a), np.asarray(b))
        if not error <= tolerance:
            raise QuantizeError(f"unet: the NNCF int8 model differs from the original by {error:.2e} (relative; "
                                f"tolerance {tolerance:g}); nothing was written")  # fmt: skip
        stage = work / "stage"
        stage.mkdir()
        for name in ("model.xml", "model.bin"):
            os.replace(work / name, stage / name)
        key = ove.int8_key(source)
        report = {**key, "nncf": nncf.__version__, "int8_mode": "static", "max_relative_difference": error,
                  "calibration": {"samples": len(calibration), **(calibration_info or {})},
                  "seconds": time.time() - t0}  # fmt: skip
        (stage / ove.KEY_FILE).write_text(json.dumps(report, indent=1) + "\n")
        replace_dir(stage, final)
        shutil.rmtree(folder.path / ove.CACHE_DIR / "unet", ignore_errors=True)  # compiled from the old variant
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
