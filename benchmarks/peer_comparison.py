"""edgediff against what users would run instead, on the same model, size, steps, scheduler and
thread count, on this machine, in one run:

- diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (PyTorch, CPU), in fp32 (``diffusers``, the
  reference image) and in bf16 (``diffusers-bf16``),
- optimum's ``ORTStableDiffusionPipeline`` / ``ORTStableDiffusionXLPipeline`` (ONNX Runtime, CPU) on the same
  ONNX folder (``optimum``),
- optimum-intel's ``OVStableDiffusionPipeline`` / ``OVStableDiffusionXLPipeline`` (OpenVINO; what FastSD CPU builds
  on), inference precision f32 (``optimum-intel``) and bf16 (``optimum-intel-bf16``),
- OpenVINO GenAI's C++ ``openvino_genai.Text2ImagePipeline``, f32 (``ov-genai``) and bf16 (``ov-genai-bf16``),
- stable-diffusion.cpp (ggml) through ``stable-diffusion-cpp-python``, f32 weights (``sdcpp``),
- edgediff (ONNX Runtime, CPU).

    python benchmarks/peer_comparison.py                       # SD 1.5 architecture, 512 and 256 px, every contender
    python benchmarks/peer_comparison.py --sizes 256 --runs 1  # quicker
    python benchmarks/peer_comparison.py --sizes 512 256 --contenders diffusers optimum edgediff \
        --edgediff 'edgediff={}' --edgediff 'low-memory={"low_memory": true}' --edgediff 'int8={"cpu_variant": "int8"}'
    python benchmarks/peer_comparison.py --arch sdxl-base --sizes 1024 512 --steps 4 --runs 0 --no-optimize
    python benchmarks/peer_comparison.py --arch sdxl-base --sizes 512 --mode turbo --decoders full tiny
    python benchmarks/peer_comparison.py --setup-peers        # only (re)create the peers' venvs (below), then exit

The CPU peers of issue 16, in one command (their venvs and the OpenVINO export are made on first use)::

    python benchmarks/peer_comparison.py --sizes 512 --contenders diffusers diffusers-bf16 optimum-intel \
        optimum-intel-bf16 ov-genai ov-genai-bf16 sdcpp edgediff --label _cpu_peers

``--mode``: ``standard`` (DPM++ 2M, ``--steps`` at ``--guidance``), ``turbo`` (SD/SDXL-Turbo-shaped: 1 step of
Euler ancestral on trailing timesteps, guidance 0) or ``lcm`` (LCM-shaped: 4 steps of LCM, guidance 1, so one
batch-1 UNet call per step); ``--decoders full tiny`` runs each contender with the full VAE and with the tiny
autoencoder (TAESD architecture, random weights) too (diffusers, diffusers-bf16 and edgediff only). ``--runs 0``
times the first image itself (full-size SDXL at 1024 px costs minutes per image on a small CPU).

The model is the random-weight SD 1.5-architecture model of ``full_size_models.py`` (built and
exported first if missing; ``edgediff optimize`` is run on it, as users run it on a CPU, and
``--int8`` when an ``--edgediff`` configuration asks for the int8 variant). Every contender runs
in its own fresh process, one after the other, so cold start (process start to first PNG written)
and peak memory (the process's peak RSS) are its own. Per contender and size: one cold image,
``--warmup`` untimed images, ``--runs`` timed images; every UNet call is timed (how, per contender, below).
Results (with the machine) go to ``benchmarks/results/peers_<arch>.{json,md}``
and a chart ``peers_<arch>.png``; ratios are edgediff over each peer from this one run. Each row records its
engine and precision and its image difference from diffusers fp32's seed-0 image (mean / max abs, PSNR); rows
whose noise, scheduler or tokens differ from diffusers' say so in their notes.

The CPU peers of issue 16 (same diffusers folder, size, steps, guidance, prompt, seed and threads):

- ``diffusers-bf16``: ``from_pretrained(..., torch_dtype=torch.bfloat16)``: bf16 weights and bf16 compute. Measured
  against fp32 weights under ``torch.autocast("cpu", dtype=torch.bfloat16)`` on the full-size SD 1.5 UNet (256 px,
  batch 2, 2 threads, AVX512_BF16 CPU, best of 3): fp32 2.0 s, autocast 1.3 s, bf16 weights 0.8 s per call, so bf16
  weights.
  Same venv as diffusers; same torch generator, so the same noise (drawn in bf16: torch's bf16 draw is the fp32
  draw rounded). UNet calls timed by wrapping ``pipe.unet.forward``, as for diffusers.
- ``optimum-intel`` / ``optimum-intel-bf16``: ``OVStableDiffusionPipeline`` on the OpenVINO IR that
  ``optimum-cli export openvino --task text-to-image --weight-format fp32`` writes from the same diffusers folder,
  once, to ``<folder>-openvino`` beside it (``<root>/sd15-openvino`` for ``<root>/sd15-diffusers``; the export time
  is not in the timings; ``edgediff-export.json`` there records it). ``ov_config``: ``INFERENCE_PRECISION_HINT``
  ``f32`` or ``bf16`` set explicitly (OpenVINO 2026 picks bf16 by itself on CPUs with AVX512_BF16),
  ``INFERENCE_NUM_THREADS``, ``PERFORMANCE_HINT=LATENCY``; static shapes for the size when guidance > 1
  (``reshape`` then ``compile``, optimum-intel's documented speed-up; its reshape assumes a CFG batch of 2). The
  pipeline is diffusers' own loop, so the scheduler is swapped as for diffusers (DPM++ 2M) and a torch generator
  gives diffusers' noise. UNet calls timed by wrapping ``pipe.unet.forward`` (one call per step, batch 2 with CFG).
- ``ov-genai`` / ``ov-genai-bf16``: ``openvino_genai.Text2ImagePipeline`` on that IR: ``reshape(1, size, size,
  guidance)``, then ``compile("CPU", INFERENCE_PRECISION_HINT=..., INFERENCE_NUM_THREADS=..., PERFORMANCE_HINT=
  "LATENCY")``. Its schedulers (``Scheduler.Type``): DDIM, EULER_DISCRETE, EULER_ANCESTRAL_DISCRETE, LCM, PNDM,
  FLOW_MATCH_EULER_DISCRETE; no DPM++ 2M, so ``--mode standard`` runs Euler discrete (the same one batch-2 UNet call
  per step, on the model's own timestep spacing) and its image difference includes that scheduler change. Noise:
  ``openvino_genai.TorchGenerator(seed)``, which draws with ``torch.randn`` on a CPU generator seeded with the seed,
  so its noise is diffusers' (checked: in ``--mode turbo``, where both run Euler ancestral, its image was within
  1/255 of diffusers' on a tiny model). UNet calls: its own per-call durations,
  ``get_performance_metrics().raw_metrics.unet_inference_durations``; VAE decode from the same metrics.
- ``sdcpp``: stable-diffusion.cpp via ``stable-diffusion-cpp-python`` (built from source here: ggml's CPU backend
  with ``-march=native``, so AVX2 / AVX-512 / AVX512_BF16 as the CPU has). It loads the diffusers folder itself
  (``model_path=<diffusers folder>``: its diffusers loader reads ``unet/``, ``vae/`` and ``text_encoder/``
  safetensors and renames them to the original checkpoint's names), so no conversion; it builds the published
  architectures from fixed shapes, so a tiny random model cannot load (the row says so). ``wtype="f32"``,
  ``sample_method="dpm++2m"`` on diffusers' own DPM++ 2M sigmas (computed here from the folder's scheduler config and
  passed as custom ``sigmas``), ``cfg_scale`` = guidance. It draws its own noise: ``rng_type="cpu"`` is its port of
  torch's CPU ``randn``, meant to give torch's draw for the seed, but not checked against it here; and it tokenizes
  with its built-in CLIP vocabulary, not the folder's tokenizer (the random-weight models' tokenizer is a small local
  one, so their token ids, hence the conditioning, differ; for a published SD 1.x they are the same). UNet time: per
  sampling step from its progress callback; with guidance that step is two batch-1 UNet evaluations (cond, uncond).
  VAE decode: from its log ("decode_first_stage completed, taking ...").

The peers' venvs: the OpenVINO peers and sd.cpp need what the project's export venv does not hold (optimum-intel
2.2 resolves to transformers 5.5 and optimum 2.3, where that venv keeps transformers < 4.58 and optimum 2.1 for
optimum-onnx; sd.cpp is a native build), so ``setup_peer_venv`` makes one venv
per peer family under ``~/.cache/edgediff/peer-venvs/<name>/`` with the versions pinned in ``PEER_VENVS`` (the one
place they are written), the first time a contender needs it or with ``--setup-peers``; the parent runs that
contender's worker with the venv's python. ``openvino`` holds optimum-intel and OpenVINO GenAI together: GenAI runs
the IR that optimum-intel exports with the same OpenVINO runtime and tokenizers. The worker code is self-contained
(stdlib, the peer's library, numpy / Pillow / torch where the venv has them; peak RSS from
``resource.getrusage``): edgediff is not installed into the peer venvs, so they hold exactly the peer and its pinned
dependencies, and nothing of ours can change what is measured there. A venv whose setup failed (e.g. sd.cpp not
building) records why in ``edgediff-setup-failed.txt``, its contender's row says ``skipped: <why>``, and it is not
retried until ``--setup-peers``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "a photograph of an astronaut riding a horse"
CONTENDERS = ("diffusers", "diffusers-bf16", "optimum", "optimum-intel", "optimum-intel-bf16", "ov-genai",
              "ov-genai-bf16", "sdcpp", "edgediff")  # fmt: skip
PEERS = ("diffusers", "optimum", "diffusers-bf16", "optimum-intel", "optimum-intel-bf16", "ov-genai", "ov-genai-bf16",
         "sdcpp")  # fmt: skip
TINY_DECODER_CONTENDERS = ("diffusers", "diffusers-bf16", "edgediff")  # the others have no tiny-autoencoder path here

# The peers' own venvs, ~/.cache/edgediff/peer-venvs/<name>/, pinned here and only here. torch stays at the CPU build
# this machine has (a newer one would be a multi-GB CUDA build). "uninstall": torchvision comes with optimum-intel
# but its wheel is built for the CUDA torch (torchvision::nms missing on torch+cpu), which breaks importing
# transformers; nothing here uses it. sd.cpp is built from source with the CPU's own instruction set (ggml's
# GGML_NATIVE): --no-cache-dir so a wheel built for another CPU is never reused.
PEER_VENV_ROOT = Path.home() / ".cache" / "edgediff" / "peer-venvs"
PEER_VENVS: dict[str, dict] = {
    "openvino": {
        "pins": [
            "torch==2.13.0",
            "optimum-intel[openvino,diffusers]==2.2.0",
            "optimum==2.3.0",
            "openvino==2026.4.1",
            "openvino-tokenizers==2026.4.1.0",
            "openvino-genai==2026.4.1.0",
            "nncf==3.4.0",
            "transformers==5.5.4",
            "diffusers==0.39.0",
            "tokenizers==0.22.2",
            "huggingface_hub==1.21.0",
            "safetensors==0.8.0",
            "numpy==2.4.6",
            "pillow==13.0.0",
        ],
        "pip_args": [],
        "uninstall": ["torchvision"],
    },
    "sdcpp": {
        "pins": ["stable-diffusion-cpp-python==0.4.7", "pillow==13.0.0", "typing-extensions==4.16.0"],
        "pip_args": ["--no-cache-dir"],
        "env": {"CMAKE_ARGS": "-DGGML_NATIVE=ON"},
        "uninstall": [],
    },
}
VENV_OF = {"optimum-intel": "openvino", "optimum-intel-bf16": "openvino", "ov-genai": "openvino",
           "ov-genai-bf16": "openvino", "sdcpp": "sdcpp"}  # fmt: skip
SETUP_TIMEOUT_S = 45 * 60  # per pip step; the sd.cpp build took about 4 minutes on 2 busy cores
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def setup_peer_venv(name: str, force: bool = False) -> tuple[Path | None, str | None]:
    """(python of the peer venv ``name``, None), made with ``PEER_VENVS[name]``'s pins if missing or pinned
    differently; (None, why) when its setup failed (then, unless ``force``, not tried again)."""
    import shutil

    spec = PEER_VENVS[name]
    home = PEER_VENV_ROOT / name
    python = home / "bin" / "python"
    stamp = json.dumps(spec, sort_keys=True)
    done, failed = home / "edgediff-pins.json", home / "edgediff-setup-failed.txt"
    if python.exists() and done.is_file() and done.read_text() == stamp:
        return python, None
    tried = home / "edgediff-pins-tried.json"
    if not force and failed.is_file() and tried.is_file() and tried.read_text() == stamp:
        return None, failed.read_text().strip()
    print(f"setting up the {name} peer venv in {home} (pinned: {' '.join(spec['pins'])}) ...", file=sys.stderr,
          flush=True)  # fmt: skip
    shutil.rmtree(home, ignore_errors=True)
    home.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1), **spec.get("env", {}))
    pip = [str(python), "-m", "pip"]
    steps = [
        ("creating the venv", [sys.executable, "-m", "venv", str(home)]),
        ("upgrading pip", [*pip, "install", "-q", "--upgrade", "pip"]),
        ("installing " + " ".join(spec["pins"]), [*pip, "install", "-q", *spec["pip_args"], *spec["pins"]]),
    ]
    if spec["uninstall"]:
        steps.append(("uninstalling " + " ".join(spec["uninstall"]), [*pip, "uninstall", "-y", "-q",
                                                                         *spec["uninstall"]]))  # fmt: skip
    t0 = time.time()
    for what, cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SETUP_TIMEOUT_S, check=False)
            why = None if proc.returncode == 0 else _error_line(proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired:
            why = f"over {SETUP_TIMEOUT_S // 60} minutes"
        if why:
            home.mkdir(parents=True, exist_ok=True)
            tried.write_text(stamp)
            failed.write_text(f"{name} venv setup failed {what}: {why}\n")
            return None, failed.read_text().strip()
    done.write_text(stamp)
    print(f"{name} peer venv ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return python, None


def _error_line(output: str) -> str:
    """The most telling line of a failed command's output: its last line naming an error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:500]


