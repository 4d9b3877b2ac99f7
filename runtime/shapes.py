"""A procedural text-to-image world ("shapes") and its judge, in numpy + Pillow only (no torch).

Every image is one filled, axis-aligned shape of one colour on a solid background of another.

Palette (sRGB, pairwise distance >= 90, so noise, blur and slight shifts cannot confuse them)::

    red (220, 30, 30)      green (30, 170, 60)    blue (30, 70, 220)      yellow (245, 220, 40)
    purple (140, 50, 170)  orange (250, 130, 20)  white (245, 245, 245)   black (20, 20, 20)

Shapes: circle, square, triangle (apex up), cross (a plus whose arms are 1/3 of its side), diamond
(a square turned 45 degrees). Each fills a square box of side ``round(size/4)`` for ``small``
(16 px at 64) or ``round(size*7/16)`` for ``large`` (28 px at 64; not 1/2, so a large shape at an
edge position keeps a 2 px margin and the border stays background). Positions give the box centre:
left (W/4, H/2), right (3W/4, H/2), top (W/2, H/4), bottom (W/2, 3H/4), centre (W/2, H/2).
Drawn with Pillow, no anti-aliasing.

Captions (``caption(scene, rng)``), ``{pos}`` being "on the left", "on the right", "at the top",
"at the bottom" or "in the centre"; the default size is ``large`` and the default position
``centre``, and a template that omits size or position is only used for scenes with the default::

    a {size} {colour} {shape} {pos} on a {bg} background
    {size} {colour} {shape} {pos}, {bg} background
    a {size} {colour} {shape} {pos} of a {bg} image
    {bg} background with a {size} {colour} {shape} {pos}
    a {bg} image showing a {size} {colour} {shape} {pos}
    a picture of a {size} {colour} {shape} {pos}, the background is {bg}
    a {colour} {shape} {pos} on a {bg} background          (size = large)
    a {size} {colour} {shape} on a {bg} background         (position = centre)
    a {colour} {shape} on a {bg} background                (defaults)
    {colour} {shape}, {bg} background                      (defaults)

("a" becomes "an" before a vowel.) ``parse_prompt`` reads these and simple user prompts back.

Phrasings: those templates are caption recipe "v1" (``PHRASINGS``; shapes-v1 was trained on them, and every
function keeps them by default). Recipe "v2" (opt-in: ``caption(..., phrasing="v2")``, ``train_shapes --phrasing
v2``) also uses "{bg} backdrop", "in the center"/"in the middle", "to the left"/"near the top"/"... of the image",
little/big, disc/plus/rhombus, "the" or no article, position-first and comma-list orders, "on {bg}", "against",
"the backdrop is {bg}" and prefixes ("a drawing of ..."). Held-out phrasings (``held_out_phrasing``, ``HELD_OUT_*``)
are wordings no recipe trains on: ten other templates (shape before colour, "coloured"/"colored", "please draw",
"over {bg}", "the {shape} is {size} and {colour}", ...) filled with the v2 words plus a few unseen ones (tiny/huge,
disk, "plus sign", canvas, "one"/"a single", centred/centered, "up top", "on the left-hand side"); no held-out
prompt is a possible v2 caption (``all_captions``, ``all_held_out_phrasings``).

Held-out split: with i_c, i_s, i_b the indices in COLOURS, SHAPES, COLOURS, a (colour, shape,
background) combination is held out iff ``(i_c + i_s + 2*i_b) % 8 == 0`` -- 35 of the 280 valid
combinations (12.5%). It covers every colour, shape and background; every (colour, shape),
(colour, background) and (shape, background) pair still occurs in the train split, so the held-out
split measures compositional generalisation.

The judge, ``analyse(image)``, is hand-written geometry, no learned model (images over 128 px are
box-downsampled to 128 first): background = palette colour nearest the median border pixel;
object = the largest 4-connected region of 3x3-smoothed pixels farther from the background than
half the object-background distance; colour = palette colour nearest the median of its purest
quarter; position = nearest position centre to its centroid; size = small if its bounding box
spans < 0.34 of the side; shape = least-squares match of its soft occupancy map (0 = background
colour, 1 = object colour) against each ideal shape placed to the object's centroid and spread,
anti-aliased and blurred by 0, 0.7, 1.2 or 2 px (so blur from a generator does not fool it).
Colour, shape, position and size are "none" when there is no object (< 0.4% of the pixels).
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
DEFAULT_SIZE, DEFAULT_POSITION = "large", "centre"
ATTRIBUTES = ("colour", "background", "shape", "position", "size")
PHRASINGS = ("v1", "v2")  # caption recipes; see "phrasings" below
DEFAULT_PHRASING = "v1"  # shapes-v1 was trained with it

SIZE_FRACTION = {"small": 1 / 4, "large": 7 / 16}
POSITION_CENTRE = {  # (x, y) as fractions of (W, H)
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_PAL = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str = DEFAULT_SIZE
    position: str = DEFAULT_POSITION

    def __post_init__(self):
        for value, allowed in (
            (self.shape, SHAPES),
            (self.colour, COLOURS),
            (self.background, COLOURS),
            (self.size, SIZES),
            (self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        if self.colour == self.background:
            raise ValueError("the shape's colour must differ from the background")


# ---------------------------------------------------------------- held-out split


def _held_out_combo(colour: str, shape: str, background: str) -> bool:
    return (COLOURS.index(colour) + SHAPES.index(shape) + 2 * COLOURS.index(background)) % 8 == 0


ALL_COMBOS = tuple((c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c)
HELD_OUT = frozenset(combo for combo in ALL_COMBOS if _held_out_combo(*combo))
_SPLIT_COMBOS = {
    "train": tuple(c for c in ALL_COMBOS if c not in HELD_OUT),
    "held_out": tuple(c for c in ALL_COMBOS if c in HELD_OUT),
    "all": ALL_COMBOS,
}


def is_held_out(scene: Scene) -> bool:
    return (scene.colour, scene.shape, scene.background) in HELD_OUT


def _draw_scenes(rng: np.random.Generator, n: int, split: str) -> list[Scene]:
    if split not in _SPLIT_COMBOS:
        raise ValueError(f"split must be one of {tuple(_SPLIT_COMBOS)}, got {split!r}")
    combos = _SPLIT_COMBOS[split]
    ci = rng.integers(len(combos), size=n)
    si, pi = rng.integers(len(SIZES), size=n), rng.integers(len(POSITIONS), size=n)
    return [Scene(combos[a][1], combos[a][0], combos[a][2], SIZES[b], POSITIONS[c]) for a, b, c in zip(ci, si, pi)]


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """``n`` scenes drawn uniformly (combination, size, position) from ``split``; same seed, same list."""
    return _draw_scenes(np.random.default_rng(seed), n, split)


# ---------------------------------------------------------------- rendering


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box  # inclusive pixel coordinates
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        tx, ty = max(0.5, (x1 - x0 + 1) / 6), max(0.5, (y1 - y0 + 1) / 6)  # half arm widths
        draw.rectangle([round(x0), round(cy - ty + 0.5), round(x1), round(cy + ty - 0.5)], fill=fill)
        draw.rectangle([round(cx - tx + 0.5), round(y0), round(cx + tx - 0.5), round(y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a uint8 [size, size, 3] image."""
    img = Image.new("RGB", (size, size), PALETTE[scene.background])
    side = max(2, round(size * SIZE_FRACTION[scene.size]))
    fx, fy = POSITION_CENTRE[scene.position]
    x0, y0 = round(fx * size - side / 2), round(fy * size - side / 2)
    _draw_shape(ImageDraw.Draw(img), scene.shape, (x0, y0, x0 + side - 1, y0 + side - 1), PALETTE[scene.colour])
    return np.asarray(img, dtype=np.uint8).copy()


