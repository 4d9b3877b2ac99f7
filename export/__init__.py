"""The PyTorch side: a local diffusers Stable Diffusion folder -> a validated ONNX model folder.

    from edgediff.export import export_model
    export_model("stable-diffusion-v1-5", "sd15-onnx")

Steps: load the pipeline; export each component to ONNX; (``fp16``) convert; validate every
component against its PyTorch original and report all mismatches at once; write tokenizer
(with ``tokenizer.json``), scheduler, configs and the ``edgediff.json`` manifest; then move the
finished folder into place. Nothing is written at OUT until everything passed.

Safety (all checked before torch is even imported, on resolved paths, so ``..``, relative paths and
symlinks cannot hide a clash):

* OUT is never SOURCE nor a folder that contains SOURCE; an existing OUT inside SOURCE is never replaced.
* An existing OUT needs ``force``; a regular file at OUT is always refused.
* ``force`` replaces only a *replaceable* folder: an empty one, or an ONNX model folder, meaning it
  has ``model_index.json`` and ``unet/model.onnx`` (what edgediff, optimum's exporter, optimum's
  ``ORTStableDiffusionPipeline`` and diffusers' ``OnnxStableDiffusionPipeline`` all write; a diffusers
  source has no ``model.onnx``) and no PyTorch weights (``.safetensors``/``.bin``/``.ckpt``/``.pt``/
  ``.pth``) anywhere in it. Anything else may be the user's own files: refused, never deleted.
  The rule is checked again just before the swap, in case OUT changed during the export.
* One export per OUT at a time: an exclusive ``flock`` on ``.OUT.lock`` beside OUT (holding the
  owner's pid) makes a second one refuse at once. The holder deletes the lock file before
  releasing it; a waiter that locked a deleted file sees a different inode and retries, so the
  deletion is race-free. A SIGKILLed export leaves an unlocked ``.OUT.lock``: harmless, reused.
  Without ``fcntl`` (Windows) the lock file is created exclusively instead; a stale one is then
  reported and must be deleted by hand.
* A ``.OUT.partial-PID`` folder is removed only when process PID is gone (never on Windows, where
  no safe liveness check exists).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from edgediff.runtime import specs
from edgediff.runtime.errors import ExportError, ExportValidationError, ModelConfigError
from edgediff.runtime.files import replace_dir
from edgediff.runtime.model_folder import MANIFEST, MANIFEST_FORMAT, ONNX_FILE, sha256_file

logger = logging.getLogger(__name__)

# 14: scaled_dot_product_attention (every attention block) has no symbolic below it; 20: the highest
# opset torch's TorchScript exporter supports (above it torch only warns and stamps the number)
MIN_OPSET, MAX_OPSET = 14, 20
_TORCH_WEIGHTS = {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}

# diffusers probes for optimum-quanto by the top-level name "optimum", which both the `optimum` and
# `optimum-onnx` distributions provide, and warns on every import; the pick does not matter to us
logging.getLogger("diffusers.utils.import_utils").addFilter(
    lambda r: not r.getMessage().startswith("Multiple distributions found for package optimum")
)


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
    if cls not in specs.source_pipelines():
        raise ExportError(
            f"SOURCE {source} holds a {cls!r}; edgediff exports {', '.join(specs.source_pipelines())} models "
            f"({', '.join(specs.FAMILIES)})"
        )
    family = _source_family(info)
    for comp in family.source_components:
        if not (source / comp).is_dir():
            raise ExportError(f"SOURCE {source} has no {comp}/ folder; it is not a complete diffusers model")
    return info


def _check_opset(opset) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset!r} is not supported; edgediff exports opsets {MIN_OPSET} to {MAX_OPSET} (default 17)"
        )


def _within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it, by file identity (also sees bind mounts, case folding)."""
    try:
        want = folder.stat()
    except OSError:
        return False
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            if os.path.samestat(p.stat(), want):
                return True
    return False


def _replaceable(folder: Path) -> bool:
    try:
        if not any(folder.iterdir()):
            return True
        if not ((folder / "model_index.json").is_file() and (folder / "unet" / ONNX_FILE).is_file()):
            return False
        return not any(p.suffix in _TORCH_WEIGHTS for p in folder.rglob("*"))
    except OSError:  # unreadable: not ours to delete
        return False


