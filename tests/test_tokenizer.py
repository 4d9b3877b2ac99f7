"""edgediff's tokenizers-only CLIP tokenizer against transformers' CLIPTokenizer (the slow one
diffusers' pipelines load) and CLIPTokenizerFast, on tricky prompts, for both ways the runtime
builds it (from tokenizer.json, and from vocab.json + merges.txt as in optimum folders)."""

import logging
import shutil

import numpy as np
import pytest

from conftest import needs_torch
from edgediff.runtime.tokenizer import ClipTokenizer
from golden_cases import TOKENIZER_PROMPTS

PROMPTS = [
    *TOKENIZER_PROMPTS,  # the ones recorded as goldens for the torch-free run
    "e\u0301 composed vs é, tab\there\u00a0nbsp",
    "numbers 1234567890 and 3.14159",
    "x" * 300,
    # special tokens typed in another case are the special token (transformers' AddedTokens are
    # normalized=True, matched after lowercasing); SD2's pad "!" is never merged
    "<|ENDOFTEXT|> cat",
    "a<|endoftext|>b <|StartOfText|>",
    "!!cat! !",
]
# transformers' slow CLIPTokenizer without ftfy splits CJK ideographs and drops control characters
# (BERT BasicTokenizer fallback); its fast tokenizer and OpenAI CLIP do not. We match the fast one.
FAST_ONLY = ["東京の夜 and 北京", "ctrl\x07char"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tokenizer_dirs(request, tiny_export, tmp_path_factory):
    folder = tiny_export(request.param) / "tokenizer"
    # the same tokenizer without tokenizer.json: the optimum-folder code path
    slow_only = tmp_path_factory.mktemp("slow-tok") / "tokenizer"
    shutil.copytree(folder, slow_only)
    (slow_only / "tokenizer.json").unlink()
    return request.param, folder, slow_only


@needs_torch
@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_transformers(tokenizer_dirs, prompt):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    variant, folder, slow_only = tokenizer_dirs
    ref_slow = CLIPTokenizer.from_pretrained(folder)
    ref_fast = CLIPTokenizerFast.from_pretrained(folder)
    want = ref_slow([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    want_fast = ref_fast([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    for path in (folder, slow_only):
        got = ClipTokenizer(path).encode([prompt])
        assert got.shape == (1, 77) and got.dtype == np.int64
        assert got.tolist() == want_fast, f"{variant} {path.name}: differs from CLIPTokenizerFast"
        assert got.tolist() == want, f"{variant} {path.name}: differs from CLIPTokenizer"


@needs_torch
@pytest.mark.parametrize("prompt", FAST_ONLY)
def test_matches_fast_tokenizer_where_slow_one_differs(tokenizer_dirs, prompt):
    from transformers import CLIPTokenizerFast

    _, folder, slow_only = tokenizer_dirs
    want = CLIPTokenizerFast.from_pretrained(folder)([prompt], padding="max_length", max_length=77, truncation=True)
    for path in (folder, slow_only):
        assert ClipTokenizer(path).encode([prompt]).tolist() == want.input_ids


@needs_torch
def test_pad_token_follows_model(tiny_export):
    sd1 = ClipTokenizer(tiny_export("sd1") / "tokenizer")
    sd2 = ClipTokenizer(tiny_export("sd2") / "tokenizer")
    assert sd1.pad_token == "<|endoftext|>" and sd1.pad_id == sd1.eos_id
    assert sd2.pad_token == "!" and sd2.pad_id != sd2.eos_id
    assert sd2.encode(["cat"])[0, -1] == sd2.pad_id


@needs_torch
def test_truncation_warns_with_dropped_text(tokenizer_dirs, caplog):
    from transformers import CLIPTokenizerFast

    _, folder, slow_only = tokenizer_dirs
    prompt = " ".join(["cat"] * 75) + " Zebra Tail, and more"  # 75 content tokens fill 77 with start and end
    total = len(CLIPTokenizerFast.from_pretrained(folder)(prompt).input_ids)  # transformers' count, untruncated
    for path in (folder, slow_only):
        tok = ClipTokenizer(path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgediff.runtime.tokenizer"):
            ids = tok.encode([prompt])
        assert ids.shape == (1, 77) and ids[0, -1] == tok.eos_id
        (record,) = caplog.records
        assert record.getMessage() == (
            f"prompt 1 is longer than the model's 77 tokens: {total - 77} tokens dropped, starting at "
            '"Zebra Tail, and more" (shorten the prompt to 77 tokens or move what matters to its start)'
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgediff.runtime.tokenizer"):
            tok.encode(["a short prompt"])
        assert caplog.text == ""
