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
from edgediff.runtime.lora_apply import TARGETS as LORA_TARGETS
from edgediff.runtime.model_folder import FEW_STEP, MANIFEST, MANIFEST_FORMAT, ONNX_FILE, few_step_kind, sha256_file

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


def _source_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} cannot be read ({e}); it is not a complete diffusers model") from e
    return data if isinstance(data, dict) else {}


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
    tiny_vae: str | os.PathLike | None = None,
    few_step: str | None = None,
) -> Path:
    """Export ``source`` (a local diffusers folder) to the model folder ``out``; return ``out``.

    ``tiny_vae``: a diffusers AutoencoderTiny folder (TAESD) exported too, as ``vae_decoder_tiny`` and
    ``vae_encoder_tiny`` (``decoder="tiny"``). ``few_step``: what kind of few-step model it is when its configs do not
    say (``"turbo"``, ``"lcm"``, ``"lcm_lora"``; ``"none"``: a standard model): the defaults calls get.

    ``force`` replaces an existing ONNX model folder (see the module docstring for what counts).
    ``opset``: 14 to 20. ``device="cuda"`` traces and validates on the GPU (same ONNX; much faster
    for full-size models)."""
    _check_opset(opset)
    source, out = Path(source), Path(out)
    info = _check_source(source)
    if tiny_vae is not None:
        vae_cfg = _source_config(source / "vae" / "config.json")
        blocks = vae_cfg.get("block_out_channels")
        factor = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None
        check_tiny_vae(Path(tiny_vae), vae_cfg.get("latent_channels"), factor, f"SOURCE {source}")
    if few_step is not None and few_step not in (*FEW_STEP, "none"):
        raise ExportError(f"--few-step {few_step!r}: say turbo, lcm, lcm_lora or none")
    del info
    try:
        src, dst = source.resolve(), out.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ExportError(f"OUT {out} cannot be resolved ({e}); choose another OUT") from e
    _check_out(src, dst, out, force)
    created = _make_parents(dst.parent)
    try:
        with _out_lock(dst, out):
            _remove_stale_partials(dst)
            _export(_load(source, device), src, dst, out, force, fp16, opset, progress, device,
                    Path(tiny_vae) if tiny_vae is not None else None, few_step)  # fmt: skip
    except BaseException:
        for p in created:  # parents this call made, if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return out


def _load(source: Path, device: str):
    """The source as a LazyPipeline: its models load one at a time, as each component is exported."""
    import diffusers.utils.logging as diffusers_logging
    import torch
    import transformers.utils.logging as transformers_logging

    from .lazy import LazyPipeline

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu")
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    family = _source_family(_check_source(source))
    try:
        pipe = LazyPipeline(source, family.tokenizers, device)
        for name in family.source_components:  # every config now: a broken folder fails before any export
            if name not in ("scheduler", *family.tokenizers):
                _ = getattr(pipe, name).config
    except Exception as e:  # diffusers and transformers raise many types for a broken folder
        raise ExportError(f"SOURCE {source} cannot be loaded by diffusers ({type(e).__name__}: {e})") from e
    return pipe


def _hold(pipe, module: str, source: Path | None = None):
    """Load ``module`` of a LazyPipeline (releasing the others); a source that does not load is one ExportError."""
    if not hasattr(pipe, "hold"):
        return
    try:
        pipe.hold(module)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # diffusers raises many types for a broken folder
        where = f"SOURCE {source}" if source else "the source"
        raise ExportError(f"{where} cannot be loaded by diffusers: {module} ({type(e).__name__}: {e})") from e


def _source_family(info: dict) -> specs.Family:
    return next(f for f in specs.FAMILIES.values() if info.get("_class_name") in f.source_pipelines)