# ---------------------------------------------------------------- captions and prompts

_TEMPLATES = (  # (template, attributes it omits: used only when those have their default value)
    ("a {size} {colour} {shape} {pos} on a {bg} background", ()),
    ("{size} {colour} {shape} {pos}, {bg} background", ()),
    ("a {size} {colour} {shape} {pos} of a {bg} image", ()),
    ("{bg} background with a {size} {colour} {shape} {pos}", ()),
    ("a {bg} image showing a {size} {colour} {shape} {pos}", ()),
    ("a picture of a {size} {colour} {shape} {pos}, the background is {bg}", ()),
    ("a {colour} {shape} {pos} on a {bg} background", ("size",)),
    ("a {size} {colour} {shape} on a {bg} background", ("position",)),
    ("a {colour} {shape} on a {bg} background", ("size", "position")),
    ("{colour} {shape}, {bg} background", ("size", "position")),
)
TEMPLATES = tuple(t for t, _ in _TEMPLATES)


def caption(scene: Scene, rng: np.random.Generator, phrasing: str = DEFAULT_PHRASING) -> str:
    """A caption for ``scene``, its wording drawn from ``rng`` (``phrasing``: "v1", the templates above, or
    "v2", those and their variants; see PHRASINGS)."""
    if phrasing != "v1":
        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
        return _phrase(scene, rng, _V2_TEMPLATES, V2_WORDS)
    usable = _usable(_TEMPLATES, scene)
    return _fill(usable[int(rng.integers(len(usable)))], _v1_values(scene))


