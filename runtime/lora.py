"""LoRA files, read with numpy alone: the ``.safetensors`` container and the formats users have.

This is the first part of LoRA support (issue 17): reading and decoding. Mapping the modules onto a model
folder's ONNX initializers and merging them at load time come next.

- **Container.** ``read_safetensors`` reads the layout itself: an 8-byte little-endian header length, a JSON
  header (dtype, shape, byte offsets per tensor, ``__metadata__``), then raw little-endian data. That is about
  forty lines. The alternative, ``safetensors.numpy``, cannot read bf16 without ``ml_dtypes``, and the lean
  install has neither package, while many SDXL LoRAs are bf16. bf16 is widened to fp32 exactly (the top half
  of an fp32). The header is checked against the file's size, so a truncated or corrupt file is refused by
  name. Pickled ``.ckpt`` / ``.pt`` files are refused, since unpickling runs code.
- **Formats** (``read_lora``):
  - kohya-ss / A1111 (``lora_unet_*``, ``lora_te_*``, SDXL ``lora_te1_*`` / ``lora_te2_*``; ``lora_down``,
    ``lora_up``, ``alpha``, and LoCon's convolutions, Tucker ``lora_mid`` included);
  - diffusers / PEFT (``unet.<module>.lora_A`` / ``lora_B``, ``text_encoder[_2].…``, alpha from the
    ``lora_adapter_metadata`` JSON or ``adapter_config.json`` with ``rank_pattern`` / ``alpha_pattern``,
    PEFT's ``base_model.model.`` prefix);
  - the legacy diffusers attention-processor spelling (``….processor.to_q_lora.down.weight``).
- **Refused with their kind named**: LyCORIS LoHa (``hada_*``), LoKr (``lokr_*``), full-difference (``diff``)
  and DoRA (``dora_scale`` / ``lora_magnitude_vector``) files.

Each module decodes to a ``LoraModule``: its component, its name (a diffusers module path for diffusers
files, kohya's underscore spelling for kohya files, to be matched against the model's own module paths), the
factors in fp32, and ``alpha / rank``. ``LoraModule.delta()`` is ΔW, computed in fp32:
``up @ down`` for a linear layer, the reshaped product for a convolution, the Tucker contraction with
``mid``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}  # fmt: skip
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header
# kohya prefixes -> component
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}  # fmt: skip
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
# tensor-name markers of the LyCORIS kinds that are not supported yet -> the kind's name
UNSUPPORTED = {"hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "dora_scale": "DoRA",
               "lora_magnitude_vector": "DoRA", ".diff": "full-difference (LyCORIS 'diff')"}  # fmt: skip


class LoraFileError(InvalidArgumentError):
    """A LoRA file that cannot be read or is in a form edgediff does not apply."""


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file; floats come back as they are stored (bf16 as
    fp32). Every problem of the file is a ``LoraFileError`` that names it."""
    p = Path(path)
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise LoraFileError(f"{p}: a pickled PyTorch file; edgediff reads only .safetensors (unpickling runs "
                            "code). Convert it with a trusted tool first")  # fmt: skip
    if not p.is_file():
        raise LoraFileError(f"LoRA file {p} does not exist")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFileError(f"{p}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_HEADER_LIMIT, size - 8):
            raise LoraFileError(f"{p}: not a safetensors file, or truncated (header length {n} bytes, file "
                                f"{size} bytes)")  # fmt: skip
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise LoraFileError(f"{p}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{p}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    raw = np.memmap(p, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,)) if data_size else None
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LoraFileError(f"{p}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _DTYPES and dtype != "BF16":
            raise LoraFileError(f"{p}: tensor {name!r} has dtype {dtype}, which edgediff does not read")
        itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != math.prod(shape) * itemsize:
            raise LoraFileError(f"{p}: tensor {name!r} lies outside the file or has the wrong size (bytes "
                                f"{begin}..{end} of {data_size}): the file is truncated or corrupt")  # fmt: skip
        chunk = raw[begin:end] if raw is not None else np.zeros(0, np.uint8)
        if dtype == "BF16":
            value = (chunk.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            value = chunk.view(np.dtype(_DTYPES[dtype]).newbyteorder("<")).astype(_DTYPES[dtype])
        tensors[name] = value.reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


@dataclass
class LoraModule:
    component: str  # "unet", "text_encoder" or "text_encoder_2"
    name: str  # diffusers module path (diffusers files) or kohya's underscore name (kohya files)
    down: np.ndarray  # A: [r, in] or a conv [r, in, kh, kw]
    up: np.ndarray  # B: [out, r] or a 1x1 conv [out, r, 1, 1]
    alpha: float
    mid: np.ndarray | None = None  # Tucker core [r, r, kh, kw] (LoCon with lora_mid)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank: the factor before the user's strength."""
        return self.alpha / self.rank

    def delta(self) -> np.ndarray:
        """ΔW in fp32, shaped like the layer's weight ([out, in] or [out, in, kh, kw]); unscaled."""
        up = self.up.astype(np.float32).reshape(self.up.shape[0], -1)
        down = self.down.astype(np.float32)
        if self.mid is not None:  # ΔW[o,i,y,x] = Σ_ab up[o,a] mid[a,b,y,x] down[b,i]
            return np.einsum("oa,abyx,bi->oiyx", up, self.mid.astype(np.float32), down.reshape(down.shape[0], -1))
        product = up @ down.reshape(down.shape[0], -1)
        return product.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else product


@dataclass
class LoraFile:
    path: Path
    format: str  # "kohya" or "diffusers"
    modules: dict[tuple[str, str], LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # tensor names that are no LoRA factor (reported)

    @property
    def components(self) -> set[str]:
        return {c for c, _ in self.modules}


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Decode a LoRA file (kohya, diffusers/PEFT, LoCon); refuse the kinds edgediff does not apply, naming them."""
    p = Path(path)
    tensors, metadata = read_safetensors(p)
    if not tensors:
        raise LoraFileError(f"{p}: holds no tensors")
    for marker, kind in UNSUPPORTED.items():
        hits = [k for k in tensors if marker in k]
        if hits:
            raise LoraFileError(f"{p}: a {kind} file ({len(hits)} tensors like {hits[0]!r}); edgediff applies LoRA "
                                "and LoCon (lora_up/lora_down, lora_A/lora_B) only")  # fmt: skip
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors):
        return _kohya(p, tensors, metadata)
    return _diffusers(p, tensors, metadata)


def _kohya(p: Path, tensors: dict, metadata: dict) -> LoraFile:
    groups: dict[str, dict[str, np.ndarray]] = {}
    ignored = []
    for key, value in tensors.items():
        m = re.match(r"^(lora_(?:unet|te1|te2|te)_.+?)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha)$",
                     key)  # fmt: skip
        if m is None:
            ignored.append(key)
            continue
        groups.setdefault(m.group(1), {})[m.group(2).split(".")[0]] = value
    default_alpha = _float_or_none(metadata.get("ss_network_alpha"))
    modules = {}
    for base, parts in groups.items():
        prefix = next(pre for pre in sorted(KOHYA_PREFIXES, key=len, reverse=True) if base.startswith(pre))
        component, name = KOHYA_PREFIXES[prefix], base[len(prefix) :]
        alpha = float(np.asarray(parts["alpha"]).reshape(-1)[0]) if "alpha" in parts else default_alpha
        modules[component, name] = _module(p, component, name, parts.get("lora_down"), parts.get("lora_up"), alpha,
                                           parts.get("lora_mid"))  # fmt: skip
    return LoraFile(p, "kohya", modules, metadata, ignored)


def _diffusers(p: Path, tensors: dict, metadata: dict) -> LoraFile:
    config = _peft_config(p, metadata)
    groups: dict[str, dict[str, np.ndarray]] = {}
    ignored = []
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        m = re.match(r"^(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", name)
        legacy = re.match(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$", name)
        if m is not None:
            module, part = m.group(1), {"lora_A": "down", "lora_B": "up"}[m.group(2)]
        elif legacy is not None:
            target = "to_out.0" if legacy.group(2) == "to_out" else legacy.group(2)
            module, part = f"{legacy.group(1)}.{target}", legacy.group(3)
        else:
            ignored.append(key)
            continue
        if not module.startswith(DIFFUSERS_PREFIXES):
            module = "unet." + module  # PEFT's own save of a UNet adapter has no component prefix
        groups.setdefault(module, {})[part] = value
    if not groups:
        raise LoraFileError(f"{p}: no LoRA tensors found (expected kohya lora_down/lora_up or diffusers "
                            f"lora_A/lora_B names; first key {next(iter(tensors))!r})")  # fmt: skip
    modules = {}
    for module, parts in groups.items():
        component, name = module.split(".", 1)
        alpha = _peft_alpha(config, component, name)
        modules[component, name] = _module(p, component, name, parts.get("down"), parts.get("up"), alpha)
    return LoraFile(p, "diffusers", modules, metadata, ignored)


def _module(p: Path, component, name, down, up, alpha, mid=None) -> LoraModule:
    where = f"{p}: {component} module {name!r}"
    if down is None or up is None:
        raise LoraFileError(f"{where} has {'no down (A)' if down is None else 'no up (B)'} factor")
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise LoraFileError(f"{where}: factors of rank {down.ndim} and {up.ndim}; a LoRA factor has rank 2 or 4")
    rank = down.shape[0]
    inner = up.shape[1]
    if mid is not None and tuple(mid.shape[:2]) != (inner, rank):
        raise LoraFileError(f"{where}: lora_mid is {list(mid.shape)}, not [{inner}, {rank}, kh, kw]")
    if mid is None and inner != rank:
        raise LoraFileError(f"{where}: rank mismatch: down (A) has rank {rank}, up (B) takes {inner}")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise LoraFileError(f"{where}: the up factor is a {up.shape[2]}x{up.shape[3]} convolution; LoCon's is 1x1")
    alpha = float(rank) if alpha is None else float(alpha)
    if not math.isfinite(alpha):
        raise LoraFileError(f"{where}: alpha is {alpha}")
    for label, t in (("down", down), ("up", up), ("mid", mid)):
        if t is not None and not np.isfinite(t).all():
            raise LoraFileError(f"{where}: the {label} factor holds NaN or infinite values")
    return LoraModule(component, name, down, up, alpha, mid)


def _float_or_none(text) -> float | None:
    try:
        return float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def _peft_config(p: Path, metadata: dict) -> dict:
    """The PEFT LoraConfig(s): diffusers' ``lora_adapter_metadata`` (keys prefixed by component) or PEFT's own
    ``adapter_config.json`` beside the file (the UNet's)."""
    if "lora_adapter_metadata" in metadata:
        try:
            value = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            raise LoraFileError(f"{p}: its lora_adapter_metadata is not JSON") from None
        return value if isinstance(value, dict) else {}
    beside = p.with_name("adapter_config.json")
    if beside.is_file():
        try:
            value = json.loads(beside.read_text())
        except (OSError, ValueError):
            raise LoraFileError(f"{beside}: not readable JSON") from None
        return {f"unet.{k}": v for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


def _peft_alpha(config: dict, component: str, name: str) -> float | None:
    """alpha for one module from a PEFT config: its alpha_pattern entry (matched on the module name's end), else
    the global lora_alpha; None (alpha = rank) without a config. The rank is the factors' own (rank_pattern
    only sets the shapes)."""
    alpha = config.get(f"{component}.lora_alpha")
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern):
            alpha = value
    if alpha is None:
        return None
    return float(alpha)
