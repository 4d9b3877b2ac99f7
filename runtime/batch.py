"""Several images in one run of ``edgediff generate`` (issue 18): the seeds, the prompt file's lines, and the file
each image goes to. Everything here is checked before the model loads, so a bad run fails in a second and writes
nothing.

- **Seeds as people use them**: no ``--seed`` or ``--seed -1`` picks a random one (printed and recorded); image i
  of a run gets seed + i (AUTOMATIC1111's rule), or the i-th of ``--seeds``.
- **File names from a pattern**: ``-o "out/{i:03d}-{seed}.png"`` with the fields ``{i}`` (the image's number in the
  run, from 0), ``{seed}``, ``{prompt}`` (a short slug of the prompt) and ``{line}`` (the prompt file's line). A
  plain file name (no field) for several images gets ``-{i:03d}`` before its extension, so the default never
  writes two images of a run to one file; a pattern whose fields still would is refused, naming both images.
- **Prompt files** (``--from-file``): one prompt per line, ``#`` comments and blank lines skipped. A line may set
  its own options in AUTOMATIC1111's "prompts from file" form (``--prompt "a cat" --negative_prompt "blurry"
  --steps 20 --cfg_scale 7 --seed 5 --width 512 --height 512 --sampler_name "DPM++ 2M" --n_iter 2``); a file
  ending in ``.jsonl`` holds one JSON object per line with the CLI's names (``prompt``, ``negative_prompt``,
  ``steps``, ``guidance``, ``width``, ``height``, ``seed``, ``scheduler``, ``num_images``). Bad lines are refused
  with their line number.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, ParametersError
from .rng import check_seed

PATTERN_FIELDS = ("i", "seed", "prompt", "line")
SLUG_LENGTH = 40
_JSON_KEYS = {"prompt": str, "negative_prompt": str, "steps": int, "guidance": float, "width": int, "height": int,
              "seed": int, "scheduler": str, "num_images": int}  # fmt: skip
_A1111_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "cfg_scale": "guidance",
               "width": "width", "height": "height", "seed": "seed", "sampler_name": "sampler", "n_iter": "num_images",
               "batch_size": "num_images"}  # fmt: skip


@dataclass
class Job:
    """One prompt of a run: its options over the command line's, how many images, their seeds and files."""

    prompt: str | None
    options: dict[str, Any] = field(default_factory=dict)  # CLI names: negative_prompt, steps, guidance, ...
    line: int | None = None  # the prompt file's line
    count: int = 1
    seeds: list[int] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def random_seed() -> int:
    return secrets.randbits(32)


def seeds_for(seed: int | None, seeds: list[int] | None, count: int | None) -> list[int]:
    """The seeds of ``count`` images: ``seeds`` as given (their count must agree with ``count``), else ``seed`` + i,
    a random start when ``seed`` is None or -1."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise InvalidArgumentError(f"--num-images must be 1 or more, got {count!r}")
    if seeds:
        if count is not None and count != len(seeds):
            raise InvalidArgumentError(f"--seeds gives {len(seeds)} seeds but --num-images is {count}; give as many "
                                       "seeds as images, or leave --num-images out")  # fmt: skip
        return [check_seed(s) for s in seeds]
    start = random_seed() if seed is None or seed == -1 else check_seed(seed)
    return [(start + i) % 2**32 for i in range(count or 1)]


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgumentError(
            f"--seeds takes whole numbers separated by commas (e.g. 1,2,3), got {text!r}"
        ) from None
    if not values:
        raise InvalidArgumentError("--seeds is empty; give whole numbers separated by commas (e.g. 1,2,3)")
    return values


def slug(prompt: str | None) -> str:
    """A short file-name-safe form of a prompt: lower-case words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", (prompt or "").lower())
    text = "-".join(words)[:SLUG_LENGTH].strip("-")
    return text or "image"