def _v1_values(scene: Scene) -> dict[str, str]:
    return dict(size=scene.size, colour=scene.colour, shape=scene.shape, pos=POSITION_PHRASE[scene.position],
                bg=scene.background)  # fmt: skip


# ---- phrasings. "v1" is what shapes-v1 was trained on (the templates above, exactly as before: same words, same
# draws from the rng). "v2" (opt-in: ``train_shapes --phrasing v2``) adds the variants people type: synonyms,
# American/British spelling, articles, word order, extra words. HELD_OUT_* are phrasings no training recipe uses, to
# measure robustness to wordings never seen (``held_out_phrasing``); they reuse the training words in new
# structures and add a few unseen words, and no held-out prompt is ever a possible v2 caption (tested).
V2_WORDS: dict[str, Any] = {
    "size": {"small": ["small", "little"], "large": ["large", "big"]},
    "shape": {"circle": ["circle", "disc"], "square": ["square"], "triangle": ["triangle"], "cross": ["cross", "plus"],
              "diamond": ["diamond", "rhombus"]},
    "pos": {"left": ["on the left", "to the left", "on the left side"],
            "right": ["on the right", "to the right", "on the right side"],
            "top": ["at the top", "near the top", "at the top of the image"],
            "bottom": ["at the bottom", "near the bottom", "at the bottom of the image"],
            "centre": ["in the centre", "in the center", "in the middle"]},
    "bgn": ["background", "backdrop"],
    "art": ["a", "the", ""],
    "prefix": ["a picture of", "an image of", "a drawing of", "a render of"],
}  # fmt: skip
_V2_TEMPLATES = tuple((t.replace("{bg} background", "{bg} {bgn}"), omits) for t, omits in _TEMPLATES) + (
    ("{art} {size} {colour} {shape} {pos} against a {bg} {bgn}", ()),
    ("{art} {size} {colour} {shape} {pos} on {bg}", ()),
    ("{bg} {bgn}, {art} {size} {colour} {shape} {pos}", ()),
    ("{pos}, {art} {size} {colour} {shape} on a {bg} {bgn}", ()),
    ("{art} {colour} {shape}, {size}, {pos}, {bg} {bgn}", ()),
    ("{prefix} a {size} {colour} {shape} {pos} on a {bg} {bgn}", ()),
    ("{art} {size} {colour} {shape} {pos}, the {bgn} is {bg}", ()),
    ("{art} {colour} {shape} {pos} on {bg}", ("size",)),
    ("{art} {size} {colour} {shape} on {bg}", ("position",)),
    ("{art} {colour} {shape} on a {bg} {bgn}", ("size", "position")),
    ("{colour} {shape} on {bg}", ("size", "position")),
)
# Held-out phrasings: the v2 words plus these, in structures no training template has.
_HELD_OUT_EXTRA_WORDS: dict[str, Any] = {
    "size": {"small": ["tiny"], "large": ["huge"]},
    "shape": {"circle": ["disk"], "cross": ["plus sign"]},
    "pos": {"left": ["at the left", "on the left-hand side"], "right": ["at the right", "on the right-hand side"],
            "top": ["up top", "along the top"], "bottom": ["down at the bottom", "along the bottom"],
            "centre": ["centred", "centered", "in the very middle"]},
    "bgn": ["canvas"],
    "art": ["one", "a single"],
    "prefix": ["please draw", "generate", "show me", "make"],
    "coloured": ["coloured", "colored"],
}  # fmt: skip
_HELD_OUT_TEMPLATES = (
    ("{prefix} {art} {size} {colour} {shape} {pos} on a {bg} {bgn}", ()),
    ("{art} {shape} in {colour}, {size}, {pos}, on a {bg} {bgn}", ()),
    ("{art} {size} {shape} {coloured} {colour} {pos}, {bg} {bgn}", ()),
    ("{bg} {bgn} and {art} {size} {colour} {shape} {pos}", ()),
    ("the {bgn} is {bg} and the {shape} is {size} and {colour}, {pos}", ()),
    ("{size} {colour} {shape} {pos} with a {bg} {bgn}.", ()),
    ("{art} {size} {colour} {shape} {pos} over {bg}", ()),
    ("{colour} {shape} on {bg}, {size}, {pos}", ()),
    ("{art} {colour} {shape} sitting {pos} of a {bg} {bgn}", ("size",)),
    ("{prefix} {art} {colour} {shape} against {bg}", ("size", "position")),
)
HELD_OUT_TEMPLATES = tuple(t for t, _ in _HELD_OUT_TEMPLATES)


