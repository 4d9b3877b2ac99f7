"""Applying LoRAs at load time (issue 17): each LoRA module is matched to the ONNX initializer that holds its
layer's weight, through the weights map the export wrote (``export/weights_map.py``), and merged with numpy:

    W' = W_base + Σᵢ sᵢ · (αᵢ / rᵢ) · ΔWᵢ

computed in fp32 from the *base* weights every time (never onto weights already merged), then cast to the
graph's dtype. The merged initializers go to the engine at session creation (``weights=`` of every engine);
nothing is written to disk.

- **Matching is exact, from the model side.** The map lists every weight the graph holds by its diffusers
  module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``). A diffusers/PEFT file names
  modules that way; a kohya file names them ``lora_unet_`` + the path with ``.`` turned into ``_``, so the
  model's own paths are spelled the kohya way and looked up, never guessed back from the underscores.
- **Bad input is refused by name**: a LoRA for another architecture (no module matches, or a module's shape
  differs: counts and examples), one for a text encoder the model lacks, a scale that is not finite. Modules
  that match nothing while others match are counted in a warning, an error with ``strict=True``.
- **Memory**: the merge is lazy (``MergedWeights``): each initializer is merged when the engine reads it, from
  its base value read from ``model.onnx_data``, so an engine holds at most one merged copy of the weights a LoRA
  changes, and ONNX Runtime keeps none once its session exists (``benchmarks/results/lora_sd15.md``: 0.2 copies'
  worth more than without LoRAs once loaded, 1.8 copies at the peak of the session's creation, on the full-size
  UNet).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError, ModelFolderError
from .lora import LoraFile, LoraFileError, LoraModule, read_lora

logger = logging.getLogger(__name__)

MAP_FILE = "weights_map.json"
MAP_FORMAT = 2
TARGETS = ("unet", "text_encoder", "text_encoder_2")
_EXAMPLES = 3


@dataclass(frozen=True)
class Lora:
    """One LoRA file at a strength: ``Pipeline.load(loras=[("style.safetensors", 0.8)])``."""

    file: LoraFile
    scale: float
    hash: str  # A1111's short hash (sha256 of the tensor data, the header left out: its "addnet" hash), 12 hex

    @property
    def name(self) -> str:
        return Path(self.file.path).stem

    @property
    def key(self) -> tuple:
        """What decides the merged weights: the file's contents and the strength."""
        return (self.hash, self.scale)


def _check_scale(path, scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidArgumentError(f"LoRA {path}: the scale must be a finite number (e.g. 0.8), got {scale!r}")
    return float(scale)


def short_hash(path: str | os.PathLike) -> str:
    """A1111's ``Lora hashes`` value for a .safetensors file: the first 12 hex digits of the sha256 of the bytes
    after the header (its ``addnet_hash_safetensors``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def parse_lora_argument(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (the CLI's ``--lora``) -> (file, scale); the scale defaults to 1. A colon that is part of
    the path (``C:\\loras\\x.safetensors``) stays in it: only a number after the last colon is a scale."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def as_loras(loras) -> list[Lora]:
    """``[(file, scale) | file | "file:scale" | Lora, ...]`` -> Loras, each file read and checked."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike, Lora)) or (isinstance(loras, tuple) and len(loras) == 2
                                                       and isinstance(loras[1], (int, float))):  # fmt: skip
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, Lora):
            out.append(item)
            continue
        if isinstance(item, (str, os.PathLike)):
            path, scale = parse_lora_argument(os.fspath(item)) if isinstance(item, str) else (item, 1.0)
        elif isinstance(item, Sequence) and len(item) == 2:
            path, scale = item
        else:
            raise InvalidArgumentError(f"loras: each entry is (file, scale) or a file, got {item!r}")
        scale = _check_scale(path, scale)
        out.append(Lora(read_lora(path), scale, short_hash(path)))
    return out