def openvino_folder(source: Path, python: Path) -> Path:
    """The OpenVINO IR that optimum-intel exports from the diffusers folder ``source`` (fp32 weights), exported once
    with the peer venv's ``optimum-cli`` to ``<source minus -diffusers>-openvino`` beside it."""
    import shutil

    dst = source.parent / (source.name.removesuffix("-diffusers") + "-openvino")
    if (dst / "model_index.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [str(python.parent / "optimum-cli"), "export", "openvino", "--model", str(source), "--task", "text-to-image",
           "--weight-format", "fp32", str(tmp)]  # fmt: skip
    print(f"exporting {source} to OpenVINO IR in {dst} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **OFFLINE), check=False)
    if proc.returncode != 0 or not (tmp / "model_index.json").is_file():
        raise RuntimeError(f"optimum-cli export openvino failed: {_error_line(proc.stdout + proc.stderr)}")
    seconds = time.time() - t0
    record = {"command": " ".join(cmd[1:-1] + [str(dst)]), "seconds": seconds, "source": str(source)}
    (tmp / "edgediff-export.json").write_text(json.dumps(record) + "\n")
    os.replace(tmp, dst)
    print(f"exported in {seconds:.0f} s", file=sys.stderr, flush=True)
    return dst


def diffusers_sigmas(source: Path, mode: str, steps: int) -> list[float] | None:
    """The k-diffusion sigmas of diffusers' schedule for ``mode`` on ``source``'s scheduler config (sigma of each
    timestep, then 0), for sd.cpp's custom ``sigmas``; None without diffusers."""
    try:
        import diffusers
        import numpy as np
    except ImportError:
        return None
    cls = {"standard": diffusers.DPMSolverMultistepScheduler, "lcm": diffusers.LCMScheduler,
           "turbo": diffusers.EulerAncestralDiscreteScheduler}[mode]  # fmt: skip
    config = cls.load_config(source, subfolder="scheduler", local_files_only=True)
    scheduler = cls.from_config(config, **({"timestep_spacing": "trailing"} if mode == "turbo" else {}))
    scheduler.set_timesteps(steps)
    ac = scheduler.alphas_cumprod.numpy().astype(np.float64)
    t = np.rint(scheduler.timesteps.numpy()).astype(int)
    return [float(s) for s in np.sqrt((1 - ac[t]) / ac[t])] + [0.0]


# ----------------------------------------------------------------------------------------- worker
# Runs in the contender's own process, which for the peers of PEER_VENVS is that venv's python: stdlib at the top
# of this module, each contender's libraries imported in its own function, nothing of edgediff outside edgediff's.
def _peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (as edgediff.runtime.measure.peak_rss_bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, without numpy."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class _Probe:
    """What a contender's worker collects while it generates: UNet call and VAE decode seconds, stages."""

    def __init__(self):
        self.unet_calls: list[float] = []
        self.decodes: list[float] = []
        self.stages: dict[str, float] = {}  # edgediff: the last image's per-stage seconds
        self.keep: list = []  # callbacks that a native library holds, kept alive for the process

    def timed(self, fn, into: list[float]):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            into.append(time.perf_counter() - t0)
            return r

        return wrapper


def _worker(args) -> dict:
    """Runs inside the contender's own process; prints one JSON line."""
    t_spawn = args.spawn_time
    probe = _Probe()
    name = args.worker
    if name == "edgediff":
        build = _edgediff_worker
    elif name.startswith("optimum-intel"):
        build = _optimum_intel_worker
    elif name.startswith("ov-genai"):
        build = _ov_genai_worker
    elif name == "sdcpp":
        build = _sdcpp_worker
    else:
        build = _torch_worker
    load, generate, save, info = build(args, probe)

    runs = []
    for i in range(1 + args.warmup + args.runs):
        before = len(probe.unet_calls)
        t0 = time.perf_counter()
        image = generate(i)
        end_to_end = time.perf_counter() - t0
        if i == 0:
            save(image, Path(args.tmp) / f"{name}-{args.size}.png")
            cold_start = time.time() - t_spawn
        runs.append({"end_to_end": end_to_end, "unet_calls": probe.unet_calls[before:]})
    timed_runs = runs[1 + args.warmup :] or runs[:1]  # --runs 0: the first image is the timed one
    calls = [c for r in timed_runs for c in r["unet_calls"]]
    decodes = probe.decodes[-len(timed_runs) :]
    return {
        "contender": name,
        "size": args.size,
        "load_s": load,
        "cold_start_s": cold_start,
        "first_image_s": runs[0]["end_to_end"],
        "end_to_end_s": [r["end_to_end"] for r in timed_runs],
        "end_to_end_median_s": _percentile([r["end_to_end"] for r in timed_runs], 50),
        "unet_calls_per_image": len(timed_runs[0]["unet_calls"]),
        "unet_call_median_s": _percentile(calls, 50),
        "unet_call_p90_s": _percentile(calls, 90),
        "vae_decode_median_s": _percentile(decodes, 50) if decodes else None,
        "peak_rss_bytes": _peak_rss_bytes(),
        **({"stages_s": dict(probe.stages)} if probe.stages else {}),
        **info,
    }


def _edgediff_worker(args, probe: _Probe):
    import onnxruntime as ort

    from edgediff.runtime import Pipeline
    from edgediff.runtime.image import save_png

    options = json.loads(args.edgediff_options)
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.folder, threads=args.threads, **options)
    load = time.perf_counter() - t0

    scheduler = {"standard": "dpmpp_2m", "lcm": "lcm",
                 "turbo": {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}}[
        args.mode]  # fmt: skip

    def generate(seed):
        r = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.size,
                 height=args.size, seed=seed, scheduler=scheduler, decoder=args.decoder)  # fmt: skip
        probe.unet_calls.extend(r.unet_calls)
        probe.decodes.append(r.timings["vae_decoder"])
        probe.stages.clear()
        probe.stages.update(r.timings)
        return r.images[0]

    try:
        manifest = json.loads((Path(args.folder) / "edgediff.json").read_text())
        precision = manifest["components"]["unet"]["precision"]
    except (OSError, KeyError, ValueError):  # an optimum-written folder has no manifest
        precision = "fp32"
    info = {"engine": edgediff_engine(options, ort.__version__, _openvino_version()),
            "precision": edgediff_precision(options, precision),
            "unet_timing": "the pipeline's own per-call timings"}  # fmt: skip
    return load, generate, save_png, info


