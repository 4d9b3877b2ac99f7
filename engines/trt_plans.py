"""TensorRT plans as data: profiles, cache keys, ``build.json``, refusal of stale or foreign plans
and the fp16 version switch. Pure functions: nothing here imports tensorrt or touches a GPU, so all
of it is unit-tested on any machine (tests/test_tensorrt.py). ``tensorrt_build.py`` (builder) and
``tensorrt.py`` (runtime engine) are the thin layers that call TensorRT and CUDA.

Layout under a model folder::

    MODEL/engines/<component>-<key16>/<component>.plan    the serialized engine
    MODEL/engines/<component>-<key16>/build.json           its key and what was read from the plan
    MODEL/engines/timing-trt<version>-sm<cc>.cache         timing cache, one per TensorRT version and GPU

One plan per component and setup (TensorRT version + GPU): a build replaces that setup's previous
plan of the component; plans of other setups stay (a folder shared by two machines) until
``--prune``. A plan holds one or more optimisation profiles: the static shape it was built for
(profile 0) and, with ``--dynamic``, a range (profile 1). The engine runs each call on the first
profile that contains the feed's shapes.

The key is a sha256 over: the model files' sha256, component, precision, TensorRT version, GPU
name, compute capability and the profiles. A plan whose facts do not match the running TensorRT,
GPU or model file is never loaded: it is refused with the rebuild command.

Profiles come from the I/O contract: each input's dims are fixed ints or symbols (``B``, ``S``,
``D``, ``C_in``, ``h``, ``w``, ..., see ``specs.SYMBOLS``); ``symbol_ranges`` gives every symbol a
(min, opt, max) from the model's facts and the build options (``B`` doubled for the components
whose contract doubles inputs for guidance), and ``derive_profile`` turns the contract into
per-input (min, opt, max) shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgediff.runtime.errors import BuildError, PlanError
from edgediff.runtime.files import write_atomic
from edgediff.runtime.model_folder import sha256_file  # one hashing routine for manifests and plan keys
from edgediff.runtime.specs import SUBMODELS, TensorSpec, resolve_symbols

ENGINES_DIR = "engines"
BUILD_JSON = "build.json"
BUILD_FORMAT = 2  # 2: a list of profiles per plan (1 had one profile per plan and several plans)

Shape = tuple[int, ...]
Range = tuple[Shape, Shape, Shape]  # (min, opt, max)
Profile = dict[str, Range]


# ------------------------------------------------------------------------------ versions


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> (10, 3, 0, 26); non-numeric tails are ignored (``"11.0.0b1"`` -> (11, 0, 0))."""
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


@dataclass(frozen=True)
class Environment:
    """What a plan is bound to: TensorRT version and the GPU it was built on."""

    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.9"


@dataclass(frozen=True)
class BuildMode:
    """How fp16 is obtained. ``strongly_typed``: precision comes from the ONNX dtypes.
    ``fp16_flag``: weak typing with ``BuilderFlag.FP16`` (TensorRT 10.x only)."""

    precision: str  # what the plan computes in: "fp16" or "fp32"
    strongly_typed: bool
    fp16_flag: bool


STRONG_TYPING_FROM = (10, 12)  # strong typing fully available (tensorrt.md §5.1)
WEAK_TYPING_UNTIL = (11,)  # TensorRT 11 removed BuilderFlag.FP16


def choose_build_mode(trt_version: str, onnx_precision: str, keep_fp32: bool = False) -> BuildMode:
    """The fp16 version switch.

    ``onnx_precision``: the component's precision in the manifest ("fp16", "fp32", "unknown").
    ``keep_fp32``: the exporter deliberately kept this component fp32 in an fp16 folder (a VAE
    whose fp16 output overflowed): it is built fp32 on every version.

    - fp16 ONNX, TensorRT >= 10.12 (incl. 11.x): strongly typed.
    - fp16 ONNX, TensorRT < 10.12 (Jetson JetPack 6 = 10.3): weak typing + FP16 flag (the path the
      demo proved there; strongly typed fp16 is unvalidated on those versions).
    - fp32 ONNX, TensorRT 10.x: weak typing + FP16 flag (deprecated from 10.12, still works).
    - fp32 ONNX, TensorRT >= 11: refused; the fp16 must come from the ONNX (``export --fp16``).
    """
    version = parse_version(trt_version)
    strong_ok = version >= STRONG_TYPING_FROM
    if keep_fp32:
        return BuildMode("fp32", strongly_typed=strong_ok, fp16_flag=False)
    if onnx_precision == "fp16":
        if strong_ok:
            return BuildMode("fp16", strongly_typed=True, fp16_flag=False)
        return BuildMode("fp16", strongly_typed=False, fp16_flag=True)
    if version >= WEAK_TYPING_UNTIL:
        raise BuildError(
            f"TensorRT {trt_version} builds fp16 only from an fp16 ONNX (TensorRT 11 removed the FP16 builder "
            f"flag), and this component is {onnx_precision}: re-export the model with `edgediff export SOURCE "
            "OUT --fp16`, then run `edgediff build OUT`"
        )
    return BuildMode("fp16", strongly_typed=False, fp16_flag=True)