class WeightsMap:
    """A component's ``weights_map.json``: module path -> the initializer holding its weight, and where the base
    values lie in ``model.onnx_data``."""

    def __init__(self, component: str, model_file: Path, data: dict):
        self.component = component
        self.model_file = model_file
        self.entries = {k.removesuffix(".weight"): v for k, v in data["weights"].items() if k.endswith(".weight")}
        self.kohya = {module.replace(".", "_"): module for module in self.entries}
        if component == "unet":  # SDXL kohya files often name the UNet's layers the original (SGM) way
            for sgm, module in sgm_names(self.entries).items():
                self.kohya.setdefault(sgm.replace(".", "_"), module)
        self.ambiguous = {k.removesuffix(".weight") for k in data.get("ambiguous", [])}
        self.initializers = data["initializers"]
        self.data_file = model_file.parent / data["model"]["data"]

    @classmethod
    def load(cls, component: str, model_file: Path, folder: Path) -> WeightsMap:
        path = model_file.parent / MAP_FILE
        remake = f"`edgediff weights-map {folder} SOURCE` (SOURCE: the diffusers folder it was exported from)"
        if not path.is_file():
            raise ModelFolderError(f"{component}: {model_file.parent} has no {MAP_FILE}, which LoRAs are applied "
                                   f"through (exported by an older edgediff or by optimum): make it once with "
                                   f"{remake}, or re-export the model")  # fmt: skip
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ok = data.get("format") == MAP_FORMAT and {"weights", "initializers", "model"} <= set(data)
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ModelFolderError(f"{component}: {path} is damaged or from an older edgediff; remake it with "
                                   f"{remake}")  # fmt: skip
        record = data["model"]
        data_file = model_file.parent / record["data"]
        same = (
            hashlib.sha1(model_file.read_bytes()).hexdigest() == record.get("sha1")
            and data_file.is_file()
            and data_file.stat().st_size == record.get("data_bytes")
        )
        if not same:
            raise ModelFolderError(f"{component}: {path} was made for another version of {model_file.name} (the "
                                   f"graph or its weights changed since); remake it with {remake}")  # fmt: skip
        return cls(component, model_file, data)

    def module_of(self, module: LoraModule, kohya: bool) -> str | None:
        return self.kohya.get(module.name) if kohya else (module.name if module.name in self.entries else None)

    def base(self, initializer: str) -> np.ndarray:
        """The graph's own value of ``initializer``, read from ``model.onnx_data`` into a new array (read, not
        mapped: the pages it came from are the page cache's, not this process's, once the merge is done)."""
        info = self.initializers[initializer]
        dtype = np.dtype(info["dtype"])
        value = np.fromfile(self.data_file, dtype=dtype, count=info["length"] // dtype.itemsize, offset=info["offset"])
        return value.reshape(info["shape"])


_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}  # fmt: skip
_FIXED_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def sgm_names(modules: Iterable[str]) -> dict[str, str]:
    """``{original (SGM / LDM) module path: diffusers module path}`` for a UNet's modules, made from the model
    side: the block numbering of the original checkpoints (``input_blocks.<n>.<k>``, ``middle_block.<k>``,
    ``output_blocks.<n>.<k>``, ResNets' ``in_layers.2`` / ``out_layers.3`` / ``emb_layers.1`` /
    ``skip_connection``) follows from the number of ResNets per down block, which the paths themselves show
    (the renames of ../shared/reference/lora.md §2.1, diffusers' ``_maybe_map_sgm_blocks_to_diffusers``)."""
    modules = list(modules)
    per_block = 1 + max((int(m.group(1)) for path in modules
                         if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", path))), default=-1)  # fmt: skip
    if per_block <= 0:
        return {}
    up_attention = {int(m.group(1)) for path in modules if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", path))}
    step = per_block + 1  # each down level: its ResNets (+ attentions) then one downsampler
    out = {}
    for path in modules:
        name = _FIXED_SGM.get(path)
        if name is None and (m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)):
            kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            block = f"input_blocks.{1 + i * step + j}" if kind == "down" else f"output_blocks.{i * step + j}"
            rest = _resnet_sgm(rest) if part == "resnets" else rest
            name = f"{block}.{0 if part == 'resnets' else 1}.{rest}" if rest else None
        elif name is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)):
            name = f"input_blocks.{(int(m.group(1)) + 1) * step}.0.op"
        elif name is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)):
            i = int(m.group(1))
            name = f"output_blocks.{i * step + per_block}.{2 if i in up_attention else 1}.conv"
        elif name is None and (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)):
            part, j, rest = m.group(1), int(m.group(2)), m.group(3)
            rest = _resnet_sgm(rest) if part == "resnets" else rest
            name = f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}" if rest else None
        if name is not None:
            out[name] = path
    return out