def _merge_words(a: dict, b: dict) -> dict:
    out = {}
    for k in a.keys() | b.keys():
        x, y = a.get(k, [] if isinstance(b.get(k), list) else {}), b.get(k, [] if isinstance(a.get(k), list) else {})
        out[k] = x + y if isinstance(x, list) else {v: x.get(v, []) + y.get(v, []) for v in x.keys() | y.keys()}
    return out


# prefixes only from the held-out list: with a training prefix the first template would be a v2 caption
HELD_OUT_WORDS = _merge_words(V2_WORDS, _HELD_OUT_EXTRA_WORDS) | {"prefix": _HELD_OUT_EXTRA_WORDS["prefix"]}


def _slot_values(scene: Scene, words: dict, slot: str) -> list[str]:
    if slot in ("colour", "bg"):
        return [scene.colour if slot == "colour" else scene.background]
    table = words[slot]
    if isinstance(table, list):
        return table
    value = {"size": scene.size, "shape": scene.shape, "pos": scene.position}[slot]
    return table.get(value) or [value]


def _usable(templates, scene: Scene) -> list[str]:
    return [
        t
        for t, omits in templates
        if ("size" not in omits or scene.size == DEFAULT_SIZE)
        and ("position" not in omits or scene.position == DEFAULT_POSITION)
    ]