def _check_out(src: Path, dst: Path, out: Path, force: bool) -> None:
    """``src``/``dst``: resolved SOURCE and OUT; ``out``: OUT as given, for the messages."""
    shown = str(out) if str(out) == str(dst) else f"{out} (= {dst})"
    if _within(src, dst):
        what = "is SOURCE" if os.path.samefile(src, dst) else f"contains SOURCE {src}"
        raise ExportError(f"OUT {shown} {what}; replacing it would delete the source: choose another OUT")
    if not os.path.lexists(dst):
        return
    if not dst.is_dir():
        raise ExportError(f"OUT {shown} is a file, not a folder; choose another OUT or delete the file yourself")
    if not force:
        raise ExportError(f"OUT {shown} already exists; pass --force (force=True) to replace it")
    if _within(dst, src):
        raise ExportError(f"OUT {shown} is inside SOURCE {src}; --force will not delete it: choose another OUT")
    if not _replaceable(dst):
        raise ExportError(
            f"OUT {shown} is not an ONNX model folder (that needs model_index.json and unet/{ONNX_FILE}, and no "
            "PyTorch weights), so --force will not delete it: choose another OUT or delete it yourself"
        )


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows; keep what we cannot check
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, someone else's; overflow: not a pid, keep it
        pass
    return True


def _remove_stale_partials(dst: Path) -> None:
    """Remove ``.OUT.partial-PID`` folders whose process is gone (called with the OUT lock held)."""
    prefix = f".{dst.name}.partial-"
    for stale in dst.parent.iterdir():
        pid = stale.name[len(prefix) :]
        if stale.name.startswith(prefix) and pid.isdecimal() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _out_lock(dst: Path, out: Path):
    """Hold ``.OUT.lock`` beside OUT for the whole export; refuse at once if another export holds it."""
    path = dst.parent / f".{dst.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o644)
        except FileExistsError:  # no fcntl: the file itself is the lock
            _refuse_locked(out, path, f" (if none is running, delete {path})")
        except OSError as e:
            raise ExportError(f"cannot create the lock file {path} beside OUT ({e}); choose another OUT") from e
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):
                _refuse_locked(out, path, "")
            raise ExportError(f"cannot lock {path} beside OUT ({e}); choose another OUT") from e
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                break
        os.close(fd)  # the previous holder deleted the file we locked: lock the one now at the path
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if fcntl:  # delete while still holding it (see the module docstring)
            path.unlink(missing_ok=True)
        os.close(fd)
        if fcntl is None:
            path.unlink(missing_ok=True)


def _refuse_locked(out: Path, path: Path, hint: str):
    try:
        pid = path.read_text().strip() or "unknown"
    except OSError:
        pid = "unknown"
    raise ExportError(f"another export to {out} is running (pid {pid}); wait for it or choose another OUT{hint}")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created, deepest first (to undo on failure)."""
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the folder {folder} for OUT ({e}); choose another OUT") from e
    return missing


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

    ``force`` replaces an existing ONNX model folder (see the module docstring for what counts).
    ``opset``: 14 to 20. ``device="cuda"`` traces and validates on the GPU (same ONNX; much faster
    for full-size models)."""
    _check_opset(opset)
    source, out = Path(source), Path(out)
    _check_source(source)
    try:
        src, dst = source.resolve(), out.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ExportError(f"OUT {out} cannot be resolved ({e}); choose another OUT") from e
    _check_out(src, dst, out, force)
    created = _make_parents(dst.parent)
    try:
        with _out_lock(dst, out):
            _remove_stale_partials(dst)
            _export(_load(source, device), src, dst, out, force, fp16, opset, progress, device)
    except BaseException:
        for p in created:  # parents this call made, if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return out


def _load(source: Path, device: str):
    import diffusers
    import diffusers.utils.logging as diffusers_logging
    import torch
    import transformers.utils.logging as transformers_logging

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu")
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    family = _source_family(_check_source(source))
    options: dict = {"add_watermarker": False} if family.name == "sdxl" else {
        "safety_checker": None, "requires_safety_checker": False}  # fmt: skip
    try:
        pipe = getattr(diffusers, family.loader).from_pretrained(
            source, local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False, **options
        )
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ExportError(f"SOURCE {source} cannot be loaded by diffusers ({type(e).__name__}: {e})") from e
    return pipe.to(device) if device != "cpu" else pipe


def _source_family(info: dict) -> specs.Family:
    return next(f for f in specs.FAMILIES.values() if info.get("_class_name") in f.source_pipelines)