def _openvino_version() -> str | None:
    try:
        import openvino

        return openvino.get_version().split("-")[0]
    except ImportError:
        return None


def edgediff_engine(options: dict, ort_version: str | None, ov_version: str | None) -> str:
    """The engine an edgediff configuration ran on, from its Pipeline.load options."""
    if options.get("engine") == "openvino":
        return f"edgediff (OpenVINO {ov_version or '?'})"
    return f"edgediff (ONNX Runtime {ort_version or '?'})"


def edgediff_precision(options: dict, exported: str = "fp32") -> str:
    """The UNet's arithmetic in an edgediff configuration: int8 (with the precision of the rest), else the engine
    precision (OpenVINO) or the export's (ONNX Runtime)."""
    rest = options.get("precision") or ("f32" if options.get("engine") == "openvino" else exported)
    return f"int8 (static; rest {rest})" if options.get("cpu_variant") == "int8" else rest


def _diffusers_scheduler(pipe, mode: str) -> None:
    """Swap in the scheduler of ``--mode`` (diffusers' classes, on the pipeline's own config)."""
    import diffusers

    config = pipe.scheduler.config
    pipe.scheduler = {
        "standard": lambda: diffusers.DPMSolverMultistepScheduler.from_config(config),
        "lcm": lambda: diffusers.LCMScheduler.from_config(config),
        "turbo": lambda: diffusers.EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing"),
    }[mode]()


