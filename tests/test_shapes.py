"""The procedural shapes world and its judge (edgediff.runtime.shapes): numpy + Pillow, no torch."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edgediff.runtime import shapes as S


def _perturb(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a generator might do: a small blur, slight colour shifts (of the whole image and of
    the object alone), and Gaussian noise of std 20 (of 255)."""
    img = np.asarray(image).astype(np.float64)
    obj = np.abs(img - img[0, 0]).sum(-1) > 0
    img[obj] += rng.uniform(-12, 12, 3)
    img = np.asarray(
        Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(rng.uniform(0.5, 1.0))
        )
    ).astype(np.float64)
    img += rng.uniform(-12, 12, 3) + rng.normal(0.0, 20.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _truth(scene: S.Scene) -> dict:
    return {k: getattr(scene, k) for k in S.ATTRIBUTES}


# ---------------------------------------------------------------- vocabulary and scenes


def test_vocabulary_and_palette_are_separable():
    assert len(S.COLOURS) == 8 and len(S.SHAPES) >= 5 and {"circle", "square", "triangle"} <= set(S.SHAPES)
    assert S.SIZES == ("small", "large") and set(S.POSITIONS) == {"left", "right", "top", "bottom", "centre"}
    pal = np.array(list(S.PALETTE.values()), dtype=np.float64)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(pal, 2)]
    assert min(dists) >= 90


def test_scene_validates():
    with pytest.raises(ValueError):
        S.Scene("circle", "red", "red")
    with pytest.raises(ValueError):
        S.Scene("hexagon", "red", "blue")
    with pytest.raises(ValueError):
        S.Scene("circle", "red", "blue", size="huge")
    s = S.Scene("circle", "red", "blue")
    assert (s.size, s.position) == (S.DEFAULT_SIZE, S.DEFAULT_POSITION)
    with pytest.raises(AttributeError):
        s.shape = "square"  # frozen


def test_render_geometry():
    img = S.render(S.Scene("square", "red", "blue", "small", "left"))
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    ys, xs = np.nonzero((img == S.PALETTE["red"]).all(-1))
    assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (16, 16)
    assert abs(xs.mean() - 16) <= 1 and abs(ys.mean() - 32) <= 1
    assert set(map(tuple, img.reshape(-1, 3))) == {S.PALETTE["red"], S.PALETTE["blue"]}
    large = S.render(S.Scene("circle", "white", "black", "large", "top"), size=128)
    assert large.shape == (128, 128, 3)
    ys, xs = np.nonzero((large == S.PALETTE["white"]).all(-1))
    assert xs.max() - xs.min() + 1 == 56 and abs(ys.mean() - 32) <= 1
    # every shape at every position stays inside the image with a background border
    for shape, pos in itertools.product(S.SHAPES, S.POSITIONS):
        img = S.render(S.Scene(shape, "green", "white", "large", pos))
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (border == S.PALETTE["white"]).all()


# ---------------------------------------------------------------- determinism


def test_dataset_is_deterministic_for_a_seed():
    a_img, a_cap = S.dataset(24, seed=7, split="train")
    b_img, b_cap = S.dataset(24, seed=7, split="train")
    assert a_img.shape == (24, 64, 64, 3) and a_img.dtype == np.uint8 and len(a_cap) == 24
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    c_img, c_cap = S.dataset(24, seed=8, split="train")
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    assert S.sample_scenes(50, 3, "all") == S.sample_scenes(50, 3, "all") != S.sample_scenes(50, 4, "all")
    # the dataset's images are the renders of sample_scenes for the same seed
    scenes = S.sample_scenes(24, 7, "train")
    assert np.array_equal(a_img, np.stack([S.render(s) for s in scenes]))


def test_batches_are_deterministic_and_endless():
    def take(seed, k):
        it = S.batches(8, seed, split="held_out", size=32)
        return [next(it) for _ in range(k)]

    first, again, other = take(1, 3), take(1, 3), take(2, 3)
    for (ai, ac), (bi, bc) in zip(first, again):
        assert ai.shape == (8, 32, 32, 3) and np.array_equal(ai, bi) and ac == bc
    assert not np.array_equal(first[0][0], first[1][0])  # successive batches differ
    assert first[0][1] != other[0][1]
    assert all(S.parse_prompt(c)["colour"] is not None for _, caps in first for c in caps)


