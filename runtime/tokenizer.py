"""CLIP tokenizer on the ``tokenizers`` library alone (no transformers).

Loads ``tokenizer/tokenizer.json`` when the folder has one (edgediff exports always do); a folder
with only ``vocab.json`` + ``merges.txt`` (optimum exports, diffusers checkpoints) gets the same
pipeline built here as transformers' CLIP converter builds it. Truncation and padding are set
once at load (reconfiguring a shared tokenizer per call breaks under threads, tokenizers#537);
the pad token and length come from the model's own ``tokenizer_config.json`` /
``special_tokens_map.json``: SD1.x pads with ``<|endoftext|>``, SD2.x with ``!``.

The ids equal transformers' CLIPTokenizerFast (and OpenAI CLIP's ftfy path) on every input. The
slow CLIPTokenizer without ``ftfy`` installed falls back to BERT's BasicTokenizer, which also
splits CJK ideographs into single characters and deletes control characters; prompts with those
get different ids there (a transformers inconsistency; we follow the fast tokenizer).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import ModelFolderError

logger = logging.getLogger(__name__)

# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py, as transformers' converter).
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised by transformers
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({e}); re-export the model") from e


def _build_clip_tokenizer(folder: Path, bos: str, eos: str, unk: str, pad: str) -> Tokenizer:
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        raise ModelFolderError(
            f"{folder} has neither tokenizer.json nor vocab.json + merges.txt; re-export the model"
        )
    vocab = _read_json(vocab_path)
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=unk)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        sep=(eos, vocab[eos]), cls=(bos, vocab[bos]), add_prefix_space=False, trim_offsets=False
    )
    # transformers registers the special tokens as added tokens: they are split out of the text
    # before BPE (this matters for SD2's pad token "!": "!!" is two pad ids, not one merge).
    tok.add_special_tokens(list(dict.fromkeys([bos, eos, unk, pad])))
    return tok


class ClipTokenizer:
    """``encode(prompts) -> int64 array [len(prompts), max_length]``; thread-safe after load."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"tokenizer folder {folder} is missing; re-export the model")
        config = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")

        def token(key: str, default: str) -> str:
            return _token_content(special.get(key)) or _token_content(config.get(key)) or default

        bos = token("bos_token", "<|startoftext|>")
        eos = token("eos_token", "<|endoftext|>")
        unk = token("unk_token", "<|endoftext|>")
        pad = token("pad_token", eos)
        self.max_length = int(config.get("model_max_length", 77))
        if self.max_length > 10_000:  # transformers' "unset" sentinel (1e30)
            self.max_length = 77
        if (folder / "tokenizer.json").is_file():
            try:
                self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise ModelFolderError(f"{folder / 'tokenizer.json'} cannot be loaded ({e}); re-export the model") from e
        else:
            self._tok = _build_clip_tokenizer(folder, bos, eos, unk, pad)
        pad_id = self._tok.token_to_id(pad)
        if pad_id is None:
            raise ModelFolderError(f"pad token {pad!r} of {folder} is not in its vocabulary; re-export the model")
        self.pad_token, self.pad_id = pad, pad_id
        self.eos_id = self._tok.token_to_id(eos)
        self._tok.enable_truncation(max_length=self.max_length)
        self._tok.enable_padding(pad_id=pad_id, pad_token=pad, length=self.max_length)

    def encode(self, prompts: list[str]) -> np.ndarray:
        # one by one: encode_batch hands a few prompts to tokenizers' thread pool, whose wake-up
        # costs more than the work and competes with the engine's threads
        encodings = [self._tok.encode(p) for p in prompts]
        for prompt, enc in zip(prompts, encodings):
            if enc.overflowing:
                dropped = " ".join(
                    self._tok.decode(o.ids, skip_special_tokens=True) for o in enc.overflowing
                ).strip()
                logger.warning(
                    "prompt is longer than %d tokens; this part was dropped: %r (prompt starts %r)",
                    self.max_length,
                    dropped,
                    prompt[:40],
                )
        return np.asarray([e.ids for e in encodings], dtype=np.int64)