def _time_diffusers_style(pipe, probe: _Probe, args):
    """Time every UNet call and VAE decode of a diffusers-style pipeline (its loop calls ``pipe.unet(...)`` and
    ``pipe.vae.decode(...)``); returns ``generate(seed)``, which seeds a torch CPU generator with the seed."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    pipe.unet.forward = probe.timed(pipe.unet.forward, probe.unet_calls)  # nn.Module / ORT / OV __call__ -> forward
    pipe.vae.decode = probe.timed(pipe.vae.decode, probe.decodes)

    def generate(seed):
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.inference_mode():
            return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.size,
                        height=args.size, generator=g).images[0]  # fmt: skip

    return generate


def _save_pil(image, path: Path) -> None:
    image.save(path)


def _torch_worker(args, probe: _Probe):
    """diffusers (fp32), diffusers-bf16 (bf16 weights and compute) and optimum (ONNX Runtime)."""
    import importlib.metadata

    import torch

    torch.set_num_threads(args.threads)
    import diffusers

    xl = args.arch.startswith("sdxl")
    t0 = time.perf_counter()
    if args.worker.startswith("diffusers"):
        dtype = torch.bfloat16 if args.worker == "diffusers-bf16" else torch.float32
        if xl:
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
                args.source, add_watermarker=False, local_files_only=True, torch_dtype=dtype
            )
        else:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                args.source, safety_checker=None, requires_safety_checker=False, local_files_only=True,
                torch_dtype=dtype,
            )  # fmt: skip
        if args.decoder == "tiny":
            pipe.vae = diffusers.AutoencoderTiny.from_pretrained(args.tiny_vae, local_files_only=True,
                                                                 torch_dtype=dtype)  # fmt: skip
        info = {"engine": f"diffusers {diffusers.__version__} (PyTorch {torch.__version__})",
                "precision": "bf16 (bf16 weights)" if dtype == torch.bfloat16 else "fp32"}  # fmt: skip
    else:
        import onnxruntime as ort
        import optimum.onnxruntime as ortd

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        if args.no_prepack:  # as edgediff's {"prepack": false}: no packed second copy of the weights
            so.add_session_config_entry("session.disable_prepacking", "1")
        cls = ortd.ORTStableDiffusionXLPipeline if xl else ortd.ORTStableDiffusionPipeline
        pipe = cls.from_pretrained(args.folder, export=False, session_options=so)
        info = {"engine": f"optimum-onnx {importlib.metadata.version('optimum-onnx')} (ONNX Runtime "
                          f"{ort.__version__})", "precision": "fp32"}  # fmt: skip
    _diffusers_scheduler(pipe, args.mode)
    load = time.perf_counter() - t0
    generate = _time_diffusers_style(pipe, probe, args)
    return load, generate, _save_pil, {**info, "unet_timing": "wrapped pipe.unet.forward"}


def _optimum_intel_worker(args, probe: _Probe):
    """optimum-intel's OVStableDiffusion(XL)Pipeline on the OpenVINO IR, inference precision f32 or bf16."""
    import importlib.metadata

    import torch

    torch.set_num_threads(args.threads)
    from optimum.intel import OVStableDiffusionPipeline, OVStableDiffusionXLPipeline

    precision = "bf16" if args.worker.endswith("-bf16") else "f32"
    ov_config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": str(args.threads),
                 "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    t0 = time.perf_counter()
    cls = OVStableDiffusionXLPipeline if args.arch.startswith("sdxl") else OVStableDiffusionPipeline
    pipe = cls.from_pretrained(args.ov_folder, ov_config=ov_config, compile=False, local_files_only=True)
    static = args.guidance > 1  # optimum-intel's reshape assumes the CFG batch of 2 (or an LCM UNet's 1)
    if static:
        pipe.reshape(batch_size=1, height=args.size, width=args.size, num_images_per_prompt=1)
    pipe.compile()
    _diffusers_scheduler(pipe, args.mode)
    load = time.perf_counter() - t0
    compiled = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")
    compiled = getattr(compiled, "get_type_name", lambda: str(compiled))()  # an ov.Type: "f32", "bf16"
    generate = _time_diffusers_style(pipe, probe, args)
    version = importlib.metadata.version
    info = {"engine": f"optimum-intel {version('optimum-intel')} (OpenVINO {version('openvino')})",
            "precision": f"{precision} (compiled UNet: {compiled}; fp32 IR)",
            "unet_timing": "wrapped pipe.unet.forward", "static_shapes": static}  # fmt: skip
    return load, generate, _save_pil, info


def _ov_genai_worker(args, probe: _Probe):
    """OpenVINO GenAI's Text2ImagePipeline on the OpenVINO IR, inference precision f32 or bf16."""
    import importlib.metadata

    import numpy as np
    import openvino_genai as og
    from PIL import Image

    precision = "bf16" if args.worker.endswith("-bf16") else "f32"
    folder = Path(args.ov_folder)
    # no DPM++ 2M in OpenVINO GenAI: standard mode runs Euler discrete (one UNet call per step, as DPM++ 2M)
    kind, patch = {"standard": ("EULER_DISCRETE", {}), "lcm": ("LCM", {}),
                   "turbo": ("EULER_ANCESTRAL_DISCRETE", {"timestep_spacing": "trailing"})}[args.mode]  # fmt: skip
    config = {**json.loads((folder / "scheduler" / "scheduler_config.json").read_text()), **patch}
    config_path = Path(args.tmp) / f"{args.worker}-scheduler_config.json"
    config_path.write_text(json.dumps(config))
    t0 = time.perf_counter()
    pipe = og.Text2ImagePipeline(folder)
    pipe.set_scheduler(og.Scheduler.from_config(config_path, getattr(og.Scheduler.Type, kind)))
    pipe.reshape(1, args.size, args.size, args.guidance)
    pipe.compile("CPU", INFERENCE_PRECISION_HINT=precision, INFERENCE_NUM_THREADS=args.threads,
                 PERFORMANCE_HINT="LATENCY")  # fmt: skip
    load = time.perf_counter() - t0

    def generate(seed):
        tensor = pipe.generate(PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps,
                               guidance_scale=args.guidance, generator=og.TorchGenerator(seed))  # fmt: skip
        metrics = pipe.get_performance_metrics()
        probe.unet_calls.extend(d / 1e6 for d in metrics.raw_metrics.unet_inference_durations)  # microseconds
        probe.decodes.append(metrics.get_vae_decoder_infer_duration() / 1e3)  # milliseconds
        return Image.fromarray(np.asarray(tensor.data)[0])

    scheduler = {"standard": "Euler discrete", "lcm": "LCM", "turbo": "Euler ancestral, trailing"}[args.mode]
    notes = ["noise: openvino_genai.TorchGenerator(seed), torch.randn on a CPU generator, diffusers' draw (in --mode "
             "turbo, the same scheduler as diffusers', its image was within 1/255 of diffusers')"]  # fmt: skip
    if args.mode == "standard":
        notes.insert(0, "scheduler: Euler discrete, as OpenVINO GenAI has no DPM++ 2M (it has DDIM, Euler, Euler "
                        "ancestral, LCM, PNDM, flow-match Euler), so its image differs from diffusers' by that "
                        "too")  # fmt: skip
    info = {"engine": f"OpenVINO GenAI {importlib.metadata.version('openvino-genai')}",
            "precision": f"{precision} (fp32 IR)",
            "scheduler": scheduler, "notes": notes,
            "unet_timing": "get_performance_metrics().raw_metrics.unet_inference_durations"}  # fmt: skip
    return load, generate, _save_pil, info