# ------------------------------------------------------------------------------ profiles


@dataclass(frozen=True)
class ModelFacts:
    """What the profile symbols are made of, read from the model folder's manifest and configs."""

    native_size: tuple[int, int]  # (H, W) pixels
    vae_downscale: int
    latent_channels: int  # C
    text_length: int  # tokenizer max length (S)
    text_dim: int | None  # text encoder hidden size (D); None when unknown: then symbols' D, or the ONNX's fixed one
    # the model's other fixed symbols (``ModelFolder.model_symbols``: family defaults, C_in, C_out, ...);
    # the fields above win over these
    symbols: Mapping[str, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ProfileOptions:
    """Shapes a plan is built for. Static (default): exactly ``batch`` images of ``height`` x
    ``width`` (default the model's native size). ``dynamic``: adds a second profile for
    ``min_size``..``max_size`` pixels per side and 1..``max_batch`` images, optimised for ``batch``
    at ``height`` x ``width``. ``guidance``: the text encoder and UNet see twice the batch
    (classifier-free guidance)."""

    batch: int = 1
    height: int | None = None
    width: int | None = None
    guidance: bool | None = None  # None: the model's (off for LCM UNets and guidance-distilled Turbo models)
    dynamic: bool = False
    min_size: int | None = None  # default min(256, native)
    max_size: int | None = None  # default max(1024, native)
    max_batch: int = 4


def _check_size(name: str, value: int, f: int) -> int:
    if value <= 0 or value % f:
        raise BuildError(f"{name} must be a positive multiple of {f} (the VAE downscale factor), got {value}")
    return value


def symbol_ranges(component: str, facts: ModelFacts, options: ProfileOptions) -> dict[str, Range | tuple]:
    """(min, opt, max) for every contract symbol, for ``component``."""
    f = facts.vae_downscale
    nh, nw = facts.native_size
    height = _check_size("height", options.height or nh, f)
    width = _check_size("width", options.width or nw, f)
    if options.batch < 1 or options.max_batch < 1:
        raise BuildError(f"batch and max batch must be >= 1, got {options.batch} and {options.max_batch}")
    spec = SUBMODELS.get(component)
    guided = options.guidance is not False  # None (the model's, resolved by build_plans): on
    g = 2 if guided and spec is not None and spec.guidance_doubled else 1
    if options.dynamic:
        lo = options.min_size or min(256, nh, nw)
        hi = options.max_size or max(1024, nh, nw)
        lo, hi = lo - lo % f or f, hi - hi % f
        if not (lo <= min(height, width) and max(height, width) <= hi):
            raise BuildError(f"--min-size {lo} / --max-size {hi} must contain the optimised size {height}x{width}")
        if options.max_batch < options.batch:
            raise BuildError(f"--max-batch {options.max_batch} is below --batch {options.batch}")
        batch = (1, g * options.batch, g * options.max_batch)  # min 1: also serves guidance off
        hh, ww = (lo, height, hi), (lo, width, hi)
    else:
        batch = (g * options.batch,) * 3
        hh, ww = (height,) * 3, (width,) * 3
    model = {**facts.symbols, "C": facts.latent_channels, "S": facts.text_length}
    if facts.text_dim:
        model["D"] = facts.text_dim
    # B doubled for the whole component: the contract doubles every input with a batch axis or none
    points = [resolve_symbols(model, b, (y // f, x // f), f) for b, y, x in zip(batch, hh, ww, strict=True)]
    return {sym: tuple(p[sym] for p in points) for sym in points[0]}


def contract_symbol(component: str, tensor: str, axis: int, rank: int, kind: str = "inputs") -> str | None:
    """The symbol ``runtime/specs.py`` declares at ``axis`` of ``tensor`` (None if not declared)."""
    spec = SUBMODELS.get(component)
    if spec is None:
        return None
    if component == "unet" and tensor == "timestep" and rank == 1:
        return "B"  # a 1-D timestep (optimum's exports) is fed one value per sample (Pipeline._timestep)
    for t in getattr(spec, kind):
        if t.name == tensor and t.rank == rank:
            dim = t.shape[axis]
            return dim if isinstance(dim, str) else None
    return None


def is_dynamic(dim) -> bool:
    """A symbol, -1 or None; an int >= 0 is fixed."""
    return not isinstance(dim, (int, np.integer)) or bool(dim < 0)


def derive_profile(component: str, inputs: Sequence[TensorSpec], ranges: Mapping[str, tuple]) -> Profile:
    """Per-input (min, opt, max) shapes. ``inputs``: the model's inputs as read from the ONNX or
    manifest; a dim is an int (fixed), or a symbol / -1 / None (dynamic). A dynamic dim takes the
    range of its symbol: the manifest's own symbol when it is one of ours, else the contract's
    symbol at that axis (optimum names its axes differently)."""
    profile: Profile = {}
    for t in inputs:
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(t.shape):
            if not is_dynamic(dim):
                r = (int(dim),) * 3
            else:
                sym = dim if isinstance(dim, str) and dim in ranges else None
                sym = sym or contract_symbol(component, t.name, axis, t.rank)
                if sym is None or sym not in ranges:
                    raise BuildError(
                        f"{component}: input {t.name!r} axis {axis} is dynamic ({dim!r}) and edgediff does not "
                        f"know its size (the I/O contract has {sym or 'no symbol'} there); re-export the model "
                        "with `edgediff export`"
                    )
                r = ranges[sym]
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        profile[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


def build_profiles(
    component: str, inputs: Sequence[TensorSpec], facts: ModelFacts, options: ProfileOptions
) -> list[Profile]:
    """The plan's profiles: the static shape first, then the ``--dynamic`` range (unless it is the
    same, as for a model whose inputs are all fixed). Order matters: the engine takes the first
    profile that fits, so an exact-shape call runs on the kernels tuned for that shape."""
    static_options = dataclasses.replace(options, dynamic=False)
    static = derive_profile(component, inputs, symbol_ranges(component, facts, static_options))
    if not options.dynamic:
        return [static]
    dynamic = derive_profile(component, inputs, symbol_ranges(component, facts, options))
    return [static] if dynamic == static else [static, dynamic]


def profile_to_json(profile: Profile) -> dict:
    return {n: {"min": list(r[0]), "opt": list(r[1]), "max": list(r[2])} for n, r in profile.items()}


def profile_from_json(d: Mapping) -> Profile:
    return {n: (tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for n, r in d.items()}


def profile_misfit(profile: Profile, shapes: Mapping[str, Shape]) -> str | None:
    """Why ``shapes`` do not fit ``profile`` (None when they fit)."""
    for name, (lo, _, hi) in profile.items():
        if name not in shapes:
            return f"{name!r} not given"
        shape = tuple(shapes[name])
        if len(shape) != len(lo):
            return f"{name!r} has rank {len(shape)}, the plan {len(lo)}"
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            if lo == hi:
                return f"{name!r} is {list(shape)}, the plan takes exactly {list(lo)}"
            return f"{name!r} is {list(shape)}, the plan takes {list(lo)}..{list(hi)}"
    return None


def describe_profile(profile: Profile) -> str:
    parts = []
    for name, (lo, _, hi) in profile.items():
        if not lo:
            continue
        parts.append(f"{name} {list(lo)}" if lo == hi else f"{name} {list(lo)}..{list(hi)}")
    return ", ".join(parts) or "scalar inputs only"


def pick_profile(record: BuildRecord, shapes: Mapping[str, Shape], model_dir: Path | str) -> int:
    """Index of the first profile of ``record`` that contains ``shapes``; ``PlanError`` naming
    every profile and the build command for these shapes when none does."""
    misfits = []
    for i, profile in enumerate(record.profiles):
        why = profile_misfit(profile, shapes)
        if why is None:
            return i
        misfits.append(f"profile {i} ({describe_profile(profile)}): {why}")
    raise PlanError(
        f"{record.component}: the TensorRT plan {record.key} does not take these shapes ({'; '.join(misfits)}). "
        f"Build it for them: {rebuild_hint(model_dir)} --width W --height H --batch N (--no-guidance for "
        "guidance_scale <= 1), or add --dynamic for a range"
    )


# ------------------------------------------------------------------------------ keys and build.json


def plan_key(model_sha256: str, component: str, precision: str, env: Environment, profiles: Sequence[Profile],
             refittable: bool = False) -> str:  # fmt: skip
    """``<component>-<16 hex>``: a sha256 over every fact a plan depends on."""
    facts: dict[str, object] = {
        "model_sha256": model_sha256,
        "component": component,
        "precision": precision,
        "trt_version": env.trt_version,
        "gpu_name": env.gpu_name,
        "compute_capability": env.compute_capability,
        "profiles": [profile_to_json(p) for p in profiles],
    }
    if refittable:  # (absent otherwise, so the keys of plans built before refitting existed stay the same)
        facts["refittable"] = True
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    return f"{component}-{digest[:16]}"


@dataclass
class BuildRecord:
    """The content of ``build.json``: the key facts, and what was read back from the built plan."""

    key: str
    component: str
    precision: str
    model_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str
    profiles: list[Profile]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    plan_file: str
    plan_bytes: int
    model_files: dict[str, dict] = field(default_factory=dict)  # rel path -> {size, mtime_ns, sha256}
    build: dict = field(default_factory=dict)  # options used: strongly_typed, opt_level, workspace, seconds ...
    device_memory_bytes: int | None = None  # scratch (activation) memory a context of the plan allocates
    format: int = BUILD_FORMAT
    path: Path | None = None  # the folder holding build.json (not serialised)

    @property
    def environment(self) -> Environment:
        return Environment(self.trt_version, self.gpu_name, self.compute_capability)

    @property
    def plan_path(self) -> Path:
        if self.path is None:
            raise ValueError("record has no folder")
        return self.path / self.plan_file

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["profiles"] = [profile_to_json(p) for p in self.profiles]
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        return d

    @classmethod
    def from_json(cls, d: Mapping, path: Path | None = None) -> BuildRecord:
        d = dict(d)
        if d.get("format") != BUILD_FORMAT:
            raise ValueError(f"build.json format {d.get('format')!r} is not this edgediff's ({BUILD_FORMAT})")
        d["profiles"] = [profile_from_json(p) for p in d["profiles"]]
        if not d["profiles"]:
            raise ValueError("no profile")
        d["inputs"] = [TensorSpec.from_json(t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec.from_json(t) for t in d["outputs"]]
        return cls(**d, path=path)


def timing_cache_path(model_dir: Path, env: Environment) -> Path:
    """One timing cache per TensorRT version and GPU: timings from another GPU would mislead the
    tactic choice (TensorRT's README warns about sharing caches across GPU targets)."""
    safe = re.sub(r"[^A-Za-z0-9.]+", "_", env.trt_version)
    return Path(model_dir) / ENGINES_DIR / f"timing-trt{safe}-sm{env.compute_capability.replace('.', '')}.cache"


def write_build_json(folder: Path, record: BuildRecord) -> None:
    write_atomic(Path(folder) / BUILD_JSON, (json.dumps(record.to_json(), indent=2) + "\n").encode())


def read_build_json(folder: Path) -> BuildRecord:
    """Read ``folder/build.json``; ``PlanError`` naming the file and the fix when it is unreadable."""
    file = Path(folder) / BUILD_JSON
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return BuildRecord.from_json(data, path=Path(folder))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise PlanError(
            f"{file} is damaged or from another edgediff version ({type(e).__name__}: {e}); delete {folder}, "
            f"then run {rebuild_hint(Path(folder).parent.parent)}"
        ) from e


def discover_plans(model_dir: Path, component: str | None = None) -> tuple[list[BuildRecord], list[str]]:
    """Every readable ``build.json`` under ``MODEL/engines`` (of ``component`` if given), and the
    problems met (damaged records, missing or truncated plans) as sentences."""
    records: list[BuildRecord] = []
    problems: list[str] = []
    root = Path(model_dir) / ENGINES_DIR
    if not root.is_dir():
        return records, problems
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if component is not None and not sub.name.startswith(f"{component}-"):
            continue
        if not (sub / BUILD_JSON).is_file():
            continue
        try:
            rec = read_build_json(sub)
        except PlanError as e:
            problems.append(str(e))
            continue
        if component is not None and rec.component != component:
            continue
        plan = sub / rec.plan_file
        if not plan.is_file():
            problems.append(f"{plan} is missing; rebuild")
        elif plan.stat().st_size != rec.plan_bytes:
            problems.append(f"{plan} is {plan.stat().st_size} bytes, build.json says {rec.plan_bytes} (truncated?)")
        else:
            records.append(rec)
    return records, problems


# ------------------------------------------------------------------------------ model fingerprint


def model_files(component_dir: Path) -> list[Path]:
    """The files a plan is built from: the ONNX graph and its external data (configs excluded)."""
    return sorted(p for p in Path(component_dir).iterdir() if p.is_file() and p.suffix != ".json")


def model_fingerprint(
    model_dir: Path,
    component_dir: Path,
    known: Iterable[Mapping[str, Mapping]] = (),
) -> tuple[str, dict[str, dict]]:
    """(sha256 over the component's model files, {rel: {size, mtime_ns, sha256}}).

    ``known`` are earlier records ({rel: {size, sha256[, mtime_ns]}}: a build.json's
    ``model_files`` or the manifest's ``files``); a file whose size (and mtime, where recorded)
    still match reuses that sha256 instead of hashing gigabytes again on every load."""
    known = list(known)
    files, lines = {}, []
    for p in model_files(component_dir):
        rel = p.relative_to(model_dir).as_posix()
        st = p.stat()
        sha = None
        for table in known:
            info = table.get(rel)
            if not info or info.get("size") != st.st_size or "sha256" not in info:
                continue
            if "mtime_ns" in info and info["mtime_ns"] != st.st_mtime_ns:
                continue
            sha = info["sha256"]
            break
        sha = sha or sha256_file(p)
        files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        lines.append(f"{rel}\0{sha}\n")
    if not lines:
        raise PlanError(f"{component_dir} holds no model file")
    return hashlib.sha256("".join(lines).encode()).hexdigest(), files


# ------------------------------------------------------------------------------ refusal


def rebuild_hint(model_dir: Path | str) -> str:
    return f"`edgediff build {model_dir}`"


def stale_reasons(record: BuildRecord, env: Environment, model_sha256: str | None) -> list[str]:
    """Why ``record``'s plan must not be loaded here (empty when it may)."""
    reasons = []
    if record.trt_version != env.trt_version:
        reasons.append(f"built with TensorRT {record.trt_version}, this is TensorRT {env.trt_version}")
    if record.compute_capability != env.compute_capability or record.gpu_name != env.gpu_name:
        reasons.append(
            f"built for {record.gpu_name} (compute capability {record.compute_capability}), this GPU is "
            f"{env.gpu_name} ({env.compute_capability})"
        )
    if model_sha256 is not None and record.model_sha256 != model_sha256:
        reasons.append("the model file changed since the plan was built")
    return reasons


def usable_plan(
    records: Sequence[BuildRecord],
    component: str,
    env: Environment,
    model_sha256: str | None,
    model_dir: Path | str,
    problems: Sequence[str] = (),
) -> BuildRecord:
    """The one plan of ``component`` that may run here. ``PlanError`` otherwise: no plan at all
    (run build), only stale ones (each named, with why and how to rebuild), or several (a folder
    edited by hand: a build keeps one per setup)."""
    mine = [r for r in records if r.component == component]
    usable = [r for r in mine if not stale_reasons(r, env, model_sha256)]
    if len(usable) == 1:
        return usable[0]
    extra = f" (also: {'; '.join(problems)})" if problems else ""
    if len(usable) > 1:
        raise PlanError(
            f"{component}: several TensorRT plans for this setup ({', '.join(r.key for r in usable)}) under "
            f"{Path(model_dir) / ENGINES_DIR}; delete all but one, or rebuild with {rebuild_hint(model_dir)} "
            "(a build keeps one plan per component and setup)"
        )
    if not mine:
        raise PlanError(
            f"{component}: no TensorRT plan under {Path(model_dir) / ENGINES_DIR}{extra}; build them with "
            f"{rebuild_hint(model_dir)} (needs TensorRT on this GPU), or use the ONNX Runtime engine: "
            'engine="onnxruntime"'
        )
    details = "; ".join(f"{r.key}: {', '.join(stale_reasons(r, env, model_sha256))}" for r in mine)
    raise PlanError(
        f"{component}: refusing TensorRT plans built for another setup ({details}){extra}. A plan only runs with "
        f"the TensorRT version and GPU it was built for, and the model file it was built from: rebuild with "
        f"{rebuild_hint(model_dir)} (add --prune to delete the old plans)"
    )


def superseded(records: Sequence[BuildRecord], key: str, env: Environment, prune: bool = False) -> list[BuildRecord]:
    """The plans a build of ``key`` deletes: the component's other plans for the same setup (one plan
    per component and setup), and with ``prune`` those of every other setup too."""
    return [r for r in records if r.key != key and (prune or r.environment == env)]


def symbolize(component: str, name: str, dtype, shape: Sequence[int], kind: str) -> TensorSpec:
    """A spec for a tensor read from a plan: -1 dims become the contract's symbol (or "?")."""
    dims: list[int | str] = []
    for axis, d in enumerate(shape):
        if int(d) >= 0:
            dims.append(int(d))
        else:
            dims.append(contract_symbol(component, name, axis, len(shape), kind) or "?")
    return TensorSpec(name, np.dtype(dtype), tuple(dims))