def _resnet_sgm(rest: str) -> str | None:
    return _RESNET_SGM.get(rest)


@dataclass
class Match:
    """The modules of each LoRA that land on one component, with their weight entries."""

    component: str
    pairs: list[tuple[Lora, LoraModule, dict]]


def _delta_shape(module: LoraModule) -> tuple[int, ...]:
    out = module.up.shape[0]
    if module.mid is not None:
        return (out, module.down.shape[1], *module.mid.shape[2:])
    return (out, *module.down.shape[1:])


def _fits(delta_shape: tuple[int, ...], weight_shape: Sequence[int]) -> bool:
    """A linear LoRA on a 1x1 convolution (and back) is the same matrix: equal once the trailing 1s go."""
    strip = lambda s: tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)  # noqa: E731
    return tuple(delta_shape) == tuple(weight_shape) or strip(delta_shape) == strip(weight_shape)


def match(loras: Iterable[Lora], maps: dict[str, WeightsMap], present: Iterable[str], model: str,
          strict: bool = False) -> dict[str, Match]:  # fmt: skip
    """Each LoRA's modules on the components in ``maps`` (``present``: the LoRA targets the model has). Refuses
    a LoRA for another architecture or for a component the model lacks; counts the modules that match nothing."""
    present = set(present)
    found: dict[str, Match] = {}
    for lora in loras:
        path = lora.file.path
        missing = sorted(lora.file.components - present)
        if missing:
            n = sum(1 for c, _ in lora.file.modules if c in missing)
            hint = " (an SDXL LoRA on an SD 1.x/2.x model?)" if "text_encoder_2" in missing else ""
            raise InvalidArgumentError(f"LoRA {path}: {n} of its modules are for {', '.join(missing)}, which the "
                                       f"model {model} does not have{hint}; use a LoRA made for this model's "
                                       "architecture")  # fmt: skip
        kohya = lora.file.format == "kohya"
        unmatched, wrong_shape, matched = [], [], []
        for (component, _), module in lora.file.modules.items():
            wmap = maps[component]
            target = wmap.module_of(module, kohya)
            if target is None:
                why = " (ambiguous in the weights map)" if module.name in wmap.ambiguous else ""
                unmatched.append(f"{component}:{module.name}{why}")
                continue
            entry = wmap.entries[target]
            if not _fits(_delta_shape(module), entry["shape"]):
                wrong_shape.append(f"{component}:{module.name} is {list(_delta_shape(module))}, the model's "
                                   f"{entry['shape']}")  # fmt: skip
                continue
            matched.append((component, module, entry))
        total = len(lora.file.modules)
        if wrong_shape or not matched:
            what = (f"{len(wrong_shape)} have another shape than the model's layer (e.g. "
                    f"{'; '.join(wrong_shape[:_EXAMPLES])})" if wrong_shape else "")  # fmt: skip
            none = f"none of its {total} modules matches a layer of {model} (e.g. {', '.join(unmatched[:_EXAMPLES])})"
            detail = what if wrong_shape else none
            raise InvalidArgumentError(f"LoRA {path} is for another model architecture: {len(matched)} of {total} "
                                       f"modules match, {detail}; use a LoRA made for this model (SD 1.x, 2.x "
                                       "or SDXL, as the model is)")  # fmt: skip
        if unmatched:
            message = (f"LoRA {path}: {len(unmatched)} of its {total} modules match no layer of {model} and are "
                       f"not applied (e.g. {', '.join(unmatched[:_EXAMPLES])})")  # fmt: skip
            if strict:
                raise InvalidArgumentError(message + "; strict=True refuses a partial LoRA")
            logger.warning("%s", message)
        for component, module, entry in matched:
            found.setdefault(component, Match(component, [])).pairs.append((lora, module, entry))
    return found