def _fill(template: str, values: dict[str, str]) -> str:
    text = re.sub(r"\s+", " ", template.format(**values)).strip().replace(" ,", ",")
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _slots(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _phrase(scene: Scene, rng: np.random.Generator, templates, words: dict) -> str:
    usable = _usable(templates, scene)
    template = usable[int(rng.integers(len(usable)))]
    values = {}
    for slot in _slots(template):
        options = _slot_values(scene, words, slot)
        values[slot] = options[int(rng.integers(len(options)))]
    return _fill(template, values)


def _all_phrases(scene: Scene, templates, words: dict) -> set[str]:
    out = set()
    for template in _usable(templates, scene):
        slots = _slots(template)
        for combo in itertools.product(*(_slot_values(scene, words, s) for s in slots)):
            out.add(_fill(template, dict(zip(slots, combo))))
    return out


def all_captions(scene: Scene, phrasing: str = DEFAULT_PHRASING) -> set[str]:
    """Every caption ``caption(scene, rng, phrasing)`` can give."""
    if phrasing == "v1":
        return {_fill(t, _v1_values(scene)) for t in _usable(_TEMPLATES, scene)}
    return _all_phrases(scene, _V2_TEMPLATES, V2_WORDS)


def all_held_out_phrasings(scene: Scene) -> set[str]:
    """Every prompt ``held_out_phrasing(scene, rng)`` can give."""
    return _all_phrases(scene, _HELD_OUT_TEMPLATES, HELD_OUT_WORDS)


def held_out_phrasing(scene: Scene, rng: np.random.Generator) -> str:
    """A prompt for ``scene`` worded as no training recipe words it (held-out template, words from the training
    set and a few never trained on)."""
    return _phrase(scene, rng, _HELD_OUT_TEMPLATES, HELD_OUT_WORDS)


def held_out_template(scene: Scene, prompt: str) -> int | None:
    """The index in HELD_OUT_TEMPLATES of the template ``prompt`` (a held-out phrasing of ``scene``) was made from."""
    for i, entry in enumerate(_HELD_OUT_TEMPLATES):
        if prompt in _all_phrases(scene, [entry], HELD_OUT_WORDS):
            return i
    return None


def held_out_phrasing_prompts(n: int, seed: int, split: str = "train") -> tuple[list[Scene], list[str]]:
    """``sample_scenes(n, seed, split)`` and a held-out-phrasing prompt for each; same seed, same prompts."""
    scenes = sample_scenes(n, seed, split)
    rng = np.random.default_rng([seed, 1])
    return scenes, [held_out_phrasing(s, rng) for s in scenes]


def phrasing_words(phrasing: str = DEFAULT_PHRASING) -> set[str]:
    """The lower-case words (``[a-z]+``) a training phrasing's captions use, scene words included."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    templates, words = (_TEMPLATES, {}) if phrasing == "v1" else (_V2_TEMPLATES, V2_WORDS)
    text = " ".join([*(t for t, _ in templates), *_flatten(words.values())])
    text = re.sub(r"\{\w+\}", " ", text) + " " + " ".join((*COLOURS, *SHAPES, *SIZES, *POSITION_PHRASE.values()))
    return set(re.findall(r"[a-z]+", text.lower())) | {"an"}


def _flatten(values) -> Iterator[str]:
    for v in values:
        if isinstance(v, str):
            yield v
        else:
            yield from _flatten(v.values() if isinstance(v, dict) else v)


_SYNONYMS = {
    "center": "centre", "middle": "centre", "central": "centre", "centred": "centre", "centered": "centre",
    "big": "large", "huge": "large", "tiny": "small",
    "little": "small", "plus": "cross", "rhombus": "diamond", "violet": "purple",
    "disc": "circle", "disk": "circle", "circles": "circle", "squares": "square", "triangles": "triangle",
    "crosses": "cross", "diamonds": "diamond", "upper": "top", "lower": "bottom",
}  # fmt: skip
_BG_NOUNS = {"background", "backdrop", "image", "picture", "canvas", "bg"}


def parse_prompt(text: str) -> dict:
    """The attributes ``text`` states: {colour, background, shape, size, position}, None if unstated."""
    tokens = [_SYNONYMS.get(t, t) for t in re.findall(r"[a-z]+", text.lower())]
    out = dict.fromkeys(ATTRIBUTES)
    out["shape"] = next((t for t in tokens if t in SHAPES), None)
    out["size"] = next((t for t in tokens if t in SIZES), None)
    out["position"] = next((t for t in tokens if t in POSITIONS), None)
    colours = [i for i, t in enumerate(tokens) if t in PALETTE]

    def names_background(i: int) -> bool:
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        prev = tokens[max(0, i - 2) : i]
        return (
            nxt in _BG_NOUNS
            or prev[-1:] in (["background"], ["backdrop"], ["canvas"])
            or prev in (["background", "is"], ["backdrop", "is"], ["canvas", "is"])
        )

    def names_object(i: int) -> bool:
        return any(t in SHAPES for t in tokens[i + 1 : i + 3])

    bg = next((i for i in colours if names_background(i)), None)
    rest = [i for i in colours if i != bg]
    obj = next((i for i in rest if names_object(i)), rest[0] if rest else None)
    if bg is None:
        others = [i for i in colours if i != obj]
        on = [i for i in others if i > 0 and tokens[i - 1] in ("on", "over", "against")]
        bg = next(iter(on or others), None)
    out["colour"] = tokens[obj] if obj is not None else None
    out["background"] = tokens[bg] if bg is not None else None
    return out


# ---------------------------------------------------------------- datasets


def _make(rng: np.random.Generator, n: int, split: str, size: int, phrasing: str) -> tuple[np.ndarray, list[str]]:
    scenes = _draw_scenes(rng, n, split)
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    return images, [caption(s, rng, phrasing) for s in scenes]


def dataset(
    n: int, seed: int, split: str = "train", size: int = 64, phrasing: str = DEFAULT_PHRASING
) -> tuple[np.ndarray, list[str]]:
    """(images uint8 [n, size, size, 3], captions); the scenes are ``sample_scenes(n, seed, split)``, the same
    for every ``phrasing`` (it changes only the captions)."""
    return _make(np.random.default_rng(seed), n, split, size, phrasing)


def batches(
    batch_size: int, seed: int, split: str = "train", size: int = 64, phrasing: str = DEFAULT_PHRASING
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """An endless, deterministic stream of (images, captions) batches."""
    rng = np.random.default_rng(seed)
    while True:
        yield _make(rng, batch_size, split, size, phrasing)


# ---------------------------------------------------------------- the judge


def _nearest_colour(rgb: np.ndarray) -> str:
    return COLOURS[int(np.argmin(((_PAL - rgb) ** 2).sum(-1)))]


def _box3(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    return sum((p[i : i + h, j : j + w] for i in range(3) for j in range(3)), np.zeros_like(x)) / 9.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (label propagation with pointer jumping)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        m = np.where(mask, m, big)
        flat = np.append(m.ravel(), big)
        m = flat[flat[m]]  # pointer jumping: a label is a pixel of the same component
        if np.array_equal(m, lab):
            break
        lab = m
    counts = np.bincount(lab[mask])
    return lab == int(np.argmax(counts))


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


@cache
def _shape_moments(shape: str) -> tuple[float, float, float, float]:
    """Centroid and standard deviation of ``shape`` along x and y, as fractions of its box side."""
    n = 240
    img = Image.new("L", (n, n), 0)
    _draw_shape(ImageDraw.Draw(img), shape, (0, 0, n - 1, n - 1), 255)
    ys, xs = np.nonzero(np.asarray(img))
    return (xs.mean() + 0.5) / n, (ys.mean() + 0.5) / n, xs.std() / n, ys.std() / n


@lru_cache(maxsize=1024)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix that Gaussian-blurs a length-n signal (zero outside)."""
    r = int(np.ceil(3 * sigma))
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.where(np.abs(d) <= r, np.exp(-(d**2) / (2 * sigma**2)), 0.0)
    return (k / np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2)).sum()).astype(np.float32)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    return _blur_matrix(x.shape[0], sigma) @ x @ _blur_matrix(x.shape[1], sigma).T


