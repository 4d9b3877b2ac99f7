"""The model folder: what export writes and the runtime reads (DESIGN.md, "The model folder").

``ModelFolder.open(path)`` reads ``edgediff.json`` (our manifest) or, for a folder written by
optimum's ONNX exporter, infers the same facts from its config files. Opening checks what is
cheap and catches most damage (every file the manifest lists exists with its recorded size);
``verify()`` also recomputes the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ManifestError, ModelFolderError
from .schedulers import apply_pipeline_corrections
from .specs import REQUIRED_COMPONENTS, SUBMODELS

MANIFEST = "edgediff.json"
MANIFEST_FORMAT = 1
ONNX_FILE = "model.onnx"


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
        raise ModelFolderError(f"{path} is not valid JSON ({what}: {e}); re-export the model") from e
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object ({what}); re-export the model")
    return data


@dataclass
class ModelFolder:
    path: Path
    manifest: dict[str, Any]
    inferred: bool  # True for optimum folders without edgediff.json
    scheduler_config: dict[str, Any] = field(default_factory=dict)

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

    @property
    def prediction_type(self) -> str:
        return self.manifest["prediction_type"]

    @cached_property
    def text_embedding_dim(self) -> int | None:
        """Width of the prompt embeddings the UNet takes (768 for SD 1.x, 1024 for SD 2.x): the
        manifest's, else the text encoder's or UNet's config (optimum folders), else None."""
        value = self.manifest.get("text_embedding_dim")
        if not (isinstance(value, int) and value > 0):
            value = self._config_value("text_encoder/config.json", "hidden_size")
        if not (isinstance(value, int) and value > 0):
            value = self._config_value("unet/config.json", "cross_attention_dim")
        return value if isinstance(value, int) and value > 0 else None

    def _config_value(self, rel: str, key: str):
        path = self.path / rel
        return json.loads(path.read_text(encoding="utf-8")).get(key) if path.is_file() else None

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
    def open(cls, path: str | Path) -> ModelFolder:
        path = Path(path)
        if not path.is_dir():
            raise ModelFolderError(f"model folder {path} does not exist; pass the folder `edgediff export` wrote")
        if not (path / "model_index.json").is_file():
            # export writes model_index.json last, so an interrupted export never passes here
            raise ModelFolderError(
                f"{path} is not a complete model folder (no model_index.json); pass the folder "
                "`edgediff export` wrote (re-export if an export was interrupted)"
            )
        if (path / MANIFEST).exists():
            manifest, inferred = read_manifest(path), False
        else:
            manifest, inferred = infer_manifest(path), True
        scheduler_config = _load_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
        folder = cls(path, manifest, inferred, apply_pipeline_corrections(scheduler_config))
        folder.check_files()
        return folder

    def check_files(self) -> None:
        """Every required component present; every listed file present with its recorded size."""
        problems = []
        for name in REQUIRED_COMPONENTS:
            if not self.component_path(name).is_file():
                problems.append(f"{name}/{ONNX_FILE} is missing")
        for rel, info in self.manifest.get("files", {}).items():
            p = self.path / rel
            if not p.is_file():
                if not any(rel == f"{c}/{ONNX_FILE}" for c in REQUIRED_COMPONENTS):
                    problems.append(f"{rel} is missing")
            elif p.stat().st_size != info["size"]:
                problems.append(f"{rel} is {p.stat().st_size} bytes, the manifest says {info['size']} (truncated?)")
        if problems:
            raise ModelFolderError(f"model folder {self.path} is damaged: {'; '.join(problems)}; re-export the model")

    def verify(self) -> list[str]:
        """Recompute every file's sha256; return the problems found (empty when all match)."""
        problems = []
        for rel, info in self.manifest.get("files", {}).items():
            p = self.path / rel
            if not p.is_file():
                problems.append(f"{rel} is missing")
            elif sha256_file(p) != info["sha256"]:
                problems.append(f"{rel} does not match its sha256")
        return problems


_REQUIRED_KEYS = {
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
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{file} is corrupted ({e}); re-export the model or delete {MANIFEST}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{file} is corrupted (not a JSON object); re-export the model")
    bad = [k for k, t in _REQUIRED_KEYS.items() if not isinstance(manifest.get(k), t)]
    if bad:
        raise ManifestError(f"{file} is corrupted: missing or invalid keys {bad}; re-export the model")
    if manifest["format"] > MANIFEST_FORMAT:
        raise ManifestError(
            f"{file} has format {manifest['format']}, newer than this edgediff understands "
            f"({MANIFEST_FORMAT}); upgrade edgediff"
        )
    return manifest


def infer_manifest(path: Path) -> dict:
    """What our manifest would hold, inferred from a diffusers/optimum folder's config files."""
    vae_cfg = _load_json(path / "vae_decoder" / "config.json", "VAE decoder config")
    unet_cfg = _load_json(path / "unet" / "config.json", "UNet config")
    sched = _load_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    te_path = path / "text_encoder" / "config.json"
    te_cfg = _load_json(te_path, "text encoder config") if te_path.is_file() else {}
    downscale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = unet_cfg.get("sample_size", 64)
    sample = sample if isinstance(sample, list) else [sample, sample]
    components = {}
    for name, spec in SUBMODELS.items():
        if (path / name / ONNX_FILE).is_file():
            components[name] = {"file": f"{name}/{ONNX_FILE}", "precision": "unknown", "spec": spec.name}
    return {
        "format": MANIFEST_FORMAT,
        "family": "sd2" if te_cfg.get("hidden_act") == "gelu" else "sd1",
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "vae_scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "latent_channels": int(vae_cfg.get("latent_channels", unet_cfg.get("in_channels", 4))),
        "vae_downscale": downscale,
        "native_size": [sample[0] * downscale, sample[1] * downscale],
        "components": components,
        "files": {},
        "source": "inferred from an optimum/diffusers ONNX folder (no edgediff.json)",
    }
