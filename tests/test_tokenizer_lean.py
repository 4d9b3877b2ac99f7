"""Torch-free tokenizer tests (run in the lean install): the optimum folder layout (vocab.json +
merges.txt, no tokenizer.json) against the recorded CLIPTokenizer goldens and against the
folder's own tokenizer.json, prompts that are not text, the truncation warning, and
``tokenizer_problems`` / ClipTokenizer's ModelFolderError on damaged config files."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgediff.runtime.errors import InvalidArgumentError, ModelFolderError
from edgediff.runtime.tokenizer import ClipTokenizer, tokenizer_problems
from golden_cases import TOKENIZER_PROMPTS

FIXTURES = Path(__file__).parent / "fixtures"
LOGGER = "edgediff.runtime.tokenizer"
# beyond the goldens: special tokens typed in other case (matched after lowercasing, as
# transformers' normalized=True AddedTokens), SD2's pad "!" (never merged), CJK, control chars
EXTRA = ["<|ENDOFTEXT|> cat", "a<|endoftext|>b <|StartOfText|>", "!!cat! !", "東京の夜 and 北京", "ctrl\x07char"]
EXTRA += ["x" * 300]


@pytest.fixture(scope="module")
def goldens():
    return dict(np.load(FIXTURES / "goldens.npz"))


def _copy(variant: str, tmp_path: Path, optimum: bool) -> Path:
    folder = tmp_path / variant / "tokenizer"
    shutil.copytree(FIXTURES / f"micro-{variant}" / "tokenizer", folder)
    if optimum:  # what optimum's exporter writes: no tokenizer.json
        (folder / "tokenizer.json").unlink()
    return folder


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_optimum_layout_equals_clip_tokenizer_goldens(goldens, tmp_path, variant):
    tok = ClipTokenizer(_copy(variant, tmp_path, optimum=True))
    assert tok.encode(TOKENIZER_PROMPTS).tolist() == goldens[f"tok/{variant}"].tolist()


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_optimum_layout_equals_tokenizer_json(tmp_path, variant):
    built = ClipTokenizer(_copy(variant, tmp_path, optimum=True))
    loaded = ClipTokenizer(FIXTURES / f"micro-{variant}" / "tokenizer")
    prompts = TOKENIZER_PROMPTS + EXTRA
    assert built.encode(prompts).tolist() == loaded.encode(prompts).tolist()
    assert (built.pad_token, built.pad_id, built.eos_id) == (loaded.pad_token, loaded.pad_id, loaded.eos_id)


def test_sd2_pads_with_its_own_token_in_optimum_layout(tmp_path):
    tok = ClipTokenizer(_copy("sd2", tmp_path, optimum=True))
    assert tok.pad_token == "!" and tok.pad_id != tok.eos_id
    assert tok.encode(["cat"])[0, -1] == tok.pad_id


@pytest.mark.parametrize(
    "prompts, fragment",
    [
        (
            ["cat \udcff"],
            "prompt 1 contains a character that is not valid Unicode text (lone surrogate U+DCFF at "
            "position 4); remove it or re-encode the text as UTF-8",
        ),
        # what Python makes of invalid UTF-8 bytes in argv / files read with errors="surrogateescape"
        (
            ["ok", b"a \xfe cat".decode("utf-8", "surrogateescape")],
            "prompt 2 contains a character that is not valid Unicode text (lone surrogate U+DCFE at position 2)",
        ),
        (["\ud83d\ude00 cat"], "lone surrogate U+D83D at position 0"),  # a UTF-16 pair split into code points
        ([b"a cat"], "prompt 1 is bytes, not text; decode it first"),
        (["a", 7], "prompt 2 must be a string, got int"),
    ],
)
def test_prompt_that_is_not_text_raises(prompts, fragment):
    tok = ClipTokenizer(FIXTURES / "micro-sd1" / "tokenizer")
    with pytest.raises(InvalidArgumentError) as e:
        tok.encode(prompts)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_labels_name_the_prompt():
    tok = ClipTokenizer(FIXTURES / "micro-sd1" / "tokenizer")
    with pytest.raises(InvalidArgumentError, match=r"^negative_prompt 1 contains a character"):
        tok.encode(["x\udcff", "fine"], labels=["negative_prompt 1", "prompt 1"])


def _warnings(caplog, tok, prompt) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tok.encode([prompt])
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _token_count(variant: str, prompt: str) -> int:
    # tokenizer.json as committed sets no truncation: every token, with start and end
    raw = Tokenizer.from_file(str(FIXTURES / f"micro-{variant}" / "tokenizer" / "tokenizer.json"))
    return len(raw.encode(prompt).ids)


@pytest.mark.parametrize("optimum", [False, True])
def test_truncation_warning_quotes_dropped_text_as_typed(caplog, tmp_path, optimum):
    tok = ClipTokenizer(_copy("sd1", tmp_path, optimum))
    prompt = " ".join(["cat"] * 75) + " Zebra Tail, END"  # 75 content tokens fill 77 with start and end
    (msg,) = _warnings(caplog, tok, prompt)
    dropped = _token_count("sd1", prompt) - 77
    assert msg.startswith(f"prompt 1 is longer than the model's 77 tokens: {dropped} tokens dropped, ")
    # the user's text (capital Z, no BPE "</w>" pieces), not a decode of the ids (lowercase)
    assert 'starting at "Zebra Tail, END"' in msg and "</w>" not in msg
    assert msg.endswith("(shorten the prompt to 77 tokens or move what matters to its start)")
    assert _warnings(caplog, tok, "a short prompt") == []
    assert _warnings(caplog, tok, " ".join(["cat"] * 75)) == []  # exactly full: nothing dropped


def test_truncation_warning_of_huge_prompt_is_short(caplog):
    tok = ClipTokenizer(FIXTURES / "micro-sd1" / "tokenizer")
    prompt = ("zebra tail and a red circle,\n" * 4000)[:100_000]
    (msg,) = _warnings(caplog, tok, prompt)
    assert len(msg) < 300 and "\n" not in msg
    assert f" {_token_count('sd1', prompt) - 77} tokens dropped" in msg
    assert tok.encode([prompt]).shape == (1, 77)


# -- tokenizer_problems / ModelFolderError ------------------------------------------------------


def _edit_json(folder: Path, name: str, **changes):
    data = json.loads((folder / name).read_text(encoding="utf-8"))
    data.update(changes)
    (folder / name).write_text(json.dumps(data), encoding="utf-8")


def _write(name: str, content):
    def edit(folder: Path):
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")

    return edit


def _delete(*names):
    def edit(folder: Path):
        for n in names:
            (folder / n).unlink()

    return edit


CFG, MAP = "tokenizer_config.json", "special_tokens_map.json"
# (id, optimum layout, edit, fragments the problem names: the file and the value)
BROKEN = [
    (
        "config-not-utf8",
        False,
        _write(CFG, b'{"model_max_length": 77, "x": "\xff"}'),
        ["tokenizer/tokenizer_config.json: not UTF-8 text (byte 0xff at offset 31)"],
    ),
    (
        "config-not-json",
        False,
        _write(CFG, '{"model_max_length": 77,'),
        [
            "tokenizer/tokenizer_config.json: not valid JSON "
            "(Expecting property name enclosed in double quotes at line 1"
        ],
    ),
    (
        "map-is-list",
        False,
        _write(MAP, ["<|endoftext|>"]),
        ["tokenizer/special_tokens_map.json: must hold a JSON object, got an array"],
    ),
    (
        "config-is-list",
        True,
        _write(CFG, [1, 2]),
        ["tokenizer/tokenizer_config.json: must hold a JSON object, got an array"],
    ),
    (
        "length-string",
        False,
        lambda f: _edit_json(f, CFG, model_max_length="77"),
        ['tokenizer/tokenizer_config.json: model_max_length must be an integer, got "77"'],
    ),
    (
        "length-200",
        True,
        lambda f: _edit_json(f, CFG, model_max_length=200),
        ["tokenizer/tokenizer_config.json: model_max_length must be between 2 and 77 for CLIP", "got 200"],
    ),
    ("length-1", False, lambda f: _edit_json(f, CFG, model_max_length=1), ["between 2 and 77", "got 1"]),
    ("length-bool", False, lambda f: _edit_json(f, CFG, model_max_length=True), ["must be an integer, got true"]),
    (
        "pad-not-string",
        False,
        lambda f: _edit_json(f, MAP, pad_token=5),
        ["tokenizer/special_tokens_map.json: pad_token must be a non-empty string or an AddedToken object", "got 5"],
    ),
    (
        "eos-dict-no-content",
        True,
        lambda f: _edit_json(f, CFG, eos_token={"lstrip": False}),
        ["tokenizer/tokenizer_config.json: eos_token must be", 'got {"lstrip": false}'],
    ),
    (
        "pad-not-in-vocab",
        False,
        lambda f: _edit_json(f, MAP, pad_token="<|pad|>"),
        ["tokenizer/tokenizer.json: has no pad_token '<|pad|>' (set by tokenizer/special_tokens_map.json)"],
    ),
    (
        "pad-not-in-vocab-optimum",
        True,
        lambda f: _edit_json(f, MAP, pad_token={"content": "<|pad|>"}),
        ["tokenizer/vocab.json: has no pad_token '<|pad|>' (set by tokenizer/special_tokens_map.json)"],
    ),
    (
        "eos-not-in-vocab",
        True,
        lambda f: _edit_json(f, CFG, eos_token="<|end|>") or _edit_json(f, MAP, eos_token=None),
        ["tokenizer/vocab.json: has no eos_token '<|end|>' (set by tokenizer/tokenizer_config.json)"],
    ),
    (
        "no-model-files",
        True,
        _delete("vocab.json"),
        ["tokenizer/ has neither tokenizer.json nor vocab.json + merges.txt"],
    ),
    (
        "tokenizer-json-unloadable",
        False,
        _write("tokenizer.json", {"version": "1.0", "model": {"vocab": 3}}),
        ["tokenizer/tokenizer.json: tokenizers ", " cannot load it ("],
    ),
    ("tokenizer-json-not-json", False, _write("tokenizer.json", "{oops"), ["tokenizer/tokenizer.json: tokenizers "]),
    (
        "vocab-not-object",
        True,
        _write("vocab.json", ["a", "b"]),
        ["tokenizer/vocab.json: must hold a JSON object, got an array"],
    ),
    (
        "vocab-non-int-id",
        True,
        lambda f: _edit_json(f, "vocab.json", cat="7"),
        ['tokenizer/vocab.json: must map each token to an integer id, got "cat": "7"'],
    ),
    (
        "merges-bad-line",
        True,
        lambda f: (f / "merges.txt").write_text("#version: 0.2\nc a\nt\n", encoding="utf-8"),
        ['tokenizer/merges.txt: 1 line(s) do not hold two tokens separated by a space, first line 3: "t"'],
    ),
    (
        "merges-out-of-vocab",
        True,
        lambda f: (f / "merges.txt").write_text("#version: 0.2\nqq zz\n", encoding="utf-8"),
        ["tokenizer/vocab.json + merges.txt: tokenizers cannot build a BPE model from them ("],
    ),
    (
        "added-tokens-decoder",
        False,
        lambda f: _edit_json(f, CFG, added_tokens_decoder={"x": "<|endoftext|>"}),
        ['tokenizer/tokenizer_config.json: added_tokens_decoder entry "x" must map an integer id'],
    ),
]


@pytest.mark.parametrize("optimum, edit, fragments", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_tokenizer_folder(tmp_path, optimum, edit, fragments):
    folder = _copy("sd1", tmp_path, optimum)
    edit(folder)
    problems = tokenizer_problems(folder)
    assert len(problems) == 1, problems
    assert all(f in problems[0] for f in fragments), problems[0]
    with pytest.raises(ModelFolderError) as e:
        ClipTokenizer(folder)
    msg = str(e.value)
    assert msg.startswith(f"tokenizer folder {folder} cannot be loaded: {problems[0]}") and "\n" not in msg
    assert msg.endswith("(fix these files or re-export the model)")


def test_every_problem_is_listed(tmp_path):
    folder = _copy("sd2", tmp_path, optimum=True)
    _edit_json(folder, CFG, model_max_length=200, unk_token=[1])
    _write(MAP, b"\xff")(folder)
    (folder / "merges.txt").write_text("a\n", encoding="utf-8")
    problems = tokenizer_problems(folder)
    assert len(problems) == 4, problems
    with pytest.raises(ModelFolderError) as e:
        ClipTokenizer(folder)
    assert "; ".join(problems) in str(e.value)
    for fragment in ("special_tokens_map.json: not UTF-8", "unk_token must be", "got 200", "merges.txt: 1 line(s)"):
        assert fragment in str(e.value)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("optimum", [False, True])
def test_good_folders_have_no_problems(tmp_path, variant, optimum):
    assert tokenizer_problems(_copy(variant, tmp_path, optimum)) == []


@pytest.mark.parametrize("unset", [1e30, int(1e30), None])
def test_unset_model_max_length_means_77(tmp_path, unset):
    folder = _copy("sd1", tmp_path, optimum=True)
    _edit_json(folder, CFG, model_max_length=unset)
    assert tokenizer_problems(folder) == []
    assert ClipTokenizer(folder).encode(["cat"]).shape == (1, 77)


def test_max_positions_bounds_model_max_length(tmp_path):
    folder = _copy("sd1", tmp_path, optimum=False)
    assert tokenizer_problems(folder, max_positions=77) == []
    (problem,) = tokenizer_problems(folder, max_positions=64)
    assert problem == (
        "tokenizer/tokenizer_config.json: model_max_length must be between 2 and 64 for CLIP (the text encoder's "
        "positions), got 77"
    )
    _edit_json(folder, CFG, model_max_length=64)
    assert ClipTokenizer(folder, max_positions=64).encode(["cat"]).shape == (1, 64)


def test_missing_folder(tmp_path):
    assert tokenizer_problems(tmp_path / "tokenizer") == ["tokenizer/ is missing (the tokenizer folder)"]
    with pytest.raises(ModelFolderError, match=r"tokenizer folder .* is missing; re-export the model"):
        ClipTokenizer(tmp_path / "tokenizer")
