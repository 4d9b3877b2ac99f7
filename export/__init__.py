"""The PyTorch side: a local diffusers Stable Diffusion folder -> a validated ONNX model folder.

    from edgediff.export import export_model
    export_model("stable-diffusion-v1-5", "sd15-onnx")

Steps: load the pipeline; export each component to ONNX; (``fp16``) convert; validate every
component against its PyTorch original and report all mismatches at once; write tokenizer
(with ``tokenizer.json``), scheduler, configs and the ``edgediff.json`` manifest; then move the
finished folder into place. Nothing is written at OUT until everything passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

from edgediff.runtime.errors import ExportError, ExportValidationError
from edgediff.runtime.model_folder import MANIFEST, MANIFEST_FORMAT, ONNX_FILE, sha256_file

logger = logging.getLogger(__name__)

SUPPORTED_PIPELINES = {"StableDiffusionPipeline", "OnnxStableDiffusionPipeline"}
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("edgediff", "torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_source(source: Path) -> dict:
    if not source.exists():
        raise ExportError(f"SOURCE {source} does not exist; pass a local diffusers model folder")
    index = source / "model_index.json"
    if not source.is_dir() or not index.is_file():
        raise ExportError(
            f"SOURCE {source} is not a diffusers model folder (no model_index.json); "
            "pass the folder of a Stable Diffusion 1.x/2.x model as saved by diffusers"
        )
    try:
        info = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{index} is not valid JSON ({e})") from e
    cls = info.get("_class_name")
    if cls != "StableDiffusionPipeline":
        raise ExportError(
            f"SOURCE {source} holds a {cls!r}; edgediff exports StableDiffusionPipeline models (SD 1.x / 2.x)"
        )
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (source / comp).is_dir():
            raise ExportError(f"SOURCE {source} has no {comp}/ folder; it is not a complete diffusers model")
    return info


def _family(pipe) -> str:
    return "sd2" if getattr(pipe.text_encoder.config, "hidden_act", "") == "gelu" else "sd1"


def _io_specs(path: Path) -> dict:
    import numpy as np
    import onnx

    from edgediff.runtime.specs import TensorSpec

    model = onnx.load(str(path), load_external_data=False)
    dtypes = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 11: "float64"}

    def spec(v):
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return TensorSpec(v.name, np.dtype(dtypes[t.elem_type]), tuple(shape)).to_json()

    return {"inputs": [spec(v) for v in model.graph.input], "outputs": [spec(v) for v in model.graph.output]}


def export_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    fp16: bool = False,
    force: bool = False,
    opset: int = 17,
    progress: bool = False,
    device: str = "cpu",
) -> Path:
    """Export ``source`` (a local diffusers folder) to the model folder ``out``; return ``out``.

    ``device="cuda"`` traces and validates on the GPU (same ONNX; much faster for full-size models)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm import tqdm
    from transformers import CLIPTokenizerFast

    from .fp16 import convert_to_fp16
    from .onnx_export import export_component
    from .validate import check_component

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    source, out = Path(source), Path(out)
    _check_source(source)
    if out.exists() and not force:
        raise ExportError(f"OUT {out} already exists; pass --force (force=True) to replace it")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, local_files_only=True, safety_checker=None, requires_safety_checker=False,
            torch_dtype=torch.float32, low_cpu_mem_usage=False,
        )  # fmt: skip
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ExportError(f"SOURCE {source} cannot be loaded by diffusers ({type(e).__name__}: {e})") from e
    if device != "cpu":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ExportError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu")
        pipe.to(device)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        precision: dict[str, str] = {}
        failures: list[str] = []
        notes: dict[str, str] = {}
        bar = tqdm(COMPONENTS, desc="export", unit="component", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            path = export_component(pipe, name, tmp / name, opset=opset, device=device)
            checks = check_component(pipe, name, path, "fp32", device=device)
            bad = [c for c in checks if not c.passed]
            precision[name] = "fp32"
            if fp16 and not bad:
                fp16_dir = tmp / f".{name}-fp16"
                fp16_dir.mkdir()
                convert_to_fp16(path, fp16_dir / ONNX_FILE)
                checks16 = check_component(pipe, name, fp16_dir / ONNX_FILE, "fp16", device=device)
                bad16 = [c for c in checks16 if not c.passed]
                if not bad16:
                    shutil.rmtree(tmp / name)
                    fp16_dir.rename(tmp / name)
                    precision[name], checks = "fp16", checks16
                elif name == "vae_decoder":
                    shutil.rmtree(fp16_dir)
                    notes[name] = "kept fp32: fp16 output out of tolerance (" + bad16[0].describe() + ")"
                    logger.warning("vae_decoder: %s", notes[name])
                else:
                    bad = bad16
            for c in checks:
                logger.info("validated %s", c.describe())
            failures += [c.describe() + f" exceeds the {precision[name]} tolerance" for c in bad]
        if failures:
            raise ExportValidationError(failures)
        index = _write_side_files(pipe, source, tmp, CLIPTokenizerFast)
        _write_manifest(pipe, tmp, precision, notes, opset, source)
        # model_index.json goes last: the runtime refuses a folder without it
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_side_files(pipe, source: Path, tmp: Path, fast_tokenizer_cls) -> dict:
    pipe.tokenizer.save_pretrained(tmp / "tokenizer")
    # tokenizer.json: what the runtime loads with `tokenizers` alone
    fast_tokenizer_cls.from_pretrained(source / "tokenizer").save_pretrained(tmp / "tokenizer")
    pipe.scheduler.save_config(tmp / "scheduler")
    pipe.text_encoder.config.to_json_file(tmp / "text_encoder" / "config.json")
    pipe.unet.save_config(tmp / "unet")
    pipe.vae.save_config(tmp / "vae_decoder")
    pipe.vae.save_config(tmp / "vae_encoder")
    index = {
        "_class_name": "OnnxStableDiffusionPipeline",
        "_diffusers_version": metadata.version("diffusers"),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "text_encoder": ["diffusers", "OnnxRuntimeModel"],
        "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
        "unet": ["diffusers", "OnnxRuntimeModel"],
        "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
        "vae_encoder": ["diffusers", "OnnxRuntimeModel"],
    }
    return index


def _write_manifest(pipe, tmp: Path, precision: dict, notes: dict, opset: int, source: Path) -> None:
    vae_cfg, unet_cfg = pipe.vae.config, pipe.unet.config
    down = 2 ** (len(vae_cfg.block_out_channels) - 1)
    size = unet_cfg.sample_size if isinstance(unet_cfg.sample_size, int) else unet_cfg.sample_size[0]
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    components = {
        name: {"file": f"{name}/{ONNX_FILE}", "precision": precision[name], **_io_specs(tmp / name / ONNX_FILE)}
        for name in COMPONENTS
    }
    for name, note in notes.items():
        components[name]["note"] = note
    manifest = {
        "format": MANIFEST_FORMAT,
        "family": _family(pipe),
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "vae_scaling_factor": float(vae_cfg.scaling_factor),
        "latent_channels": int(vae_cfg.latent_channels),
        "vae_downscale": down,
        "native_size": [size * down, size * down],
        "text_embedding_dim": int(pipe.text_encoder.config.hidden_size),
        "tokenizer": {"pad_token": str(pipe.tokenizer.pad_token), "max_length": int(pipe.tokenizer.model_max_length)},
        "opset": opset,
        "components": components,
        "files": files,
        "tools": _versions(),
        "source": source.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # written last: a folder without a manifest never looks complete
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