def _sdcpp_worker(args, probe: _Probe):
    """stable-diffusion.cpp (stable-diffusion-cpp-python) on the diffusers folder itself, f32 weights."""
    import ctypes
    import importlib.metadata
    import re

    import stable_diffusion_cpp as sdc
    from stable_diffusion_cpp import StableDiffusion

    log: list[tuple[int, str]] = []

    @sdc.sd_log_callback
    def on_log(level, text, data):
        log.append((level, text.decode("utf-8", errors="replace").strip()))

    sdc.sd_set_log_callback(on_log, ctypes.c_void_p(0))  # replaces the binding's printer (it discards what we keep)
    probe.keep.append(on_log)  # sd.cpp holds the callback: it must outlive this function

    def cannot(what, e=None):
        # sd.cpp logs why at ERROR level (a missing text_encoder_2 is only SDXL's, not an error for SD 1.x / 2.x)
        errors = [text for level, text in log if level >= 3 and "text_encoder_2" not in text][-2:]
        return SystemExit(f"skipped: stable-diffusion.cpp could not {what} {args.source} "
                          f"({' / '.join(errors) or e}); it builds the published SD architectures from fixed shapes, "
                          "so only those load")  # fmt: skip

    t0 = time.perf_counter()
    try:
        sd = StableDiffusion(model_path=args.source, n_threads=args.threads, wtype="f32", rng_type="cpu",
                             sampler_rng_type="cpu", vae_decode_only=True, verbose=False)  # fmt: skip
    except (ValueError, RuntimeError) as e:
        raise cannot("load", e) from e
    if any("get sd version from file failed" in text for _, text in log):  # it returns a context that cannot run
        raise cannot("load")
    load = time.perf_counter() - t0
    sigmas = args.sigmas or None
    method = {"standard": "dpm++2m", "lcm": "lcm", "turbo": "euler_a"}[args.mode]

    def generate(seed):
        marks: dict[int, float] = {}
        first_log = len(log)

        def progress(step, steps, seconds_per_step):  # seconds per step averaged over the steps so far
            if step:
                marks[abs(step)] = seconds_per_step

        try:
            images = sd.generate_image(PROMPT, negative_prompt="", width=args.size, height=args.size,
                                       cfg_scale=max(args.guidance, 1.0),  # <= 1: no unconditional pass, as diffusers
                                       sample_method=method, scheduler="discrete", sample_steps=args.steps,
                                       sigmas=sigmas, seed=seed, progress_callback=progress)  # fmt: skip
        except ValueError as e:  # NULL image: sd.cpp failed and logged why
            raise cannot("generate with", e) from e
        done = 0.0
        for step in sorted(marks):
            probe.unet_calls.append(marks[step] * step - done)
            done = marks[step] * step
        decoded = [float(m) for _, text in log[first_log:]
                   for m in re.findall(r"decode_first_stage completed, taking ([0-9.]+)s", text)]  # fmt: skip
        probe.decodes.extend(decoded[-1:])
        return images[0]

    notes = ["noise: its own draw (rng_type='cpu', its port of torch's CPU randn for the seed; not checked here)",
             "tokens: its built-in CLIP vocabulary, not the folder's tokenizer (they differ for the random-weight "
             "models' small tokenizer, so the conditioning differs too)",
             "UNet time: per sampling step (progress callback); with guidance, two batch-1 UNet "
             "evaluations"]  # fmt: skip
    if args.mode == "standard":
        own = "sigmas: its own discrete schedule (the parent had no diffusers to compute diffusers')"
        notes.insert(0, "sigmas: diffusers' DPM++ 2M sigmas, passed as custom sigmas" if sigmas else own)
    info = {"engine": f"stable-diffusion.cpp (stable-diffusion-cpp-python "
                      f"{importlib.metadata.version('stable-diffusion-cpp-python')}, ggml CPU)",
            "precision": "f32 (wtype f32)", "sampler": method, "notes": notes,
            "unet_timing": "per sampling step, from its progress callback"}  # fmt: skip
    return load, generate, _save_pil, info


# ----------------------------------------------------------------------------------------- parent
def _run_contender(name, size, options: dict, args, source, folder, tmp, decoder: str = "full") -> dict:
    python, extra = sys.executable, []
    if name in VENV_OF:  # a peer with its own venv: made on first use
        python, why = setup_peer_venv(VENV_OF[name])
        if python is None:
            return {"contender": name, "size": size, "error": [f"skipped: {why}"]}
        if VENV_OF[name] == "openvino":
            try:
                extra += ["--ov-folder", str(openvino_folder(Path(source), python))]
            except RuntimeError as e:
                return {"contender": name, "size": size, "error": [f"skipped: {e}"]}
        if name == "sdcpp":
            sigmas = diffusers_sigmas(Path(source), args.mode, args.steps)
            extra += ["--sigmas", ",".join(f"{s:.8g}" for s in sigmas)] if sigmas else []
    cmd = [str(python), __file__, "--worker", name, "--size", str(size), "--steps", str(args.steps),
           "--guidance", str(args.guidance), "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--runs", str(args.runs), "--source", str(source), "--folder", str(folder), "--tmp", str(tmp),
           "--edgediff-options", json.dumps(options), "--arch", args.arch, "--mode", args.mode,
           "--decoder", decoder, "--tiny-vae", str(args.tiny_vae), *extra]  # fmt: skip
    cmd += ["--no-prepack"] if args.no_prepack else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), **OFFLINE)
    cmd += ["--spawn-time", repr(time.time())]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"contender": name, "size": size, "error": [f"timed out: no image within --timeout {args.timeout:g} s"]}
    if proc.returncode != 0:
        return {"contender": name, "size": size, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return a / b if a and b else None


def summarise(results: list[dict]) -> list[dict]:
    """One row per (size, edgediff configuration, peer): edgediff's figure over the peer's."""
    ok = sorted((r for r in results if "error" not in r), key=lambda r: -r["size"])

    def worker(r):  # results written before --decoders have neither key
        return r.get("worker", r["contender"] if r["contender"] in PEERS else "edgediff"), r.get("decoder", "full")

    peers = {(r["size"], *worker(r)): r for r in ok if worker(r)[0] in PEERS}
    ours_rows = [r for r in ok if worker(r)[0] not in PEERS]
    pairs = [(ours, peers.get((ours["size"], name, worker(ours)[1]))) for ours in ours_rows for name in PEERS]
    return [{
        "size": ours["size"], "edgediff": ours["contender"], "peer": peer["contender"],
        "unet_call": _ratio(ours["unet_call_median_s"], peer["unet_call_median_s"]),
        "end_to_end": _ratio(ours["end_to_end_median_s"], peer["end_to_end_median_s"]),
        "cold_start": _ratio(ours["cold_start_s"], peer["cold_start_s"]),
        "peak_rss": _ratio(ours["peak_rss_bytes"], peer["peak_rss_bytes"]),
    } for ours, peer in pairs if peer is not None]  # fmt: skip


def image_difference(a_png: Path, b_png: Path) -> dict | None:
    """Pixel difference of two PNGs (0..255 scale): mean and max |a - b| and PSNR in dB."""
    import numpy as np
    from PIL import Image

    from edgediff.runtime.measure import psnr

    if not (a_png.is_file() and b_png.is_file()):
        return None
    a, b = (np.asarray(Image.open(f).convert("RGB"), np.float64) for f in (a_png, b_png))
    if a.shape != b.shape:
        return None
    d = np.abs(a - b)
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "psnr_db": psnr(a, b, 255)}