_BLURS = (0.0, 0.7, 1.2, 2.0)  # blur levels the shape matcher tries on each ideal shape
_SUPERSAMPLE = 4


def _match_shape(mask: np.ndarray, occupancy: np.ndarray) -> str:
    """The shape whose ideal form -- placed to match the mask's centroid and spread, anti-aliased,
    blurred by one of _BLURS -- is nearest (least squares) to the object's soft occupancy map."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy, sx, sy = xs.mean(), ys.mean(), max(xs.std(), 0.5), max(ys.std(), 0.5)
    best, best_err = "none", np.inf
    for shape in SHAPES:
        mx, my, fx, fy = _shape_moments(shape)
        bw, bh = sx / fx, sy / fy
        x0, y0 = cx + 0.5 - mx * bw, cy + 0.5 - my * bh
        img = Image.new("L", (w * _SUPERSAMPLE, h * _SUPERSAMPLE), 0)
        box = (x0 * _SUPERSAMPLE, y0 * _SUPERSAMPLE, (x0 + bw) * _SUPERSAMPLE - 1, (y0 + bh) * _SUPERSAMPLE - 1)
        _draw_shape(ImageDraw.Draw(img), shape, box, 255)
        ideal = np.asarray(img, np.float32).reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean((1, 3)) / 255
        for sigma in _BLURS:
            err = float(((_gaussian_blur(ideal, sigma) - occupancy) ** 2).sum())
            if err < best_err:
                best, best_err = shape, err
    return best


def _to_rgb_uint8(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        if img.max(initial=0) <= 1.0:
            img = img * 255
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if max(img.shape[:2]) > 128:  # judge at <= 128 px: faster, and box-downsampling averages noise away
        s = 128 / max(img.shape[:2])
        img = np.asarray(
            Image.fromarray(img).resize(
                (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))), Image.Resampling.BOX
            )
        )
    return img


def analyse(image) -> dict:
    """What a [H, W, 3] image shows: {background, colour, shape, position, size} as vocabulary words
    ("none" for all but the background when there is no object)."""
    img = _to_rgb_uint8(image).astype(np.float32)
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    result = dict.fromkeys(ATTRIBUTES, "none") | {"background": _nearest_colour(bg_rgb)}
    smooth = _box3(img)
    dist = np.sqrt(((smooth - bg_rgb) ** 2).sum(-1))
    min_area = max(4, int(0.004 * h * w))
    rough = dist > 48
    if rough.sum() < min_area:
        return result
    fg_rgb = np.median(smooth[rough], axis=0)
    mask = dist > max(24.0, 0.5 * float(np.sqrt(((fg_rgb - bg_rgb) ** 2).sum())))
    if mask.sum() < min_area:
        return result
    mask = _largest_component(mask)
    if mask.sum() < min_area:
        return result
    # colour: the median of its purest (smoothed) pixels, the quarter farthest from the background
    far = mask & (dist >= np.percentile(dist[mask], 75))
    result["colour"] = _nearest_colour(np.median(smooth[far], axis=0))
    inner = _erode(mask)  # object colour for the occupancy map: median of its interior
    fg_rgb = np.median(img[inner if inner.sum() >= 4 else mask], axis=0)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / w, ys.mean() / h
    result["position"] = min(
        POSITIONS, key=lambda k: (POSITION_CENTRE[k][0] - cx) ** 2 + (POSITION_CENTRE[k][1] - cy) ** 2
    )
    extent = max((xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h)
    result["size"] = "small" if extent < 0.34 else "large"
    # shape: match ideal shapes against the soft occupancy (0 = background colour, 1 = object colour)
    # in a window around the object
    m = 8
    y0, y1, x0, x1 = max(0, ys.min() - m), min(h, ys.max() + m + 1), max(0, xs.min() - m), min(w, xs.max() + m + 1)
    d = fg_rgb - bg_rgb
    occupancy = np.clip((img[y0:y1, x0:x1] - bg_rgb) @ d / max(float(d @ d), 1.0), -0.5, 1.5)
    result["shape"] = _match_shape(mask[y0:y1, x0:x1], occupancy)
    return result


def score(prompts: list[str], images: list[np.ndarray]) -> dict:
    """How often the judged images show what their prompts state.

    Returns {attribute: fraction correct over the prompts that state it (None if none do)}, plus
    "all" (fraction of images right on every stated attribute), "counts" {attribute: prompts that
    state it} and "items" [{prompt, stated, analysed, correct: {attribute: bool}}].
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    items: list[dict[str, Any]] = []
    for prompt, image in zip(prompts, images):
        stated, analysed = parse_prompt(prompt), analyse(image)
        correct = {k: analysed[k] == v for k, v in stated.items() if v is not None}
        items.append({"prompt": prompt, "stated": stated, "analysed": analysed, "correct": correct})
    out = fractions(items)
    out["counts"] = {k: sum(k in i["correct"] for i in items) for k in ATTRIBUTES}
    out["items"] = items
    return out