def _export(pipe, src: Path, dst: Path, out: Path, force: bool, fp16: bool, opset: int, progress: bool, device: str,
            tiny_vae: Path | None = None, few_step: str | None = None):  # fmt: skip
    """Export into ``.OUT.partial-PID`` beside OUT, then move it into place (with the OUT lock held)."""
    from transformers import CLIPTokenizerFast

    from .onnx_export import family_of

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        family = specs.FAMILIES[family_of(pipe)]
        try:
            kind = specs.unet_kind(int(pipe.vae.config.latent_channels), int(pipe.unet.config.in_channels))
        except ModelConfigError as e:
            raise ExportError(f"SOURCE {src}: {e}") from None
        components = family.components
        if tiny_vae is not None:
            pipe.vae_tiny = _load_tiny_vae(tiny_vae, device)
            components += specs.TINY_COMPONENTS
        precision, notes = _export_components(pipe, components, tmp, fp16, opset, progress, device)
        index = _write_side_files(pipe, src, tmp, family, kind, components, CLIPTokenizerFast)
        _write_manifest(pipe, tmp, family, kind, components, precision, notes, opset, src, few_step)
        # model_index.json goes last: the runtime refuses a folder without it
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        _check_out(src, dst, out, force)  # again: OUT may have changed during the export
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# the export wrapper's attribute in front of the parameter names of the components a LoRA can change
WRAPPER_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder."}


def write_weights_maps(model: str | os.PathLike, source: str | os.PathLike, device: str = "cpu") -> dict[str, int]:
    """Make the LoRA weights maps (``weights_map.py``) of a model folder exported without them, by an older
    edgediff or by optimum, from the diffusers folder ``source`` it was exported from: ``{component: weights
    mapped}``. Each LoRA target's inline weights move to ``model.onnx_data`` first (the runtime reads and replaces
    them there); the values do not change. ``edgediff optimize``'s saved variants of a changed graph become stale
    and are remade by running it again."""
    from . import weights_map
    from .onnx_export import wrap

    model, source = Path(model), Path(source)
    _check_source(source)
    present = [name for name in LORA_TARGETS if (model / name / ONNX_FILE).is_file()]
    if not present:
        raise ExportError(f"MODEL {model} has no {' / '.join(f'{n}/{ONNX_FILE}' for n in LORA_TARGETS)}: it is "
                          "not an ONNX model folder")  # fmt: skip
    pipe = _load(source, device)
    done = {}
    for name in present:
        path = model / name / ONNX_FILE
        _hold(pipe, specs.SUBMODELS[name].source, source)
        if getattr(pipe, specs.SUBMODELS[name].source, None) is None:
            raise ExportError(f"SOURCE {source} has no {specs.SUBMODELS[name].source}, which MODEL's {name} "
                              "comes from: give the diffusers folder MODEL was exported from")  # fmt: skip
        params = weights_map.parameter_digests(wrap(pipe, name), WRAPPER_PREFIX[name], weights_map.graph_dtype(path))
        if hasattr(pipe, "release"):
            pipe.release()
        made = weights_map.make(path, params)
        if not made["weights"]:
            raise ExportError(f"{name}: none of the {len(params)} weights of SOURCE {source} is in {path}: MODEL "
                              "was exported from another model (or re-quantized); give its own source")  # fmt: skip
        weights_map.write(path.parent, made)
        done[name] = len(made["weights"])
    if (model / MANIFEST).is_file():
        _record_components(model, present, None, {})
    return done