# Issue 16's targets, judged at every size: (name, what, limit, direction). "at most": value <= limit.
TARGETS = (
    ("fastest edgediff UNet call vs the fastest peer's", "fastest_unet", 0.9, "at most"),
    ("fastest edgediff end to end vs the fastest peer's", "fastest_end_to_end", 0.9, "at most"),
    ("fp32 default: UNet rate / fp32 ceiling (numpy SGEMM, OPENBLAS_CORETYPE unset)", "fp32_ceiling", 0.9, "at least"),
    ("fp32 default: end to end vs diffusers fp32", "fp32_end_to_end", 0.45, "at most"),
    ("fp32 default: cold start vs diffusers fp32", "fp32_cold_start", 0.5, "at most"),
    ("fastest edgediff: cold start vs diffusers fp32", "fastest_cold_start", 0.5, "at most"),
)


def faithful(r: dict) -> bool:
    """An edgediff configuration that is image-equal to diffusers: f32 arithmetic, no int8 variant."""
    options = r.get("options") or {}
    return options.get("cpu_variant") != "int8" and options.get("precision", "f32") == "f32"


def judge_targets(report: dict) -> list[dict]:
    """Issue 16's targets at each size: the value, the limit, met or not, how far off (``of_limit`` > 1: missed by
    that factor, for "at least" targets limit / value) and which rows it compares."""
    ok = [r for r in report["results"] if "error" not in r and r.get("decoder", "full") == "full"]

    def is_peer(r):
        return r.get("worker", r["contender"] if r["contender"] in PEERS else "edgediff") in PEERS

    rows = []
    ceiling = (report.get("ceiling") or {}).get("sgemm_gflops")
    for size in sorted({r["size"] for r in ok}, reverse=True):
        peers = [r for r in ok if r["size"] == size and is_peer(r)]
        ours = [r for r in ok if r["size"] == size and not is_peer(r)]
        if not ours:
            continue
        default = next((r for r in ours if faithful(r)), None)
        diffusers = next((r for r in peers if r.get("worker", r["contender"]) == "diffusers"), None)
        values = {}
        if peers:
            for key, field in (("fastest_unet", "unet_call_median_s"), ("fastest_end_to_end", "end_to_end_median_s")):
                mine, theirs = min(ours, key=lambda r: r[field]), min(peers, key=lambda r: r[field])
                values[key] = (mine[field] / theirs[field], f"{mine['contender']} vs {theirs['contender']}")
        fastest = min(ours, key=lambda r: r["end_to_end_median_s"])
        flops = (report.get("unet_flops") or {}).get(str(size))
        if default is not None and flops and ceiling:
            values["fp32_ceiling"] = (flops / default["unet_call_median_s"] / 1e9 / ceiling, default["contender"])
        if default is not None and diffusers is not None:
            values["fp32_end_to_end"] = (default["end_to_end_median_s"] / diffusers["end_to_end_median_s"],
                                         f"{default['contender']} vs diffusers")  # fmt: skip
            values["fp32_cold_start"] = (default["cold_start_s"] / diffusers["cold_start_s"],
                                         f"{default['contender']} vs diffusers")  # fmt: skip
        if diffusers is not None:
            values["fastest_cold_start"] = (fastest["cold_start_s"] / diffusers["cold_start_s"],
                                            f"{fastest['contender']} vs diffusers")  # fmt: skip
        for name, key, limit, direction in TARGETS:
            if key not in values:
                continue
            value, compared = values[key]
            met = value <= limit if direction == "at most" else value >= limit
            of_limit = value / limit if direction == "at most" else limit / value
            rows.append({"size": size, "target": name, "edgediff": compared, "value": value, "limit": limit,
                         "direction": direction, "met": met, "of_limit": of_limit})  # fmt: skip
    return rows


def engine_and_precision(r: dict) -> str:
    """A result row's engine and precision as its worker recorded them; rows recorded before workers did, by name.
    An edgediff row's are read from its options (rows recorded before the worker knew OpenVINO named ONNX Runtime
    for every configuration)."""
    if r.get("worker") == "edgediff" and r.get("engine"):
        versions = dict(re.findall(r"(ONNX Runtime|OpenVINO) ([\w.]+)", r["engine"]))
        libraries = r.get("libraries") or {}
        options = r.get("options") or {}
        engine = edgediff_engine(options, versions.get("ONNX Runtime"), libraries.get("openvino"))
        return f"{engine}, {edgediff_precision(options, 'fp32')}"
    if r.get("engine"):
        return f"{r['engine']}, {r.get('precision', '?')}"
    worker = r.get("worker", r["contender"] if r["contender"] in PEERS else "edgediff")
    known = {"diffusers": "diffusers (PyTorch), fp32", "optimum": "optimum (ONNX Runtime), fp32"}
    return known.get(worker, f"edgediff (ONNX Runtime), {(r.get('options') or {}).get('cpu_variant') or 'fp32'}")