def _export(pipe, src: Path, dst: Path, out: Path, force: bool, fp16: bool, opset: int, progress: bool, device: str):
    """Export into ``.OUT.partial-PID`` beside OUT, then move it into place (with the OUT lock held)."""
    from tqdm import tqdm
    from transformers import CLIPTokenizerFast

    from .fp16 import convert_to_fp16
    from .onnx_export import export_component, family_of
    from .validate import check_component

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        precision: dict[str, str] = {}
        failures: list[str] = []
        notes: dict[str, str] = {}
        family = specs.FAMILIES[family_of(pipe)]
        try:
            kind = specs.unet_kind(int(pipe.vae.config.latent_channels), int(pipe.unet.config.in_channels))
        except ModelConfigError as e:
            raise ExportError(f"SOURCE {src}: {e}") from None
        bar = tqdm(family.components, desc="export", unit="component", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            try:
                path = export_component(pipe, name, tmp / name, opset=opset, device=device)
            except (MemoryError, OSError) as e:
                raise ExportError(f"exporting {name} failed ({type(e).__name__}: {e}); free memory or disk space "
                                  "and run the export again") from e  # fmt: skip
            except Exception as e:  # torch.onnx's own errors: one line, not an IR dump
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise ExportError(
                    f"torch.onnx could not export {name} ({type(e).__name__}: {first}); run with -v for the "
                    "details, and report it if the model is a standard SD 1.x/2.x one"
                ) from e
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
                elif name in ("vae_decoder", "vae_encoder"):  # SDXL's VAE overflows in fp16
                    shutil.rmtree(fp16_dir)
                    notes[name] = "kept fp32: fp16 output out of tolerance (" + bad16[0].describe() + ")"
                    logger.warning("%s: %s", name, notes[name])
                else:
                    bad = bad16
            for c in checks:
                logger.info("validated %s", c.describe())
            failures += [c.describe() + f" exceeds the {precision[name]} tolerance" for c in bad]
        if failures:
            raise ExportValidationError(failures)
        index = _write_side_files(pipe, src, tmp, family, kind, CLIPTokenizerFast)
        _write_manifest(pipe, tmp, family, kind, precision, notes, opset, src)
        # model_index.json goes last: the runtime refuses a folder without it
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        _check_out(src, dst, out, force)  # again: OUT may have changed during the export
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_side_files(pipe, source: Path, tmp: Path, family: specs.Family, kind: str, fast_tokenizer_cls) -> dict:
    entries = {
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
    }
    for name in family.tokenizers:
        getattr(pipe, name).save_pretrained(tmp / name)
        # tokenizer.json: what the runtime loads with `tokenizers` alone
        fast_tokenizer_cls.from_pretrained(source / name).save_pretrained(tmp / name)
        entries[name] = ["transformers", type(getattr(pipe, name)).__name__]
    pipe.scheduler.save_config(tmp / "scheduler")
    for name in family.components:  # each component's config is its diffusers module's (both VAE halves: the VAE's)
        module = getattr(pipe, specs.SUBMODELS[name].source)
        if hasattr(module, "save_config"):  # diffusers
            module.save_config(tmp / name)
        else:  # transformers
            module.config.to_json_file(tmp / name / "config.json")
        entries[name] = ["diffusers", "OnnxRuntimeModel"]
    if family.name == "sdxl":  # what the runtime's prompt encoding reads, as optimum keeps it
        entries["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    # diffusers' own layout: the class first, then the entries in name order
    return {"_class_name": family.onnx_pipelines[kind], "_diffusers_version": metadata.version("diffusers"),
            **dict(sorted(entries.items()))}  # fmt: skip


def _write_manifest(pipe, tmp: Path, family: specs.Family, kind: str, precision: dict, notes: dict, opset: int,
                    source: Path) -> None:  # fmt: skip
    from .onnx_export import guidance_frequencies, native_latent, text_length, vae_downscale

    vae_cfg = pipe.vae.config
    down, (size, _) = vae_downscale(pipe), native_latent(pipe)
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    records = {
        name: {"file": f"{name}/{ONNX_FILE}", "precision": precision[name], **_io_specs(tmp / name / ONNX_FILE)}
        for name in family.components
    }
    for name, note in notes.items():
        records[name]["note"] = note
    extra = {}
    if pipe.unet.config.get("time_cond_proj_dim") is not None:
        frequencies = guidance_frequencies(int(pipe.unet.config.time_cond_proj_dim))
        note = "torch's float32 table; numpy's exp differs by an ulp in some"
        extra["guidance_embedding"] = {"frequencies": frequencies, "note": note}
    tokenizers = {name: {"pad_token": str(getattr(pipe, name).pad_token), "max_length": text_length(pipe)}
                  for name in family.tokenizers}  # fmt: skip
    manifest = {
        "format": MANIFEST_FORMAT,
        "family": family.name,
        "unet_kind": kind,  # specs.UNET_KINDS; the runtime reads it from unet/config.json (optimum folders too)
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "vae_scaling_factor": float(vae_cfg.scaling_factor),
        "latent_channels": int(vae_cfg.latent_channels),
        "vae_downscale": down,
        "native_size": [size * down, size * down],
        "text_embedding_dim": int(pipe.unet.config.cross_attention_dim),
        **tokenizers,
        "opset": opset,
        **extra,
        "components": records,
        "files": files,
        "tools": _versions(),
        "source": source.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # written last: a folder without a manifest never looks complete
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