class MergedWeights(Mapping):
    """One component's LoRA-merged initializers, computed when read: ``weights[name]`` is base + Σ s·(α/r)·ΔW for
    that initializer alone, in fp32, cast to the graph's dtype. An engine that reads them one at a time (ONNX
    Runtime writes each into its copy of the weights file, TensorRT's refitter takes each) never holds more than
    one merged initializer beyond what it keeps; ``dict(weights)`` materialises them all. LoRAs at strength 0
    change nothing and are left out. ``data_file`` and ``location(name)`` say where each one lies in the
    component's ``model.onnx_data``."""

    def __init__(self, wmap: WeightsMap, pairs: Sequence[tuple[Lora, LoraModule, dict]]):
        self.wmap = wmap
        self.data_file = wmap.data_file
        self._parts: dict[str, list[tuple[float, LoraModule, dict]]] = {}
        for lora, module, entry in pairs:
            if lora.scale != 0.0:
                self._parts.setdefault(entry["initializer"], []).append((lora.scale * module.scale, module, entry))

    def __getitem__(self, initializer: str) -> np.ndarray:
        parts = self._parts[initializer]
        base = self.wmap.base(initializer)
        value = base.astype(np.float32, copy=False)  # (the one extra copy of a changed weight, read just now)
        for factor, module, entry in parts:
            delta = module.delta().reshape(entry["shape"])  # torch's layout (a 1x1 conv and a matrix alike)
            if entry["transposed"]:
                delta = delta.T
            value += np.float32(factor) * delta.reshape(value.shape)
            del delta
        return value if value.dtype == base.dtype else value.astype(base.dtype)

    def __iter__(self):
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def location(self, initializer: str) -> tuple[int, int]:
        """``(offset, length)`` of the initializer's bytes in ``data_file``."""
        info = self.wmap.initializers[initializer]
        return int(info["offset"]), int(info["length"])

    @property
    def nbytes(self) -> int:
        return sum(self.location(name)[1] for name in self)


def _maps_and_matches(folder, loras: Sequence[Lora], strict: bool) -> tuple[dict[str, WeightsMap], dict]:
    present = [c for c in TARGETS if c in folder.components]
    needed = set().union(*(lora.file.components for lora in loras)) & set(present)
    maps = {c: WeightsMap.load(c, folder.component_path(c), folder.path) for c in sorted(needed)}
    return maps, match(loras, maps, present, str(folder.path), strict=strict)


def merged_weights(folder, loras: Sequence[Lora], strict: bool = False, components: Iterable[str] | None = None,
                   lazy: bool = False) -> dict[str, Mapping[str, np.ndarray]]:  # fmt: skip
    """``{component: {initializer: merged value}}`` for the ``ModelFolder`` ``folder`` (only ``components`` when
    given); empty without LoRAs. ``lazy``: each component's ``MergedWeights``, which merge as they are read (what
    the pipeline hands the engines), instead of the arrays."""
    if not loras:
        return {}
    maps, matches = _maps_and_matches(folder, loras, strict)
    wanted = set(matches) if components is None else set(components) & set(matches)
    out: dict[str, Mapping[str, np.ndarray]] = {}
    for c in sorted(wanted):
        weights = MergedWeights(maps[c], matches[c].pairs)
        out[c] = weights if lazy else dict(weights)
    return out


def int8_refusal(component: str) -> InvalidArgumentError:
    """The error every CPU engine gives for LoRAs on its int8 variant."""
    return InvalidArgumentError(f"{component}: LoRAs cannot be applied to the int8 variant (its weights are "
                                "quantized); leave int8 off with LoRAs, or export a model with the LoRA merged and "
                                "quantize that")  # fmt: skip


def touched(loras: Sequence[Lora]) -> dict[str, tuple]:
    """``{component: keys of the LoRAs that change it}``: what decides whether an engine must be re-created."""
    out: dict[str, list] = {}
    for lora in loras:
        for component in sorted(lora.file.components):
            out.setdefault(component, []).append(lora.key)
    return {c: tuple(keys) for c, keys in out.items()}


__all__ = ["Lora", "LoraFileError", "MergedWeights", "WeightsMap", "as_loras", "int8_refusal", "match",
           "merged_weights", "parse_lora_argument", "short_hash", "touched"]  # fmt: skip
