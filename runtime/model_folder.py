"""The model folder: what export writes and the runtime reads (DESIGN.md, "The model folder").

``ModelFolder.open(path)`` reads ``edgediff.json`` (our manifest) or, for a folder written by
optimum's ONNX exporter, infers the same facts from its config files. Opening checks what is
cheap and catches most damage (every file the manifest lists exists with its recorded size);
``verify()`` also recomputes the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from . import specs
from .errors import ManifestError, ModelConfigError, ModelFolderError
from .schedulers import apply_pipeline_corrections
from .specs import FAMILIES, SUBMODELS, Family, TensorSpec

if TYPE_CHECKING:
    from .tokenizer import ClipTokenizer

MANIFEST = "edgediff.json"
MANIFEST_FORMAT = 1
ONNX_FILE = "model.onnx"

logger = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{path} is missing ({what}); re-export the model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{path} is not valid JSON ({what}: {e}); fix the file or re-export the model") from e
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} must hold a JSON object ({what}); fix the file or re-export the model")
    return data


# Files a person may edit by hand (configs, tokenizer data): a changed size or hash means "edited
# since export", accepted when the folder still validates. Everything else is weights, checked strictly.
CONFIG_SUFFIXES = (".json", ".txt")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# UNet down-sampling when a folder has no unet/config.json to read it from: every SD 1.x/2.x UNet's.
DEFAULT_UNET_DOWNSCALE = 8


# Few-step models and the settings that give good images (their model cards and diffusers' docs): the defaults a
# call gets on such a folder. Turbo (adversarial distillation of SD 2.1 / SDXL): guidance 0, 1-4 steps of Euler
# ancestral on trailing timesteps; img2img needs int(steps x strength) >= 1 (2 x 0.5). LCM-distilled UNets take the
# guidance as an embedding (no doubled batch): 4 steps at 8.0 (docs: 3 to 13). An LCM scheduler on a plain UNet is an
# LCM-LoRA merge: 4 steps with guidance 1 (off) to 2.
FEW_STEP: dict[str, dict[str, Any]] = {
    "turbo": {"guidance_distilled": True, "defaults": {
        "txt2img": {"num_inference_steps": 1, "guidance_scale": 0.0},
        "img2img": {"num_inference_steps": 2, "guidance_scale": 0.0, "strength": 0.5},
        "inpaint": {"num_inference_steps": 2, "guidance_scale": 0.0, "strength": 0.5}}},
    "lcm": {"guidance_distilled": False, "defaults": {
        mode: {"num_inference_steps": 4, "guidance_scale": 8.0} for mode in specs.MODES}},
    "lcm_lora": {"guidance_distilled": False, "defaults": {
        mode: {"num_inference_steps": 4, "guidance_scale": 1.0} for mode in specs.MODES}},
}  # fmt: skip


def few_step_kind(time_cond_proj_dim, scheduler_config: dict) -> str | None:
    """``FEW_STEP``'s kind of a model, from its UNet's ``time_cond_proj_dim`` and its scheduler config: an LCM UNet;
    an LCM scheduler on a plain UNet (LCM-LoRA); Euler ancestral on trailing timesteps, which is what SD-Turbo and
    SDXL-Turbo ship (export's ``few_step=`` says it when a folder's configs do not)."""
    if _is_int(time_cond_proj_dim):
        return "lcm"
    cls = scheduler_config.get("_class_name")
    if cls == "LCMScheduler":
        return "lcm_lora"
    if cls == "EulerAncestralDiscreteScheduler" and scheduler_config.get("timestep_spacing") == "trailing":
        return "turbo"
    return None


def _load_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_int(v) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _describe_folder(path: Path) -> str | None:
    """Why ``path`` is not a model folder edgediff can open, when we can tell; None otherwise."""
    if path.is_file():
        if path.name == ONNX_FILE and (path.parent.parent / "model_index.json").is_file():
            return f"--model {path} is a component file; pass the model folder {path.parent.parent}"
        return f"{path} is a file, not a model folder; pass the folder `edgediff export` wrote"
    index = path / "model_index.json"
    try:
        cls_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    has_onnx_unet = (path / "unet" / ONNX_FILE).is_file()
    pytorch = (path / "unet").is_dir() and not has_onnx_unet and (path / "vae").is_dir()
    torch_class = (
        isinstance(cls_name, str) and cls_name.endswith("Pipeline") and not cls_name.startswith(("Onnx", "ORT"))
    )
    if torch_class and not has_onnx_unet and cls_name not in specs.source_pipelines():
        return (
            f"{path} is a diffusers {cls_name} (PyTorch) folder, which edgediff does not export; it exports "
            f"{', '.join(specs.source_pipelines())} models (`edgediff export SOURCE OUT`)"
        )
    if pytorch or (torch_class and not has_onnx_unet):
        return (f"{path} is a diffusers (PyTorch) model folder that has not been exported; run "
                f"`edgediff export {path} OUT` first (needs the export extra), then pass OUT")  # fmt: skip
    return None


@dataclass
class ModelFolder:
    path: Path
    manifest: dict[str, Any]
    inferred: bool  # True for optimum folders without edgediff.json
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    # config files whose size differs from the manifest's record (edited by hand since export)
    edited: list[str] = field(default_factory=list)
    # the tokenizer open() built while checking the folder, so a caller need not parse tokenizer.json again
    tokenizer: ClipTokenizer | None = field(default=None, repr=False, compare=False)
    tokenizer_2: ClipTokenizer | None = field(default=None, repr=False, compare=False)  # SDXL's second

    # -- facts the pipeline needs -----------------------------------------------------------
    @property
    def vae_scaling_factor(self) -> float:
        return float(self.manifest["vae_scaling_factor"])

    @property
    def vae_downscale(self) -> int:
        return int(self.manifest["vae_downscale"])

    @property
    def latent_channels(self) -> int:
        return int(self.manifest["latent_channels"])

    @property
    def native_size(self) -> tuple[int, int]:
        h, w = self.manifest["native_size"]
        return int(h), int(w)

    @cached_property
    def unet_downscale(self) -> int:
        """How many times the UNet halves the latent (2^(levels-1)): the latent's sides must be
        multiples of it, or the skip connections' Concat fails inside the engine."""
        blocks = self._config_value("unet/config.json", "block_out_channels")
        return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else DEFAULT_UNET_DOWNSCALE

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's down-sampling."""
        return self.vae_downscale * self.unet_downscale

    @property
    def family(self) -> Family:
        """The manifest's model family (``specs.FAMILIES``); the default family for an unknown name,
        which ``open()`` refuses."""
        return FAMILIES.get(self.manifest.get("family", specs.DEFAULT_FAMILY), FAMILIES[specs.DEFAULT_FAMILY])

    @property
    def required_components(self) -> tuple[str, ...]:
        """The components the family's pipeline runs: the folder must have them."""
        return self.family.required

    @cached_property
    def text_embedding_dim(self) -> int | None:
        """Width of the prompt embeddings the UNet takes (the contract's ``D``): the manifest's, else
        the UNet's or text encoder's config (optimum folders), else None (``model_symbols`` then
        holds the family's default)."""
        value = self.manifest.get("text_embedding_dim")
        if not (isinstance(value, int) and value > 0):
            value = self._config_value("unet/config.json", "cross_attention_dim")
        if not (isinstance(value, int) and value > 0):
            value = self._config_value("text_encoder/config.json", "hidden_size")
        return value if isinstance(value, int) and value > 0 else None

    @property
    def text_max_positions(self) -> int | None:
        """The text encoder's ``max_position_embeddings`` when its config says."""
        value = self._config_value("text_encoder/config.json", "max_position_embeddings")
        return value if _is_int(value) and value > 0 else None

    @cached_property
    def text_length(self) -> int:
        """Tokens per prompt (the contract's ``S``), by the tokenizer's rule (``tokenizer.max_length``)."""
        from .tokenizer import max_length

        return max_length(self._config_value("tokenizer/tokenizer_config.json", "model_max_length"),
                          self.text_max_positions)  # fmt: skip

    @cached_property
    def features(self) -> frozenset[str]:
        """The model's ``specs.FEATURES``: its family's, and ``timestep_cond`` for an LCM-distilled UNet."""
        lcm = _is_int(self._config_value("unet/config.json", "time_cond_proj_dim"))
        return self.family.features | ({"timestep_cond"} if lcm else set())

    def text_layers(self, component: str) -> int | None:
        """A text encoder's layer count (its hidden states are ``hidden_states.0`` .. ``hidden_states.{N}``)."""
        value = self._config_value(f"{component}/config.json", "num_hidden_layers")
        return value if _is_int(value) and value > 0 else None

    def spec(self, component: str) -> specs.SubmodelSpec:
        """The I/O contract of ``component`` for this model (its features' tensors, one per hidden-state layer)."""
        return SUBMODELS[component].for_model(self.features, self.text_layers(component))

    @cached_property
    def few_step(self) -> dict[str, Any]:
        """What a few-step model dictates (``few_step_kind``): the manifest's record, else inferred from configs."""
        recorded = self.manifest.get("few_step")
        if isinstance(recorded, dict) and (recorded.get("kind") in FEW_STEP or recorded.get("kind") == "none"):
            return recorded  # "none": said at export, a standard model whatever its scheduler
        kind = few_step_kind(self._config_value("unet/config.json", "time_cond_proj_dim"),
                             _load_config(self.path / "scheduler" / "scheduler_config.json"))  # fmt: skip
        return {"kind": kind} if kind else {}

    @property
    def guidance_distilled(self) -> bool:
        """Trained to run without classifier-free guidance (SD-Turbo, SDXL-Turbo): guidance > 1 only costs."""
        return FEW_STEP.get(str(self.few_step.get("kind")), {}).get("guidance_distilled", False)

    def call_defaults(self, mode: str) -> dict[str, float]:
        """num_inference_steps, guidance_scale (and strength for img2img / inpaint) a call gets when it does not
        say: diffusers' for the family and mode, overridden by a few-step model's (``FEW_STEP``)."""
        few = FEW_STEP.get(str(self.few_step.get("kind")), {}).get("defaults", {})
        return {**self.family.call_defaults[mode], **few.get(mode, {})}

    @property
    def has_tiny_vae(self) -> bool:
        """The folder holds a tiny autoencoder (TAESD: ``edgediff add-tiny-vae``)."""
        return self.component_path("vae_decoder_tiny").is_file()

    @property
    def tiny_vae_scaling_factor(self) -> float:
        """The tiny autoencoder's ``scaling_factor`` (TAESD's is 1: it works on the UNet's latents as they are)."""
        value = self._config_value("vae_decoder_tiny/config.json", "scaling_factor")
        return float(value) if _is_number(value) and value > 0 else 1.0

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL's rule: with no negative prompt, the negative conditioning is zeros (not the encoded "")."""
        return self._config_value("model_index.json", "force_zeros_for_empty_prompt") is True

    def model_symbols(self) -> dict[str, int]:
        """The contract's fixed symbols for this folder: the family's defaults, overridden by what the
        manifest and configs say (``C``, ``S``, ``D``, ``V``, ``C_in``, ``C_out``; SDXL's ``D1``, ``D2``, ``P``,
        ``T``, ``V2``; LCM's ``E``)."""
        unet = lambda key: self._config_value("unet/config.json", key)  # noqa: E731
        known = {
            "D": self.text_embedding_dim,
            "V": self._config_value("text_encoder/config.json", "vocab_size"),
            "C_in": unet("in_channels"),
            "C_out": unet("out_channels"),
            "E": unet("time_cond_proj_dim"),
        }
        if "added_cond" in self.features:
            projection = self._config_value("text_encoder_2/config.json", "projection_dim")
            known |= {
                "D1": self._config_value("text_encoder/config.json", "hidden_size"),
                "D2": self._config_value("text_encoder_2/config.json", "hidden_size"),
                "V2": self._config_value("text_encoder_2/config.json", "vocab_size"),
                "P": projection,
            }
            total, per = unet("projection_class_embeddings_input_dim"), unet("addition_time_embed_dim")
            if _is_int(total) and _is_int(per) and _is_int(projection) and per > 0 and (total - projection) % per == 0:
                known["T"] = (total - projection) // per
        values = {k: v for k, v in known.items() if _is_int(v) and v > 0}
        return {**self.family.defaults, "C": self.latent_channels, "S": self.text_length, **values}

    @cached_property
    def unet_kind(self) -> str:
        """``specs.UNET_KINDS``: "inpainting" for a UNet that takes 2C+1 channels (SD's 9-channel inpainting
        models), else "standard"; read from the UNet's input channels, so optimum folders say it too."""
        symbols = self.model_symbols()
        return specs.unet_kind(symbols["C"], symbols.get("C_in", symbols["C"]))

    def symbols(self, batch: int = 1, height: int | None = None, width: int | None = None) -> dict[str, int]:
        """Every contract symbol's value for ``batch`` images of ``height`` x ``width`` pixels (default native)."""
        f = self.vae_downscale
        nh, nw = self.native_size
        return specs.resolve_symbols(self.model_symbols(), batch, ((height or nh) // f, (width or nw) // f), f)

    def _config_value(self, rel: str, key: str):
        path = self.path / rel
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # reported by open()'s validation
        return data.get(key) if isinstance(data, dict) else None

    def component_bytes(self, name: str) -> int:
        """Size on disk of a component's graph and weights (its folder's files, configs excluded)."""
        return sum(p.stat().st_size for p in (self.path / name).iterdir() if p.is_file() and p.suffix != ".json")

    def component_path(self, name: str) -> Path:
        return self.path / name / ONNX_FILE

    @property
    def components(self) -> list[str]:
        return list(self.manifest["components"])

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelFolder:
        """Open and validate a model folder. Every problem found in its files and config values is
        collected and raised as one error that names each file: ``ModelFolderError`` for missing or
        truncated files, ``ModelConfigError`` (``ManifestError`` when only edgediff.json) for values."""
        path = Path(path)
        if not path.exists():
            raise ModelFolderError(f"model folder {path} does not exist; pass the folder `edgediff export` wrote")
        reason = _describe_folder(path)
        if reason:
            raise ModelFolderError(reason)
        if not (path / "model_index.json").is_file():
            # export writes model_index.json last, so an interrupted export never passes here
            raise ModelFolderError(
                f"{path} is not a complete model folder (no model_index.json); pass the folder "
                "`edgediff export` wrote (re-export if an export was interrupted)"
            )
        problems: list[str] = []  # "file: what is wrong"
        if (path / MANIFEST).exists():
            manifest, inferred = read_manifest(path), False
        else:
            manifest, inferred = infer_manifest(path), True
        problems += [
            f"{MANIFEST if not inferred else '(inferred manifest)'}: {p}" for p in manifest_problems(manifest)
        ]
        raw_scheduler = _load_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
        folder = cls(path, manifest, inferred, apply_pipeline_corrections(raw_scheduler))
        missing = folder._file_problems()
        problems += folder._config_problems(raw_scheduler, manifest_ok=not problems)
        if missing and not problems:
            raise ModelFolderError(f"model folder {path} is damaged: {'; '.join(missing)}; re-export the model")
        if problems:
            only_manifest = all(p.startswith(MANIFEST) for p in problems)
            kind = ManifestError if only_manifest else ModelConfigError
            raise kind(
                f"model folder {path} has {len(problems)} problem(s): {'; '.join(problems + missing)}; "
                "fix the file(s) named or re-export the model"
            )
        for rel in folder.edited:
            logger.warning("%s was edited since export (its size differs from the manifest's); using it as it is",
                           path / rel)  # fmt: skip
        return folder

    def _file_problems(self) -> list[str]:
        """Required components present; every weight file the manifest lists present with its
        recorded size (strict); config files that changed size are noted in ``edited``."""
        problems = []
        for name in self.required_components:
            if not self.component_path(name).is_file():
                problems.append(f"{name}/{ONNX_FILE} is missing")
        for rel, info in self.manifest.get("files", {}).items():
            p = self.path / rel
            if not p.is_file():
                if not any(rel == f"{c}/{ONNX_FILE}" for c in self.required_components):
                    problems.append(f"{rel} is missing")
            elif not (isinstance(info, dict) and _is_int(info.get("size"))):
                continue  # a malformed entry: reported by manifest_problems
            elif p.stat().st_size != info["size"]:
                if rel.endswith(CONFIG_SUFFIXES):
                    self.edited.append(rel)
                else:
                    problems.append(
                        f"{rel} is {p.stat().st_size} bytes, the manifest says {info['size']} (truncated or damaged)"
                    )
        return problems

    def _config_problems(self, raw_scheduler: dict, manifest_ok: bool = True) -> list[str]:
        """Values in the scheduler, tokenizer and component configs that cannot work, each with its file."""
        from . import schedulers
        from .tokenizer import check_tokenizer

        problems = [f"scheduler/scheduler_config.json: {p}" for p in schedulers.config_problems(raw_scheduler)]
        self.tokenizer, tokenizer_problems = check_tokenizer(self.path / "tokenizer", self.text_max_positions)
        problems += tokenizer_problems
        if "tokenizer_2" in self.family.tokenizers:
            positions = self._config_value("text_encoder_2/config.json", "max_position_embeddings")
            self.tokenizer_2, tokenizer_problems = check_tokenizer(
                self.path / "tokenizer_2", positions if _is_int(positions) else None
            )
            problems += tokenizer_problems
        problems += self._added_cond_problems()
        for rel in ("unet/config.json", "vae_decoder/config.json", "text_encoder/config.json",
                    "text_encoder_2/config.json"):  # fmt: skip
            p = self.path / rel
            if p.is_file():
                try:
                    data = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    problems.append(f"{rel}: not valid JSON ({e})")
                    continue
                if not isinstance(data, dict):
                    problems.append(f"{rel}: must hold a JSON object")
        channels = self.manifest.get("latent_channels")
        unet_out = self._config_value("unet/config.json", "out_channels")
        if _is_int(channels) and unet_out is not None and unet_out != channels:
            problems.append(f"unet/config.json: out_channels {unet_out!r} disagrees with latent_channels {channels} "
                            f"in {MANIFEST} (the UNet predicts one value per latent channel)")  # fmt: skip
        unet_in = self._config_value("unet/config.json", "in_channels")
        if _is_int(channels) and _is_int(unet_in):
            try:
                specs.unet_kind(channels, unet_in)
            except ModelConfigError as e:
                problems.append(f"unet/config.json: in_channels: {e}")
        vae_channels = self._config_value("vae_decoder/config.json", "latent_channels")
        if _is_int(channels) and vae_channels is not None and vae_channels != channels:
            problems.append(f"vae_decoder/config.json: latent_channels {vae_channels!r} disagrees with "
                            f"latent_channels {channels} in {MANIFEST}")  # fmt: skip
        blocks = self._config_value("unet/config.json", "block_out_channels")
        if blocks is not None and not (
            isinstance(blocks, list) and blocks and all(_is_int(b) and b > 0 for b in blocks)
        ):
            problems.append(
                f"unet/config.json: block_out_channels must be a list of positive integers, got {blocks!r}"
            )
        elif manifest_ok and not problems:
            native = self.manifest["native_size"]
            m = self.size_multiple
            if any(side % m for side in native):
                problems.append(f"{MANIFEST if not self.inferred else 'unet/config.json'}: native_size {native} is "
                                f"not a multiple of {m} (the VAE's factor {self.vae_downscale} x the UNet's "
                                f"down-sampling {self.unet_downscale})")  # fmt: skip
        return problems

    def _added_cond_problems(self) -> list[str]:
        """SDXL: the UNet's cross-attention and added-conditioning widths against the two text encoders'."""
        if "added_cond" not in self.features:
            return []
        unet = lambda key: self._config_value("unet/config.json", key)  # noqa: E731
        d1 = self._config_value("text_encoder/config.json", "hidden_size")
        d2 = self._config_value("text_encoder_2/config.json", "hidden_size")
        projection = self._config_value("text_encoder_2/config.json", "projection_dim")
        cross, total, per = (
            unet("cross_attention_dim"),
            unet("projection_class_embeddings_input_dim"),
            unet("addition_time_embed_dim"),
        )
        problems = []
        if unet("addition_embed_type") not in (None, "text_time"):
            problems.append(f"unet/config.json: addition_embed_type {unet('addition_embed_type')!r} is not SDXL's "
                            "'text_time'; edgediff runs SDXL UNets")  # fmt: skip
        if all(_is_int(v) for v in (cross, d1, d2)) and cross != d1 + d2:
            problems.append(f"unet/config.json: cross_attention_dim {cross} is not the text encoders' widths "
                            f"{d1} + {d2} (text_encoder and text_encoder_2 hidden_size); the folder mixes "
                            "models")  # fmt: skip
        if all(_is_int(v) for v in (total, per, projection)):
            if total != 6 * per + projection:
                problems.append(
                    f"unet/config.json: projection_class_embeddings_input_dim {total} is not 6 size numbers x "
                    f"addition_time_embed_dim {per} + the pooled width {projection} (text_encoder_2 projection_dim) "
                    f"= {6 * per + projection}; the UNet does not match the text encoders (a refiner's 5 numbers "
                    "are not supported)"
                )
        return problems

    def verify(self) -> list[str]:
        """Recompute every file's sha256; return the problems found (empty when all match). A config
        file whose hash changed is not a problem (it was edited, and open() validated it): it is
        added to ``edited`` instead."""
        problems = []
        for rel, info in self.manifest.get("files", {}).items():
            p = self.path / rel
            if not p.is_file():
                problems.append(f"{rel} is missing")
            elif not isinstance(info, dict) or sha256_file(p) != info.get("sha256"):
                if rel.endswith(CONFIG_SUFFIXES):
                    if rel not in self.edited:
                        self.edited.append(rel)
                else:
                    problems.append(f"{rel} does not match its sha256 (damaged); re-export the model")
        return problems


_REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "family": str,
    "prediction_type": str,
    "vae_scaling_factor": (int, float),
    "latent_channels": int,
    "vae_downscale": int,
    "native_size": list,
    "components": dict,
    "files": dict,
}


def read_manifest(path: Path) -> dict:
    """The manifest as JSON; raises ManifestError when it cannot be read at all, or when a key
    the rest of the check relies on is missing or of the wrong type."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{file} is corrupted ({e}); re-export the model or delete {MANIFEST}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{file} is corrupted (not a JSON object); re-export the model")
    bad = [
        k for k, t in _REQUIRED_KEYS.items() if not isinstance(manifest.get(k), t) or isinstance(manifest.get(k), bool)
    ]
    if bad:
        raise ManifestError(f"{file} is corrupted: missing or invalid keys {bad}; re-export the model")
    if manifest["format"] > MANIFEST_FORMAT:
        raise ManifestError(
            f"{file} has format {manifest['format']}, newer than this edgediff understands "
            f"({MANIFEST_FORMAT}); upgrade edgediff"
        )
    return manifest


def manifest_problems(m: dict) -> list[str]:
    """Every value in a manifest (read or inferred) that cannot work, described with the fix."""
    problems = []
    if m.get("family") not in FAMILIES:
        problems.append(f"family {m.get('family')!r} is not one this edgediff runs ({', '.join(FAMILIES)})")
    if m.get("prediction_type") not in PREDICTION_TYPES:
        problems.append(
            f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {m.get('prediction_type')!r}"
        )
    f = m.get("vae_scaling_factor")
    if not (_is_number(f) and f > 0):
        problems.append(f"vae_scaling_factor must be a positive finite number (SD: 0.18215), got {f!r}")
    c = m.get("latent_channels")
    if not (_is_int(c) and c >= 1):
        problems.append(f"latent_channels must be a positive integer (SD: 4), got {c!r}")
    d = m.get("vae_downscale")
    if not (_is_int(d) and d >= 1 and d & (d - 1) == 0):
        problems.append(f"vae_downscale must be a power of two (SD: 8), got {d!r}")
    size = m.get("native_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        problems.append(f"native_size must be [height, width] in pixels, two positive integers, got {size!r}")
    e = m.get("text_embedding_dim")
    if e is not None and not (_is_int(e) and e > 0):
        problems.append(f"text_embedding_dim must be a positive integer, got {e!r}")
    components = m.get("components")
    if isinstance(components, dict):
        for name, comp in components.items():
            if not (isinstance(comp, dict) and isinstance(comp.get("file", ""), str)):
                problems.append(f"components.{name} must be an object like {{\"file\": \"{name}/{ONNX_FILE}\", ...}}, "
                                f"got {comp!r}")  # fmt: skip
            elif name in SUBMODELS:
                family = FAMILIES.get(str(m.get("family")), FAMILIES[specs.DEFAULT_FAMILY])
                problems += _io_problems(name, comp, family.features)
    files = m.get("files")
    if isinstance(files, dict):
        for rel, info in files.items():
            if not (isinstance(info, dict) and _is_int(info.get("size")) and info["size"] >= 0
                    and isinstance(info.get("sha256"), str)):  # fmt: skip
                problems.append(f"files entry {rel!r} must have an integer size and a sha256, got {info!r}")
    return problems


def _io_problems(name: str, comp: dict, family_features: frozenset[str]) -> list[str]:
    """The component's I/O as the manifest records it (export reads it back from the ONNX) against the I/O
    contract (runtime/specs.py) for the family's features (and an LCM UNet's ``timestep_cond`` when recorded):
    the same names, ranks, fixed sizes and kind of dtype (an fp16 export's float16 for float32 is a precision, not
    a mismatch). Symbol names are not compared: they are labels."""
    problems = []
    recorded_names = [t.get("name") for t in comp.get("inputs") or [] if isinstance(t, dict)]
    features = family_features | ({"timestep_cond"} if "timestep_cond" in recorded_names else set())
    layers = sum(1 for t in comp.get("outputs") or [] if isinstance(t, dict)
                 and str(t.get("name", "")).startswith("hidden_states.")) - 1  # fmt: skip
    spec = SUBMODELS[name].for_model(features, layers if layers >= 0 else 0)
    for kind in ("inputs", "outputs"):
        recorded, where = comp.get(kind), f"components.{name}.{kind}"
        if recorded is None:
            continue
        try:
            tensors = {t.name: t for t in map(TensorSpec.from_json, recorded)}
        except (TypeError, KeyError, ValueError, AttributeError):
            problems.append(f'{where} must be a list of {{"name", "dtype", "shape"}} objects, got {recorded!r}'[:300])
            continue
        contract = getattr(spec, kind)
        if sorted(tensors) != sorted(t.name for t in contract):
            problems.append(f"{where} are {list(tensors)}, the I/O contract's are {[t.name for t in contract]}")
            continue
        for want in contract:
            got = tensors[want.name]
            # a scalar may be recorded as one value per sample (optimum's 1-D timestep), as engines accept
            rank_ok = got.rank == want.rank or (want.rank == 0 and got.rank == 1)
            fixed_ok = all(g == w for g, w in zip(got.shape, want.shape, strict=False) if _is_int(g) and _is_int(w))
            if not (rank_ok and fixed_ok) or got.dtype.kind != np.dtype(want.dtype).kind:
                problems.append(f"{where}: {want.name!r} is {got.dtype.name} {list(got.shape)}, the I/O contract "
                                f"says {np.dtype(want.dtype).name} {list(want.shape)}")  # fmt: skip
    return problems


def infer_manifest(path: Path) -> dict:
    """What our manifest would hold, inferred from a diffusers/optimum folder's config files."""
    vae_cfg = _load_json(path / "vae_decoder" / "config.json", "VAE decoder config")
    unet_cfg = _load_json(path / "unet" / "config.json", "UNet config")
    sched = _load_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    te_path = path / "text_encoder" / "config.json"
    te_cfg = _load_json(te_path, "text encoder config") if te_path.is_file() else {}
    blocks = vae_cfg.get("block_out_channels", [0, 0, 0, 0])
    downscale = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None
    sample = unet_cfg.get("sample_size", 64)
    sample = sample if isinstance(sample, list) else [sample, sample]
    native = [s * downscale for s in sample] if downscale and all(_is_int(s) for s in sample) else sample
    components = {}
    for name, spec in SUBMODELS.items():
        if (path / name / ONNX_FILE).is_file():
            components[name] = {"file": f"{name}/{ONNX_FILE}", "precision": "unknown", "spec": spec.name}
    scaling = vae_cfg.get("scaling_factor", 0.18215)
    return {
        "format": MANIFEST_FORMAT,
        "family": specs.family_for(
            te_cfg.get("hidden_act"),
            two_encoders=(path / "text_encoder_2").is_dir() or unet_cfg.get("addition_embed_type") == "text_time",
        ),
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "vae_scaling_factor": float(scaling) if _is_number(scaling) else scaling,
        "latent_channels": vae_cfg.get("latent_channels", unet_cfg.get("in_channels", 4)),
        "vae_downscale": downscale,
        "native_size": native,
        "components": components,
        "files": {},
        "source": "inferred from an optimum/diffusers ONNX folder (no edgediff.json)",
    }