def _export_components(pipe, components, tmp: Path, fp16: bool, opset: int, progress: bool,
                       device: str) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    """Export and validate each component into ``tmp/<name>``; (precision, notes) per component. Every
    validation failure is collected and raised at the end as one ExportValidationError."""
    from tqdm import tqdm

    from . import weights_map
    from .fp16 import convert_to_fp16
    from .onnx_export import consolidate_onnx, export_component, pipe_spec, wrap
    from .validate import compare, reference_outputs

    precision: dict[str, str] = {}
    failures: list[str] = []
    notes: dict[str, str] = {}
    bar = tqdm(components, desc="export", unit="component", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        _hold(pipe, specs.SUBMODELS[name].source)
        try:
            raw = export_component(pipe, name, tmp / name, opset=opset, device=device, consolidate=False)
        except (MemoryError, OSError) as e:
            raise ExportError(f"exporting {name} failed ({type(e).__name__}: {e}); free memory or disk space "
                              "and run the export again") from e  # fmt: skip
        except Exception as e:  # torch.onnx's own errors: one line, not an IR dump
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ExportError(
                f"torch.onnx could not export {name} ({type(e).__name__}: {first}); run with -v for the "
                "details, and report it if the model is a standard SD 1.x/2.x/XL one"
            ) from e
        spec = pipe_spec(pipe, name)
        references = reference_outputs(pipe, name, device=device)
        # the LoRA weights map (export/weights_map.py): the torch weights' digests, taken while they are loaded
        params = (
            weights_map.parameter_digests(wrap(pipe, name), WRAPPER_PREFIX[name]) if name in LORA_TARGETS else None
        )
        if hasattr(pipe, "release"):  # the torch model's memory goes before ONNX Runtime's comes
            pipe.release()
        path = consolidate_onnx(raw, tmp / name)
        if params is not None:
            weights_map.write(tmp / name, weights_map.make(path, params))
        checks = compare(name, spec, path, references, "fp32", device=device)
        bad = [c for c in checks if not c.passed]
        precision[name] = "fp32"
        if fp16 and not bad:
            fp16_dir = tmp / f".{name}-fp16"
            fp16_dir.mkdir()
            convert_to_fp16(path, fp16_dir / ONNX_FILE)
            checks16 = compare(name, spec, fp16_dir / ONNX_FILE, references, "fp16", device=device)
            bad16 = [c for c in checks16 if not c.passed]
            if not bad16:
                if (tmp / name / weights_map.MAP_FILE).is_file():  # fp16 keeps the initializer names
                    fp32_map = json.loads((tmp / name / weights_map.MAP_FILE).read_text(encoding="utf-8"))
                    weights_map.write(fp16_dir, weights_map.remake(fp16_dir / ONNX_FILE, fp32_map))
                shutil.rmtree(tmp / name)
                fp16_dir.rename(tmp / name)
                precision[name], checks = "fp16", checks16
            elif specs.SUBMODELS[name].source in ("vae", "vae_tiny"):  # SDXL's VAE overflows in fp16
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
    return precision, notes


TINY_VAE_HINT = ("a diffusers AutoencoderTiny folder: madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for "
                 "SDXL, saved locally")  # fmt: skip


def check_tiny_vae(tiny: Path, latent_channels: int | None, downscale: int | None, model: str) -> dict:
    """The tiny autoencoder folder's config, checked against the model it is for (torch is not imported)."""
    config = Path(tiny) / "config.json"
    if not config.is_file():
        raise ExportError(f"--tiny-vae {tiny} has no config.json; pass {TINY_VAE_HINT}")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"--tiny-vae {tiny}: config.json is not valid JSON ({e})") from e
    cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if cls != "AutoencoderTiny":
        raise ExportError(f"--tiny-vae {tiny} holds a {cls!r}, not an AutoencoderTiny (TAESD); pass {TINY_VAE_HINT}")
    channels = cfg.get("latent_channels", 4)
    if latent_channels is not None and channels != latent_channels:
        raise ExportError(
            f"--tiny-vae {tiny} makes {channels}-channel latents but {model} has {latent_channels}; a tiny "
            f"autoencoder only decodes the latents of the VAE it was distilled from ({TINY_VAE_HINT})"
        )
    blocks = cfg.get("decoder_block_out_channels", [64, 64, 64, 64])
    factor = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None
    if downscale is not None and factor != downscale:
        raise ExportError(f"--tiny-vae {tiny} scales by {factor} but the VAE of {model} by {downscale}; pass the "
                          f"tiny autoencoder of this model's VAE ({TINY_VAE_HINT})")  # fmt: skip
    return cfg


def _load_tiny_vae(tiny: Path, device: str):
    import torch
    from diffusers import AutoencoderTiny

    try:
        vae = AutoencoderTiny.from_pretrained(tiny, local_files_only=True, torch_dtype=torch.float32)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ExportError(f"--tiny-vae {tiny} cannot be loaded by diffusers ({type(e).__name__}: {e})") from e
    return vae.to(device).eval()