def fractions(items: list[dict]) -> dict:
    """{attribute: fraction correct over the ``score`` items that state it (None if none do)}, plus "all"."""
    out: dict = {}
    for k in ATTRIBUTES:
        stated = [i["correct"][k] for i in items if k in i["correct"]]
        out[k] = sum(stated) / len(stated) if stated else None
    out["all"] = sum(all(i["correct"].values()) for i in items) / len(items) if items else None
    return out


# ---------------------------------------------------------------- editing: image-to-image and inpainting

EDIT_KINDS = {
    "background": "image-to-image: the prompt asks for another background colour; the object must stay",
    "colour": "inpainting over the object: the prompt asks for another object colour; the rest must stay",
}
MASK_GROW = 4  # px at 64: the inpainting mask is the object grown by this much
FAR_GROW = 8  # px beyond the mask: what lies further out is "well outside the mask"
FAR_CLOSE = 12.0  # /255: far pixels that moved at most this much on average count as unchanged


@dataclass(frozen=True)
class Edit:
    """An input picture, the prompt that edits it, and what must and must not change. In this world the prompt
    states every attribute and the VAE renders only the palette, so what stays is what the prompt restates: a
    pipeline that regenerates from the prompt alone also passes (see benchmarks/shapes_editing.py)."""

    kind: str  # an EDIT_KINDS key
    before: Scene  # what the input picture shows (besides the mark)
    after: Scene  # what the prompt asks for
    prompt: str
    image: np.ndarray  # render(before): [H, W, 3] uint8
    mask: np.ndarray | None  # inpainting: [H, W] uint8, 255 = repaint (the object grown by MASK_GROW)
    far: np.ndarray | None  # inpainting: [H, W] bool, the pixels well outside the mask, which must stay


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * px + 1))
    return np.asarray(img) > 0