def write_markdown(path: Path, report: dict) -> None:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# Peer comparison: {s['arch']} architecture (random weights), {s['steps']} steps "
        f"{s.get('scheduler', 'DPM++ 2M')}, guidance {s['guidance']}, batch 1 (UNet batch "
        f"{2 if s['guidance'] > 1 else 1})",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs ({', '.join(m['flags'])}), "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB; {m['os']}; threads {s['threads']} for every contender.",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()),
        f"Run: `{s['command']}` on {s['date']}; {s['warmup']} warm-up + {s['runs']} timed images per contender "
        "after the cold one, each contender in its own fresh process.",
        "",
        "| size | contender | UNet call median (s) | UNet p90 (s) | VAE decode (s) | end to end median (s) "
        "| cold start (s) | load (s) | peak RSS (GiB) | image vs diffusers: mean / max abs (0-255) | PSNR (dB) "
        "| engine, precision | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []  # footnotes: each row's notes (noise, scheduler, tokens, timing that differ), numbered

    def refs(r):
        notes.extend(note for note in dict.fromkeys(r.get("notes", [])) if note not in notes)
        return " ".join(f"[{notes.index(note) + 1}]" for note in r.get("notes", []))

    for r in report["results"]:
        if "error" in r:
            error = " ".join(r["error"]).replace("|", "\\|")
            lines.append(f"| {r['size']} | {r['contender']} | "
                         f"{error if error.startswith('skipped') else 'failed: ' + error} |" + " |" * 10)  # fmt: skip
            continue
        diff = r.get("image_vs_diffusers")
        reference = r.get("worker", r["contender"]) == "diffusers" or not diff
        lines.append(
            f"| {r['size']} | {r['contender']} | {r['unet_call_median_s']:.2f} | {r['unet_call_p90_s']:.2f} | "
            + (f"{r['vae_decode_median_s']:.2f}" if r.get("vae_decode_median_s") is not None else "-")
            + f" | {r['end_to_end_median_s']:.1f} | {r['cold_start_s']:.1f} | {r['load_s']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | "
            + ("-" if reference else f"{diff['mean_abs']:.2f} / {diff['max_abs']:.0f}")
            + " | "
            + ("-" if reference or diff.get("psnr_db") is None else f"{diff['psnr_db']:.1f}")
            + f" | {engine_and_precision({'libraries': m['libraries'], **r})} | {refs(r)} |"
        )
    if notes:
        lines += ["", "Notes (rows whose noise, scheduler, tokens or UNet timing differ from diffusers'):", ""]
        lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    variants = [r for r in report["results"] if r.get("image_vs_edgediff")]
    if variants:
        lines += ["", "Image difference of each edgediff configuration from edgediff's default (seed 0):", ""]
        lines += [f"- {r['size']} px, {r['contender']}: mean {r['image_vs_edgediff']['mean_abs']:.2f}, max "
                  f"{r['image_vs_edgediff']['max_abs']:.0f} (0-255), PSNR {r['image_vs_edgediff']['psnr_db']:.1f} dB"
                  for r in variants]  # fmt: skip
    lines += [
        "",
        "Ratios, edgediff / peer (lower is better for edgediff):",
        "",
        "| size | edgediff | peer | UNet call | end to end | cold start | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["ratios"]:
        lines.append(
            f"| {row['size']} | {row['edgediff']} | {row['peer']} | "
            + " | ".join(
                "-" if row[k] is None else f"{row[k]:.2f}"
                for k in ("unet_call", "end_to_end", "cold_start", "peak_rss")
            )
            + " |"
        )
    targets = judge_targets(report)
    if targets:
        c = report.get("ceiling") or {}
        lines += ["", "Issue 16's targets (value / limit > 1: missed by that factor; for an \"at least\" target, "
                  "limit / value). The fp32 ceiling: numpy's SGEMM with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, "
                  f"{c.get('sgemm_gflops', 0):.0f} GFLOP/s ({c.get('blas', '?')}); the UNet's FLOPs are counted on "
                  "its ONNX graph.", "",
                  "| size | target | compared | measured | limit | met | value / limit |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {t['size']} | {t['target']} | {t['edgediff']} | {t['value']:.3g} | {t['direction']} "
                  f"{t['limit']:g} | {'yes' if t['met'] else 'no'} | {t['of_limit']:.2f} |"
                  for t in targets]  # fmt: skip
        lines += ["", "Why the missed targets are missed, from measurements (a profile by operator): "
                  "[cpu_targets.md](cpu_targets.md)."]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def draw_chart(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if "error" not in r]
    sizes = sorted({r["size"] for r in ok}, reverse=True)
    metrics = (("unet_call_median_s", "UNet call (s)"), ("end_to_end_median_s", "end to end (s)"),
               ("cold_start_s", "cold start (s)"), ("peak_rss_bytes", "peak RSS (GiB)"))  # fmt: skip
    fig, axes = plt.subplots(len(sizes), len(metrics), figsize=(5 * len(metrics), 3.6 * len(sizes)), squeeze=False)
    colours = {"diffusers": "#7f7f7f", "diffusers-bf16": "#b5b5b5", "optimum": "#1f77b4", "optimum-intel": "#2ca02c",
               "optimum-intel-bf16": "#98df8a", "ov-genai": "#9467bd", "ov-genai-bf16": "#c5b0d5",
               "sdcpp": "#ff7f0e"}  # fmt: skip
    for i, size in enumerate(sizes):
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            rows = [r for r in ok if r["size"] == size]
            values = [r[key] / (2**30 if key == "peak_rss_bytes" else 1) for r in rows]
            ax.bar(
                [r["contender"] for r in rows], values, color=[colours.get(r["contender"], "#d62728") for r in rows]
            )
            ax.tick_params(axis="x", labelsize=7)
            plt.setp(ax.get_xticklabels(), rotation=55, ha="right", rotation_mode="anchor")
            ax.set_title(f"{size}x{size}: {label}", fontsize=10)
            for k, v in enumerate(values):
                ax.text(k, v, f"{v:.1f}" if v >= 10 else f"{v:.2f}", ha="center", va="bottom", fontsize=6)
    m = report["machine"]
    fig.suptitle(f"{report['settings']['arch']} (random weights), {report['settings']['steps']} steps, "
                 f"{m['cpu']} x{report['settings']['threads']} threads", fontsize=11)  # fmt: skip
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def measure_ceiling() -> dict:
    """numpy's SGEMM GFLOP/s in a fresh process with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (the workplace
    sets them for old OpenBLAS builds; they slow a current one), and the BLAS kernel it then ran (threadpoolctl)."""
    code = ("import json; from edgediff.runtime.bench import sgemm_gflops; info = []\n"
            "try:\n from threadpoolctl import threadpool_info; info = threadpool_info()\nexcept ImportError: pass\n"
            "blas = [f\"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}\"\n"
            "        for i in info if i.get('user_api') == 'blas']\n"
            "print(json.dumps({'sgemm_gflops': sgemm_gflops(repeats=7),\n"
            "                  'blas': ', '.join(blas) or '?'}))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-300:]}


def unet_flops(folder: Path, sizes: list[int], guidance: float) -> dict:
    """{size: FLOPs of one UNet call} counted on the folder's ONNX graph (None where onnx is missing)."""
    try:
        from edgediff.runtime.flops import count_flops
        from edgediff.runtime.model_folder import ModelFolder
    except ImportError:
        return {}
    mf = ModelFolder.open(folder)
    out = {}
    for size in sizes:
        shapes = mf.spec("unet").input_shapes(mf.symbols(1, size, size), guidance=guidance > 1)
        out[str(size)] = count_flops(mf.component_path("unet"), {k: list(v) for k, v in shapes.items()})["total"]
    return out


def ensure_static_int8(folder: Path, variants: dict) -> None:
    """Make the static int8 UNets the int8 configurations load, as a user would (`edgediff optimize --int8 static`,
    calibrated at 256 px), unless up-to-date ones are there."""
    wanted = {o.get("engine", "onnxruntime") for o in variants.values() if o.get("cpu_variant") == "int8"}
    if not wanted:
        return
    engines = []
    from edgediff.engines.ort_optimize import find_variant, recorded_key

    unet = folder / "unet" / "model.onnx"
    if "onnxruntime" in wanted and not (find_variant(unet, "unet", "int8") and
                                        recorded_key(unet, "unet", "int8").get("int8_mode") == "static"):  # fmt: skip
        engines.append("onnxruntime")
    if "openvino" in wanted:
        from edgediff.engines.openvino import int8_variant

        if int8_variant(unet, "unet") is None:
            engines.append("openvino")
    if engines:
        cmd = [str(Path(sys.executable).with_name("edgediff")), "optimize", str(folder), "--int8", "static",
               "--calibration-size", "256"] + [a for e in engines for a in ("--engine", e)]  # fmt: skip
        subprocess.run(cmd, check=True)


DEFAULT_VARIANTS = {  # issue 16's edgediff configurations: the default (ONNX Runtime f32) and the fast modes
    "edgediff": {},
    "ov-f32": {"engine": "openvino"},
    "ov-bf16": {"engine": "openvino", "precision": "bf16"},
    "ort-int8": {"cpu_variant": "int8"},
    "ov-int8": {"engine": "openvino", "cpu_variant": "int8"},
    "ov-int8-bf16": {"engine": "openvino", "cpu_variant": "int8", "precision": "bf16"},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="edgediff vs diffusers, optimum, OpenVINO and sd.cpp on this machine.")
    p.add_argument("--arch", default="sd15", choices=("sd15", "sd21-base", "sdxl-base"))
    p.add_argument("--mode", default="standard", choices=("standard", "turbo", "lcm"))
    p.add_argument("--decoders", nargs="+", default=["full"], choices=("full", "tiny"))
    p.add_argument("--no-optimize", action="store_true", help="run edgediff without `edgediff optimize`'s variant")
    p.add_argument("--no-prepack", action="store_true", help="optimum's sessions without weight prepacking")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--edgediff", dest="variants", action="append", metavar="LABEL=JSON",
                   help="an edgediff configuration to run: a label and the JSON of its Pipeline.load options, "
                        'e.g. \'lowmem={"low_memory": true}\' (repeatable; default: DEFAULT_VARIANTS)')  # fmt: skip
    p.add_argument("--edgediff-options", default="{}", help=argparse.SUPPRESS)  # worker-only
    p.add_argument("--label", default="", help="suffix of the results files")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming the last unfinished run")
    p.add_argument("--timeout", type=float, default=None, help="seconds one contender may take (default: no limit)")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="only re-render the .md and .png of an earlier run's JSON (no benchmarking)",
    )
    p.add_argument("--root", type=Path, default=None, help="where full_size_models.py keeps the models")
    p.add_argument("--model", nargs=2, metavar=("DIFFUSERS_DIR", "EDGEDIFF_DIR"),
                   help="compare on these folders instead of the random-weight --arch model")  # fmt: skip
    p.add_argument("--setup-peers", nargs="*", metavar="VENV", choices=sorted(PEER_VENVS),
                   help=f"(re)create the peers' venvs ({', '.join(PEER_VENVS)}; default all) under {PEER_VENV_ROOT} "
                        "with the pinned versions, then exit")  # fmt: skip
    # worker-only
    p.add_argument("--worker", choices=CONTENDERS)
    p.add_argument("--decoder", default="full")
    p.add_argument("--tiny-vae", type=Path, default=None)
    p.add_argument("--size", type=int)
    p.add_argument("--source")
    p.add_argument("--folder")
    p.add_argument("--tmp")
    p.add_argument("--spawn-time", type=float)
    p.add_argument("--ov-folder")
    p.add_argument("--sigmas", default="")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.setup_peers is not None:
        failed = []
        for name in args.setup_peers or PEER_VENVS:
            python, why = setup_peer_venv(name, force=True)
            print(f"{name}: {python or why}")
            failed += [name] if python is None else []
        raise SystemExit(1 if failed else 0)
    sys.path.insert(0, str(HERE))
    from full_size_models import DEFAULT_ROOT, ensure
    from provenance import command_and_date

    if args.report:
        report = json.loads(args.report.read_text())
        if "largest_component_bytes" not in report["settings"]:
            folder = Path(args.model[1]) if args.model else (args.root or DEFAULT_ROOT) / f"{args.arch}-onnx"
            report["settings"]["largest_component_bytes"] = largest_component_bytes(folder)
        _write(args.report.with_suffix(""), report)
        return

    import shutil

    from edgediff.runtime.bench import machine_info

    # label -> Pipeline.load options; parsed here so a typo fails before hours of benchmarking
    variants = ({label: json.loads(options) for label, options in (v.split("=", 1) for v in args.variants)}
                if args.variants else dict(DEFAULT_VARIANTS))  # fmt: skip
    if args.mode != "standard":  # the shapes of the few-step models' calls
        args.steps, args.guidance = (1, 0.0) if args.mode == "turbo" else (4, 1.0)
    root = args.root or DEFAULT_ROOT
    args.tiny_vae = root / "taesd-diffusers"
    source, folder = args.model or ensure(args.arch, root, tiny_vae="tiny" in args.decoders)
    if "edgediff" in args.contenders and not args.no_optimize:  # as users run it on a CPU: after `edgediff optimize`
        from edgediff.engines.ort_optimize import optimize_folder

        optimize_folder(folder)  # skipped when up to date
    if "edgediff" in args.contenders:
        ensure_static_int8(Path(folder), variants)
    runs = [(size, name, label + (" tiny" if decoder == "tiny" else ""), options, decoder)
            for size in args.sizes for decoder in args.decoders for name in args.contenders
            for label, options in (variants.items() if name == "edgediff" else [(name, {})])
            if decoder == "full" or name in TINY_DECODER_CONTENDERS]  # fmt: skip
    results = []
    # A checkpoint: each contender's result and first image are kept in the run folder as it finishes; the same
    # command started again (after a crash or a session's end) resumes after the last finished one.
    tmp = str(root / f"peer-run-{args.arch}{args.label}")
    checkpoint = Path(tmp) / "partial.json"
    signature = {"sizes": args.sizes, "steps": args.steps, "guidance": args.guidance, "mode": args.mode,
                 "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "variants": variants}  # fmt: skip
    done: dict = {}
    if args.fresh:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(tmp).mkdir(parents=True, exist_ok=True)
    if checkpoint.is_file():
        saved = json.loads(checkpoint.read_text())
        if saved.get("signature") == signature:
            done = {(r["size"], r["contender"]): r for r in saved["results"]}
    ceiling = (done.pop(("ceiling", "numpy"), None) or {}).get("ceiling") or measure_ceiling()
    flops = unet_flops(Path(folder), args.sizes, args.guidance) if (Path(folder) / "unet").is_dir() else {}
    for size, name, label, options, decoder in runs:
        if (size, label) in done and "error" not in done[size, label]:
            results.append(done[size, label])
            continue
        print(f"{label} {size}x{size} ...", file=sys.stderr, flush=True)
        r = _run_contender(name, size, options, args, source, folder, tmp, decoder)
        r.update(contender=label, options=options, worker=name, decoder=decoder)
        # every contender's first image (seed 0), kept under its label to compare with the others'
        image = Path(tmp) / f"image-{label}-{size}.png"
        if (Path(tmp) / f"{name}-{size}.png").is_file():
            (Path(tmp) / f"{name}-{size}.png").rename(image)
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
        keep = [*results, {"size": "ceiling", "contender": "numpy", "ceiling": ceiling}]
        checkpoint.write_text(json.dumps({"signature": signature, "results": keep}) + "\n")
    for r in results:  # once all have run, so the references exist whatever the order of --contenders
        size, label, suffix = r["size"], r["contender"], " tiny" if r["decoder"] == "tiny" else ""
        image = Path(tmp) / f"image-{label}-{size}.png"
        r["image_vs_diffusers"] = image_difference(Path(tmp) / f"image-diffusers{suffix}-{size}.png", image)
        if r["worker"] == "edgediff" and label != f"edgediff{suffix}":
            r["image_vs_edgediff"] = image_difference(Path(tmp) / f"image-edgediff{suffix}-{size}.png", image)
    report = {
        "machine": machine_info(),
        "settings": {
            "arch": "given folders" if args.model else args.arch,
            "steps": args.steps,
            "guidance": args.guidance,
            "threads": args.threads,
            "warmup": args.warmup,
            "runs": args.runs,
            "scheduler": {"standard": "DPM++ 2M", "turbo": "Euler ancestral, trailing", "lcm": "LCM"}[args.mode],
            "mode": args.mode,
            "decoders": args.decoders,
            "optimized": not args.no_optimize,
            "peer_prepacking": not args.no_prepack,
            "prompt": PROMPT,
            "edgediff_variants": variants,
            **command_and_date(__file__, argv),
            "largest_component_bytes": largest_component_bytes(folder),
        },
        "ceiling": ceiling,
        "unet_flops": flops,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    _write(RESULTS / f"peers_{args.arch}{args.label}", report)


def largest_component_bytes(folder: Path) -> int | None:
    """Bytes of the largest exported component (its model.onnx and external data): the UNet; None without the
    folder (a run of peers only, on a diffusers folder with no edgediff export)."""
    from edgediff.runtime.model_folder import ModelFolder

    if not (Path(folder) / "model_index.json").is_file():
        return None
    mf = ModelFolder.open(folder)
    return max(mf.component_bytes(c) for c in mf.required_components)


def _write(stem: Path, report: dict) -> None:
    """The derived tables (ratios, targets) are computed here from the results, then written."""
    report["ratios"] = summarise(report["results"])
    report["targets"] = judge_targets(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(stem.with_suffix(".md"), report)
    draw_chart(stem.with_suffix(".png"), report)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