def add_tiny_vae(model: str | os.PathLike, tiny_vae: str | os.PathLike, fp16: bool = False, force: bool = False,
                 opset: int = 17, device: str = "cpu") -> Path:  # fmt: skip
    """Export the tiny autoencoder ``tiny_vae`` (a diffusers AutoencoderTiny folder) into the model folder
    ``model`` as ``vae_decoder_tiny`` and ``vae_encoder_tiny``, validated against torch like any component, and
    record them in its manifest. Both are written beside the folder's files first and moved in only when all
    passed; ``force`` replaces a tiny autoencoder already there."""
    from edgediff.runtime.model_folder import ModelFolder

    from .onnx_export import TinyVaeSource

    _check_opset(opset)
    folder = ModelFolder.open(model)
    tiny = Path(tiny_vae)
    check_tiny_vae(tiny, folder.latent_channels, folder.vae_downscale, str(model))
    present = [n for n in specs.TINY_COMPONENTS if (folder.path / n).exists()]
    if present and not force:
        raise ExportError(f"{model} already has a tiny autoencoder ({', '.join(present)}); pass --force "
                          "(force=True) to replace it")  # fmt: skip
    path = folder.path.resolve()
    with _out_lock(path, Path(model)):
        tmp = path / f".tiny-vae.partial-{os.getpid()}"
        try:
            tmp.mkdir()
            vae = _load_tiny_vae(tiny, device)
            f = folder.vae_downscale
            nh, nw = folder.native_size
            source = TinyVaeSource(vae, folder.model_symbols(), f, (nh // f, nw // f))
            precision, notes = _export_components(source, specs.TINY_COMPONENTS, tmp, fp16, opset, False, device)
            for name in specs.TINY_COMPONENTS:
                vae.save_config(tmp / name)
            for name in specs.TINY_COMPONENTS:
                replace_dir(tmp / name, path / name)
            if (path / MANIFEST).is_file():
                _record_components(path, specs.TINY_COMPONENTS, precision, notes)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Path(model)


def _component_records(folder: Path, components, precision: dict, notes: dict) -> dict:
    records = {name: {"file": f"{name}/{ONNX_FILE}", "precision": precision[name],
                      **_io_specs(folder / name / ONNX_FILE)} for name in components}  # fmt: skip
    for name, note in notes.items():
        records[name]["note"] = note
    return records


def _file_records(folder: Path, under: str = "") -> dict:
    root = folder / under if under else folder
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _record_components(folder: Path, components, precision: dict | None, notes: dict) -> None:
    """Add (or replace) ``components`` in the folder's manifest: their I/O, precision and files (``precision=None``:
    their files only); the manifest is written beside itself and renamed over the old one."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if precision is not None:
        manifest["components"].update(_component_records(folder, components, precision, notes))
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(tuple(f"{c}/" for c in components))}
    for name in components:
        files |= _file_records(folder, name)
    manifest["files"] = dict(sorted(files.items()))
    tmp = folder / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def _write_side_files(pipe, source: Path, tmp: Path, family: specs.Family, kind: str, components,
                      fast_tokenizer_cls) -> dict:  # fmt: skip
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
    for name in components:  # each component's config is its diffusers module's (both VAE halves: the VAE's)
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


def _write_manifest(pipe, tmp: Path, family: specs.Family, kind: str, components, precision: dict, notes: dict,
                    opset: int, source: Path, few_step: str | None = None) -> None:  # fmt: skip
    from .onnx_export import guidance_frequencies, native_latent, text_length, vae_downscale

    vae_cfg = pipe.vae.config
    down, (size, _) = vae_downscale(pipe), native_latent(pipe)
    files = _file_records(tmp)
    records = _component_records(tmp, components, precision, notes)
    extra: dict = {}
    if few_step is None:  # what the configs say (Turbo's scheduler, an LCM UNet or scheduler)
        few_step = few_step_kind(pipe.unet.config.get("time_cond_proj_dim"), dict(pipe.scheduler.config))
    if few_step is not None:  # "none" (said at export): a standard model whatever its scheduler
        extra["few_step"] = {"kind": few_step, "defaults": FEW_STEP.get(few_step, {}).get("defaults", {})}
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