def edit_cases(kind: str, n: int, seed: int, size: int = 64) -> list[Edit]:
    """``n`` edits of training-split scenes (the edited scene a training-split combination too): a new background
    colour (``kind="background"``) or a new object colour under a mask over the object (``"colour"``), the prompt
    captioning the edited scene with the training wordings."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"kind must be one of {list(EDIT_KINDS)}, got {kind!r}")
    rng = np.random.default_rng(seed)
    edits: list[Edit] = []
    field = "background" if kind == "background" else "colour"
    for before in sample_scenes(4 * n, seed=seed, split="train"):
        options = [c for c in COLOURS if c not in (before.colour, before.background)]
        after = Scene(**{**before.__dict__, field: options[int(rng.integers(len(options)))]})
        if is_held_out(after):
            continue
        image = render(before, size)
        mask = far = None
        if kind == "colour":
            grown = _grow(np.any(image != np.asarray(PALETTE[before.background], np.uint8), axis=-1), MASK_GROW)
            mask, far = grown.astype(np.uint8) * 255, ~_grow(grown, FAR_GROW)
        edits.append(Edit(kind, before, after, caption(after, rng), image, mask, far))
        if len(edits) == n:
            break
    return edits


def score_edits(edits: list[Edit], images: list) -> dict:
    """How the edited images do, per image and as shares: ``asked`` (the changed attribute reads as the prompt
    asks); ``kept`` (shape, position, size and the unchanged colour read as in the input); ``both``. For
    inpainting also ``far_diff``: the mean |output − input| in /255 over the pixels well outside the mask
    (``far_diff_mean`` and ``far_diff_max`` over the images) and ``far_close``: the share of images whose far
    pixels moved at most FAR_CLOSE. Plus ``items``."""
    if len(edits) != len(images):
        raise ValueError(f"{len(edits)} edits but {len(images)} images")
    items = []
    for e, image in zip(edits, images):
        got = analyse(image)
        pixels = _to_rgb_uint8(image)
        changed = "background" if e.kind == "background" else "colour"
        same = all(got[k] == getattr(e.before, k) for k in ATTRIBUTES if k != changed)
        asked = got[changed] == getattr(e.after, changed)
        item: dict[str, Any] = {"prompt": e.prompt, "analysed": got, "asked": asked, "kept": same}
        if e.far is not None:
            moved = np.abs(pixels.astype(np.float32) - e.image.astype(np.float32))
            item["far_diff"] = float(moved[e.far].mean())
        items.append(item)
    n = len(items)
    out: dict[str, Any] = {
        "n": n,
        "asked": sum(i["asked"] for i in items) / n,
        "kept": sum(i["kept"] for i in items) / n,
        "both": sum(i["asked"] and i["kept"] for i in items) / n,
    }
    far = [i["far_diff"] for i in items if "far_diff" in i]
    if far:
        out |= {"far_diff_mean": float(np.mean(far)), "far_diff_max": float(np.max(far)),
                "far_close": sum(d <= FAR_CLOSE for d in far) / len(far)}  # fmt: skip
    out["items"] = items
    return out