def test_caption_is_deterministic_and_varied():
    scene = S.Scene("diamond", "orange", "black")  # default size and position: every template fits
    caps = [S.caption(scene, np.random.default_rng(i)) for i in range(200)]
    assert caps == [S.caption(scene, np.random.default_rng(i)) for i in range(200)]
    assert len(set(caps)) == len(S.TEMPLATES) >= 6
    assert "an orange diamond on a black background" in caps
    assert all(" a orange" not in c and not c.startswith("a orange") for c in caps)


# ---------------------------------------------------------------- held-out split


def test_held_out_set():
    assert len(S.ALL_COMBOS) == 8 * 7 * len(S.SHAPES)
    assert 0.10 <= len(S.HELD_OUT) / len(S.ALL_COMBOS) <= 0.15
    assert S.HELD_OUT <= set(S.ALL_COMBOS)
    train = set(S.ALL_COMBOS) - S.HELD_OUT
    # every colour, shape and background is held out somewhere, and none entirely
    for i, values in ((0, S.COLOURS), (1, S.SHAPES), (2, S.COLOURS)):
        for v in values:
            assert any(c[i] == v for c in S.HELD_OUT)
            assert any(c[i] == v for c in train)
    # every pair of attribute values in a held-out combination is seen in training
    for c, s, b in S.HELD_OUT:
        assert any(t[:2] == (c, s) for t in train)
        assert any((t[0], t[2]) == (c, b) for t in train)
        assert any(t[1:] == (s, b) for t in train)


def test_splits_never_mix():
    train = S.sample_scenes(5000, 0, "train")
    assert not any(S.is_held_out(s) for s in train)
    held = S.sample_scenes(2000, 0, "held_out")
    assert all(S.is_held_out(s) for s in held)
    assert {(s.colour, s.shape, s.background) for s in held} == S.HELD_OUT
    every = S.sample_scenes(5000, 0, "all")
    assert 0.08 < np.mean([S.is_held_out(s) for s in every]) < 0.17
    assert {s.size for s in train} == set(S.SIZES) and {s.position for s in train} == set(S.POSITIONS)
    _, captions = S.dataset(5000, 1, "train", size=8)
    assert not any((p["colour"], p["shape"], p["background"]) in S.HELD_OUT for p in map(S.parse_prompt, captions))
    with pytest.raises(ValueError):
        S.sample_scenes(3, 0, "test")


# ---------------------------------------------------------------- captions and prompts


def test_parse_prompt_recovers_generated_captions():
    rng = np.random.default_rng(0)
    seen = set()
    for scene in S.sample_scenes(3000, 5, "all"):
        text = S.caption(scene, rng)
        got = S.parse_prompt(text)
        for key in ("colour", "background", "shape"):
            assert got[key] == getattr(scene, key), text
        for key, default in (("size", S.DEFAULT_SIZE), ("position", S.DEFAULT_POSITION)):
            assert got[key] == (getattr(scene, key) if got[key] is not None else None), text
            if got[key] is None:  # only defaults go unstated
                assert getattr(scene, key) == default, text
        seen.add(tuple(got[k] is None for k in ("size", "position")))
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red circle on a blue background", {"colour": "red", "shape": "circle", "background": "blue"}),
        (
            "small green triangle at the top, yellow background",
            {"colour": "green", "shape": "triangle", "background": "yellow", "size": "small", "position": "top"},
        ),
        (
            "a large purple square in the centre of a white image",
            {"colour": "purple", "shape": "square", "background": "white", "size": "large", "position": "centre"},
        ),
        (
            "blue background with an orange diamond on the left",
            {"colour": "orange", "shape": "diamond", "background": "blue", "position": "left"},
        ),
        (
            "A big Black plus in the middle, against a WHITE backdrop!",
            {"colour": "black", "shape": "cross", "background": "white", "size": "large", "position": "centre"},
        ),
        ("red circle on blue", {"colour": "red", "shape": "circle", "background": "blue"}),
        ("a photo of a tiny yellow square, please", {"colour": "yellow", "shape": "square", "size": "small"}),
        (
            "the background is green and there is a white circle at the bottom",
            {"colour": "white", "shape": "circle", "background": "green", "position": "bottom"},
        ),
        ("a blue background", {"background": "blue"}),
        ("hello world", {}),
    ],
)
def test_parse_simple_prompts(text, expected):
    assert S.parse_prompt(text) == {k: expected.get(k) for k in S.ATTRIBUTES}


