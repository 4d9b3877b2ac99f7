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


# ---------------------------------------------------------------- phrasings


def _states_truth(text: str, scene: S.Scene) -> bool:
    """``parse_prompt`` reads ``scene`` back from ``text``; size and position may go unstated only at their default."""
    got = S.parse_prompt(text)
    defaults = {"size": S.DEFAULT_SIZE, "position": S.DEFAULT_POSITION}
    return all(
        got[k] == getattr(scene, k) or (got[k] is None and defaults.get(k) == getattr(scene, k)) for k in S.ATTRIBUTES
    )


_PHRASING_SCENES = [
    S.Scene("circle", "red", "blue", "small", "left"),
    S.Scene("cross", "orange", "white"),  # defaults: the templates that omit size and position apply
    S.Scene("diamond", "purple", "black", "large", "top"),
    S.Scene("square", "white", "green", "small", "centre"),
    S.Scene("triangle", "yellow", "red", "large", "bottom"),
]


def test_v1_phrasing_is_the_default_and_unchanged():
    # the shipped model was trained on v1: its captions, the rng draws and the datasets must not move
    scene = S.Scene("diamond", "orange", "black")
    assert [S.caption(scene, np.random.default_rng(i)) for i in range(50)] == [
        S.caption(scene, np.random.default_rng(i), "v1") for i in range(50)
    ]
    assert S.all_captions(scene) == {S.caption(scene, np.random.default_rng(i)) for i in range(300)}
    assert len(S.all_captions(scene)) == len(S.TEMPLATES)
    images, caps = S.dataset(6, seed=7)
    assert caps == S.dataset(6, seed=7, phrasing="v1")[1]
    assert S.dataset(3, seed=1)[1] == [  # golden, from before phrasings existed
        "red background with a large yellow diamond in the centre",
        "a small purple circle on an orange background",
        "a small white circle on the right of a blue image",
    ]
    v2_images, v2_caps = S.dataset(6, seed=7, phrasing="v2")
    assert np.array_equal(images, v2_images) and caps != v2_caps  # the recipe changes captions, never images
    with pytest.raises(ValueError, match="phrasing must be one of"):
        S.caption(scene, np.random.default_rng(0), "v3")


def test_v2_phrasing_extends_v1_and_has_the_everyday_variants():
    rng = np.random.default_rng(0)
    for scene in _PHRASING_SCENES:
        every = S.all_captions(scene, "v2")
        assert S.all_captions(scene, "v1") <= every
        drawn = {S.caption(scene, rng, "v2") for _ in range(400)}
        assert drawn <= every and len(drawn) > 100
    centre = S.all_captions(S.Scene("square", "white", "green", "small", "centre"), "v2")
    for fragment in ("in the center", "in the middle", "in the centre", "green backdrop", "the small white square",
                     "small white square in the center on green"):  # fmt: skip
        assert any(fragment in c for c in centre), fragment
    assert {"center", "middle", "backdrop", "little", "big"} <= S.phrasing_words("v2")
    assert not {"center", "middle", "backdrop"} & S.phrasing_words("v1")


def test_held_out_phrasings_are_disjoint_from_training():
    assert not set(S.HELD_OUT_TEMPLATES) & ({t for t, _ in S._V2_TEMPLATES} | set(S.TEMPLATES))
    for scene in _PHRASING_SCENES:
        held = S.all_held_out_phrasings(scene)
        assert len(held) > 1000
        for phrasing in S.PHRASINGS:
            assert not held & S.all_captions(scene, phrasing), phrasing
    # some held-out words are in no training recipe at all
    trained = S.phrasing_words("v1") | S.phrasing_words("v2")
    for word in ("tiny", "huge", "disk", "canvas", "centered", "centred", "colored", "please"):
        assert word not in trained, word
    scenes, prompts = S.held_out_phrasing_prompts(300, seed=3)
    assert (scenes, prompts) == S.held_out_phrasing_prompts(300, seed=3) and scenes == S.sample_scenes(300, 3)
    assert prompts != S.held_out_phrasing_prompts(300, seed=4)[1]
    assert all(p in S.all_held_out_phrasings(s) for s, p in zip(scenes[:40], prompts[:40]))
    templates = [S.held_out_template(s, p) for s, p in zip(scenes, prompts)]
    assert None not in templates and len(set(templates)) == len(S.HELD_OUT_TEMPLATES)
    assert S.held_out_template(scenes[0], S.caption(scenes[0], np.random.default_rng(0), "v2")) is None
    trained_captions = set().union(*(S.all_captions(s, ph) for s in scenes[:40] for ph in S.PHRASINGS))
    assert not trained_captions & set(prompts)
    assert len({S.parse_prompt(p)["position"] for p in prompts} - {None}) == len(S.POSITIONS)


def test_every_phrasing_parses_to_the_scene():
    # every wording each generator can produce, judged by the same parser the benchmarks score with
    for scene in _PHRASING_SCENES:
        for text in S.all_held_out_phrasings(scene) | S.all_captions(scene, "v2") | S.all_captions(scene, "v1"):
            assert _states_truth(text, scene), (text, scene)
    rng = np.random.default_rng(1)
    for scene in S.sample_scenes(2000, 9, "all"):
        for text in (S.held_out_phrasing(scene, rng), S.caption(scene, rng, "v2")):
            assert _states_truth(text, scene), (text, scene)


def test_phrasing_check_can_fail():
    # negative controls: a wrong colour, a swapped background, a dropped non-default position are caught
    scene = S.Scene("circle", "red", "blue", "small", "left")
    assert not _states_truth("a small green circle on the left, blue backdrop", scene)
    assert not _states_truth("a small blue circle on the left, red backdrop", scene)
    assert not _states_truth("a small red circle on a blue backdrop", scene)
    assert _states_truth("a small red circle on the left, blue backdrop", scene)