def _fields(pattern: str) -> set[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as e:
        raise InvalidArgumentError(
            f"-o {pattern!r} is not a valid pattern ({e}); fields are written {{i}}, "
            f"{{seed}}, {{prompt}}, {{line}}, e.g. out/{{i:03d}}-{{seed}}.png"
        ) from None
    unknown = sorted(n for n in names if n.split(".")[0].split("[")[0] not in PATTERN_FIELDS)
    if unknown or "" in names:
        raise InvalidArgumentError(f"-o {pattern!r}: unknown field {unknown[0] if unknown else '{}'}; the fields are "
                                   + ", ".join("{" + f + "}" for f in PATTERN_FIELDS))  # fmt: skip
    return names


def assign_files(pattern: str, jobs: list[Job]) -> None:
    """Each image's file from ``pattern``, checked: writable, a known extension, no two images on one file."""
    from .files import check_output_path
    from .image import image_format

    names = _fields(pattern)
    images = [(job, k) for job in jobs for k in range(job.count)]
    if len(images) > 1 and not names:  # a plain file name for several images: number them
        root, ext = os.path.splitext(pattern)
        pattern = f"{root}-{{i:03d}}{ext}"
    seen: dict[Path, int] = {}
    for i, (job, k) in enumerate(images):
        try:
            name = Path(pattern.format(i=i, seed=job.seeds[k], prompt=slug(job.prompt), line=job.line or 0))
        except (ValueError, KeyError, IndexError) as e:
            raise InvalidArgumentError(
                f"-o {pattern!r} cannot be filled in ({e}); e.g. out/{{i:03d}}-{{seed}}.png"
            ) from None
        check_output_path(name)  # a folder, no name, an unwritable place: named before the format
        image_format(name)
        if name in seen:
            raise InvalidArgumentError(f"-o {pattern!r} writes images {seen[name]} and {i} to the same file {name}; "
                                       "add {i} to the pattern")  # fmt: skip
        seen[name] = i
        job.files.append(name)


def read_prompt_file(path: str | os.PathLike) -> list[Job]:
    """The jobs of a prompt file (see the module docstring); every problem names the file and the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"--from-file {p}: no such file") from None
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"--from-file {p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                                   "UTF-8") from None  # fmt: skip
    except OSError as e:
        raise InvalidArgumentError(f"--from-file {p}: cannot be read ({e.strerror or e})") from None
    jobs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--from-file {p}, line {number}"
        if p.suffix.lower() == ".jsonl":
            options = _json_line(line, where)
        elif line.startswith("--"):
            options = _a1111_line(line, where)
        else:
            options = {"prompt": line}
        prompt = options.pop("prompt", None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgumentError(f'{where}: no prompt (a line is a prompt, or sets --prompt "...")')
        jobs.append(Job(prompt, options, number))
    if not jobs:
        raise InvalidArgumentError(f"--from-file {p} holds no prompt (only blank or # comment lines); put one prompt "
                                   "per line")  # fmt: skip
    return jobs


def _json_line(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise InvalidArgumentError(f"{where}: not a JSON object ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"{where}: not a JSON object")
    unknown = sorted(set(obj) - set(_JSON_KEYS))
    if unknown:
        raise InvalidArgumentError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(_JSON_KEYS)}")
    out = {}
    for key, value in obj.items():
        kind = _JSON_KEYS[key]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if isinstance(value, bool) or not ok:
            raise InvalidArgumentError(f"{where}: {key} must be {'a string' if kind is str else 'a number'}, got "
                                       f"{value!r}")  # fmt: skip
        out[key] = value
    return out


def _a1111_line(line: str, where: str) -> dict:
    try:
        tokens = shlex.split(line)
    except ValueError as e:
        raise InvalidArgumentError(f'{where}: {e} (quote values with spaces: --prompt "a red cat")') from None
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        key = flag[2:] if flag.startswith("--") else None
        if key not in _A1111_KEYS:
            raise InvalidArgumentError(f"{where}: unknown option {flag!r}; the options are "
                                       + ", ".join(f"--{k}" for k in _A1111_KEYS))  # fmt: skip
        if i + 1 >= len(tokens):
            raise InvalidArgumentError(f"{where}: {flag} needs a value")
        name = _A1111_KEYS[key]
        try:
            value: Any = _JSON_KEYS.get(name, str)(tokens[i + 1])  # the JSON lines' types (A1111's sampler: str)
        except ValueError:
            raise InvalidArgumentError(f"{where}: {flag} takes a number, got {tokens[i + 1]!r}") from None
        out[name] = value
        i += 2
    if "sampler" in out:  # A1111's sampler names, as the server maps them
        from .parameters import from_a1111

        try:
            out["scheduler"], options = from_a1111(out.pop("sampler"), None)
        except ParametersError as e:
            raise InvalidArgumentError(f"{where}: {e}") from None
        if options:
            out["scheduler_options"] = options
    return out