# ---------------------------------------------------------------- the judge


@pytest.mark.parametrize("split", ["train", "held_out", "all"])
def test_analyser_is_exact_on_ground_truth(split):
    scenes = S.sample_scenes(300, 11, split)
    for scene in scenes:
        assert S.analyse(S.render(scene)) == _truth(scene), scene
    images, captions = S.dataset(300, 12, split)
    result = S.score(captions, list(images))
    for key in S.ATTRIBUTES:
        assert result[key] == 1.0, key
    assert result["all"] == 1.0 and result["counts"]["colour"] == 300


def test_analyser_every_scene_at_64_and_other_sizes():
    for colour, shape, background in S.ALL_COMBOS[::7]:
        for size, position in itertools.product(S.SIZES, S.POSITIONS):
            scene = S.Scene(shape, colour, background, size, position)
            assert S.analyse(S.render(scene)) == _truth(scene), scene
    for px in (48, 128, 512):
        for scene in S.sample_scenes(40, px, "all"):
            assert S.analyse(S.render(scene, px)) == _truth(scene), (px, scene)


def test_analyser_is_robust_to_noise_blur_and_colour_shifts():
    rng = np.random.default_rng(0)
    scenes = S.sample_scenes(400, 21, "all")
    hits = {k: 0 for k in S.ATTRIBUTES}
    for scene in scenes:
        got = S.analyse(_perturb(S.render(scene), rng))
        for k in S.ATTRIBUTES:
            hits[k] += got[k] == getattr(scene, k)
    accuracy = {k: v / len(scenes) for k, v in hits.items()}
    assert min(accuracy.values()) >= 0.98, accuracy
    # float images in [0, 1] are judged too
    scene = scenes[0]
    assert S.analyse(S.render(scene) / 255.0) == _truth(scene)


def test_analyser_says_none_without_an_object():
    rng = np.random.default_rng(3)
    for colour in S.COLOURS:
        blank = np.full((64, 64, 3), S.PALETTE[colour], np.uint8)
        for img in (blank, _perturb(blank, rng)):
            got = S.analyse(img)
            assert got == {"background": colour, "colour": "none", "shape": "none", "position": "none", "size": "none"}


def test_score_reports_per_attribute_and_per_item():
    good = S.render(S.Scene("circle", "red", "blue", "small", "left"))
    bad = S.render(S.Scene("square", "green", "blue", "large", "right"))
    result = S.score(
        ["a small red circle on the left, blue background", "a red circle on a blue background"], [good, bad]
    )
    assert result["colour"] == 0.5 and result["shape"] == 0.5 and result["background"] == 1.0
    assert result["size"] == 1.0 and result["position"] == 1.0  # stated only by the first prompt
    assert result["counts"] == {"colour": 2, "background": 2, "shape": 2, "position": 1, "size": 1}
    assert result["all"] == 0.5
    first, second = result["items"]
    assert all(first["correct"].values()) and set(second["correct"]) == {"colour", "background", "shape"}
    assert second["analysed"]["shape"] == "square"
    assert S.score(["a red circle"], [np.full((64, 64, 3), 255, np.uint8)])["shape"] == 0.0
    with pytest.raises(ValueError):
        S.score(["a"], [])


def test_module_imports_without_torch():
    code = (
        "import sys, edgediff.runtime.shapes; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
