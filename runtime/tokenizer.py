"""CLIP tokenizer on the ``tokenizers`` library alone (no transformers).

Loads ``tokenizer/tokenizer.json`` when the folder has one (edgediff exports always do); a folder
with only ``vocab.json`` + ``merges.txt`` (optimum exports, diffusers checkpoints) gets the same
pipeline transformers' CLIP converter builds, written as tokenizer.json text and loaded with
``Tokenizer.from_str``: the serialised format is what every tokenizers release must keep reading
(hub files), while the Python constructors' keywords change (0.23 renamed RobertaProcessing's
``cls`` to ``cls_token``). Truncation and padding are set once at load (reconfiguring a shared
tokenizer per call breaks under threads, tokenizers#537); the pad token and length come from the
model's own ``tokenizer_config.json`` / ``special_tokens_map.json``: SD1.x pads with
``<|endoftext|>``, SD2.x with ``!``. ``tokenizer_problems`` lists everything wrong in a folder's
files; ``ClipTokenizer`` raises them all at once as a ModelFolderError.

The ids equal transformers' CLIPTokenizerFast (and OpenAI CLIP's ftfy path) on every input. The
slow CLIPTokenizer without ``ftfy`` installed falls back to BERT's BasicTokenizer, which also
splits CJK ideographs into single characters and deletes control characters; prompts with those
get different ids there (a transformers inconsistency; we follow the fast tokenizer).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from .errors import InvalidArgumentError, ModelFolderError
from .specs import CLIP_POSITIONS

logger = logging.getLogger(__name__)

# transformers writes model_max_length = int(1e30) (VERY_LARGE_INTEGER) when the model sets none
_UNSET_LENGTH = 1e29
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
_SNIPPET = 60  # characters of dropped text the truncation warning shows

# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py, as transformers' converter).
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _short(value, n: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= n else text[: n - 3] + "..."


def _read_text(path: Path, label: str, problems: list[str]) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        byte = e.object[e.start]
        problems.append(f"{label}: not UTF-8 text (byte 0x{byte:02x} at offset {e.start}); save it as UTF-8")
    except OSError as e:
        problems.append(f"{label}: cannot be read ({e.strerror or e})")
    return None


def _read_json(path: Path, label: str, problems: list[str]) -> dict | None:
    """The file's JSON object, or None (with the reason in ``problems``); a missing file is ``{}``."""
    if not path.is_file():
        return {}
    text = _read_text(path, label, problems)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{label}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{label}: must hold a JSON object, got {_json_type(data)}")
        return None
    return data


def _special_tokens(files: list[tuple[str, dict]], problems: list[str]) -> dict[str, tuple[str, dict, str]]:
    """key -> (content, AddedToken attributes, file), from the first file that sets it validly."""
    found: dict[str, tuple[str, dict, str]] = {}
    for label, data in files:
        for key in _SPECIAL_KEYS:
            value = data.get(key)
            if value is None:  # unset (null is how transformers writes "none")
                continue
            if isinstance(value, dict) and isinstance(value.get("content"), str) and value["content"]:
                found.setdefault(key, (value["content"], value, label))
            elif isinstance(value, str) and value:
                found.setdefault(key, (value, {}, label))
            else:
                problems.append(
                    f"{label}: {key} must be a non-empty string or an AddedToken object with a string "
                    f'"content", got {_short(value)}'
                )
    return found


def max_length(model_max_length, max_positions: int | None = None) -> int:
    """Tokens per prompt (the contract's ``S``) for tokenizer_config.json's ``model_max_length`` and the text
    encoder's ``max_position_embeddings``: the one rule the tokenizer, ``ModelFolder.text_length`` (TensorRT
    profiles, bench, optimize) and export follow. An unset or invalid value gives CLIP's length."""
    return _max_length(model_max_length, "", max_positions, [])


def _max_length(value, label: str, max_positions: int | None, problems: list[str]) -> int:
    limit = max_positions or CLIP_POSITIONS
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= _UNSET_LENGTH):
        return min(CLIP_POSITIONS, limit)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        problems.append(f"{label}: model_max_length must be an integer, got {_short(value)}")
    elif not 2 <= value <= limit:  # 2: the start and end tokens
        problems.append(
            f"{label}: model_max_length must be between 2 and {limit} for CLIP (the text encoder's "
            f"positions), got {value}"
        )
    else:
        return value
    return min(CLIP_POSITIONS, limit)


def _read_merges(path: Path, label: str, problems: list[str]) -> list[str] | None:
    text = _read_text(path, label, problems)
    if text is None:
        return None
    merges, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        if len(line.split()) != 2:
            bad.append((n, line))
        merges.append(" ".join(line.split()))
    if bad:
        n, line = bad[0]
        problems.append(
            f"{label}: {len(bad)} line(s) do not hold two tokens separated by a space, first line {n}: {_short(line)}"
        )
        return None
    return merges


def _clip_tokenizer_json(vocab: dict, merges: list[str], added: list[dict], bos: str, eos: str, unk: str) -> str:
    # Field for field what transformers' CLIPConverter serialises. Merges as "a b" strings: every
    # tokenizers version reads those (0.20+ also reads pairs, 0.15-0.19 only strings).
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"},
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _CLIP_PATTERN}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, vocab[eos]], "cls": [bos, vocab[bos]],
                           "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }, ensure_ascii=False)  # fmt: skip


def _added_tokens_decoder(config: dict, label: str, problems: list[str]) -> dict[str, dict]:
    """content -> entry of tokenizer_config's added_tokens_decoder (transformers 4.34+ writes it;
    its attributes are authoritative)."""
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        problems.append(f"{label}: added_tokens_decoder must be a JSON object, got {_json_type(decoder)}")
        return {}
    entries = {}
    for key, entry in decoder.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and key.isdigit()):
            problems.append(f"{label}: added_tokens_decoder entry {_short(key)} must map an integer id to an "
                            f'AddedToken object with a string "content", got {_short(entry)}')  # fmt: skip
            continue
        entries[entry["content"]] = dict(entry, id=int(key))
    return entries


def _added_tokens(decoder: dict[str, dict], specials: dict, vocab: dict) -> list[dict]:
    """The added tokens transformers registers. They are split out of the text before BPE (SD2's
    pad "!": "!!" is two pad ids, not one merge); ``normalized`` decides whether "<|ENDOFTEXT|>"
    (lowercased first) is the special token too."""
    by_content = dict(decoder)
    for key, (content, attrs, _) in specials.items():
        if content not in by_content:
            # CLIPTokenizer wraps bos/eos/unk strings in AddedToken(normalized=True); a pad string
            # is added as a plain special token (normalized=False)
            by_content[content] = dict(attrs, normalized=attrs.get("normalized", key != "pad_token"), special=True)
    return [
        {"id": vocab.get(content, e.get("id")), "content": content, "single_word": bool(e.get("single_word")),
         "lstrip": bool(e.get("lstrip")), "rstrip": bool(e.get("rstrip")),
         "normalized": bool(e.get("normalized", True)), "special": bool(e.get("special", True))}
        for content, e in by_content.items()
        if isinstance(vocab.get(content, e.get("id")), int)
    ]  # fmt: skip


def _version_fix() -> str:
    # tokenizers < 0.20 cannot read the merges newer ones write ([a, b] pairs, not "a b")
    old = tuple(int(x) for x in tokenizers.__version__.split(".")[:2] if x.isdigit()) < (0, 20)
    return "upgrade tokenizers (pip install 'tokenizers>=0.20')" if old else "re-export the model"


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _load(folder: Path, max_positions: int | None) -> tuple[Tokenizer | None, dict, list[str]]:
    """(tokenizer or None, settings, problems): all of ``folder``'s problems, not the first."""
    if not folder.is_dir():
        return None, {}, [f"{folder.name}/ is missing (the tokenizer folder)"]
    problems: list[str] = []
    lbl = lambda name: f"{folder.name}/{name}"  # noqa: E731
    config = _read_json(folder / "tokenizer_config.json", lbl("tokenizer_config.json"), problems) or {}
    special = _read_json(folder / "special_tokens_map.json", lbl("special_tokens_map.json"), problems) or {}
    files = [(lbl("special_tokens_map.json"), special), (lbl("tokenizer_config.json"), config)]  # first one wins
    specials = _special_tokens(files, problems)
    decoder = _added_tokens_decoder(config, lbl("tokenizer_config.json"), problems)
    tokens = {k: specials[k][0] if k in specials else _DEFAULTS[k] for k in _SPECIAL_KEYS if k != "pad_token"}
    source = {k: specials[k][2] if k in specials else "CLIP's default" for k in _SPECIAL_KEYS if k != "pad_token"}
    pad = specials.get("pad_token")  # CLIP pads with its end token unless told otherwise
    tokens["pad_token"], source["pad_token"] = (pad[0], pad[2]) if pad else (tokens["eos_token"], source["eos_token"])
    length = _max_length(config.get("model_max_length"), lbl("tokenizer_config.json"), max_positions, problems)
    settings = dict(tokens, max_length=length)

    tok: Tokenizer | None = None
    vocab: dict | None = None
    merges: list[str] | None = None
    lookup: Callable[[str], object] | None = None
    needed: tuple[str, ...] = ()
    if (folder / "tokenizer.json").is_file():
        vocab_label, needed = lbl("tokenizer.json"), ("eos_token", "pad_token")
        text = _read_text(folder / "tokenizer.json", vocab_label, problems)
        try:
            tok = Tokenizer.from_str(text) if text is not None else None
            lookup = tok.token_to_id if tok is not None else None
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            version = tokenizers.__version__
            problems.append(f"{vocab_label}: tokenizers {version} cannot load it ({_first_line(e)}); {_version_fix()}")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # the post-processor needs the start token's id too
        vocab_label, needed = lbl("vocab.json"), ("bos_token", "eos_token", "pad_token")
        vocab = _read_json(folder / "vocab.json", vocab_label, problems)
        merges = _read_merges(folder / "merges.txt", lbl("merges.txt"), problems)
        bad = next(((k, v) for k, v in (vocab or {}).items() if not isinstance(v, int) or isinstance(v, bool)), None)
        if bad:
            problems.append(
                f"{vocab_label}: must map each token to an integer id, got {_short(bad[0])}: {_short(bad[1])}"
            )
            vocab = None
        lookup = vocab.get if vocab is not None else None
    else:
        problems.append(f"{folder.name}/ has neither tokenizer.json nor vocab.json + merges.txt")

    missing = [k for k in needed if lookup(tokens[k]) is None] if lookup else []
    for key in missing:
        problems.append(f"{vocab_label}: has no {key} {tokens[key]!r} (set by {source[key]}) in its vocabulary")
    if vocab is not None and merges is not None and not missing:
        added = _added_tokens(decoder, specials, vocab)
        bos, eos, unk = tokens["bos_token"], tokens["eos_token"], tokens["unk_token"]
        try:
            tok = Tokenizer.from_str(_clip_tokenizer_json(vocab, merges, added, bos, eos, unk))
        except Exception as e:  # e.g. a merge of tokens that are not in the vocabulary
            # the position is one in the JSON text made here: meaningless to the user
            why = re.sub(r" at line \d+ column \d+$", "", _first_line(e))
            problems.append(f"{vocab_label} + merges.txt: tokenizers cannot build a BPE model from them ({why})")
    return (None if problems else tok), settings, problems


def tokenizer_problems(folder: Path, max_positions: int | None = None) -> list[str]:
    """Every problem of the tokenizer folder's files, each starting with its file
    (``tokenizer/tokenizer_config.json: ...``); empty when the folder loads. ``max_positions``: the
    text encoder's ``max_position_embeddings`` when known (``model_max_length`` may not exceed it;
    default CLIP's)."""
    return check_tokenizer(folder, max_positions)[1]


def check_tokenizer(folder: Path, max_positions: int | None = None) -> tuple[ClipTokenizer | None, list[str]]:
    """``(tokenizer, [])`` when the folder loads, else ``(None, problems)`` as ``tokenizer_problems``
    gives them: one parse of tokenizer.json serves both the check and the load."""
    tok, settings, problems = _load(Path(folder), max_positions)
    return (ClipTokenizer._from_loaded(tok, settings) if tok is not None else None), problems  # None on problems


def _text_problem(label: str, prompt) -> str | None:
    if isinstance(prompt, (bytes, bytearray)):
        return f"{label} is bytes, not text; decode it first (e.g. prompt.decode('utf-8'))"
    if not isinstance(prompt, str):
        return f"{label} must be a string, got {type(prompt).__name__}"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"{label} contains a character that is not valid Unicode text (lone surrogate "
            f"U+{ord(prompt[e.start]):04X} at position {e.start}); remove it or re-encode the text as UTF-8"
        )
    return None


class ClipTokenizer:
    """``encode(prompts) -> int64 array [len(prompts), max_length]``; thread-safe after load."""

    def __init__(self, folder: str | Path, max_positions: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"tokenizer folder {folder} is missing; re-export the model")
        tok, settings, problems = _load(folder, max_positions)
        if problems:
            raise ModelFolderError(
                f"tokenizer folder {folder} cannot be loaded: {'; '.join(problems)} "
                "(fix these files or re-export the model)"
            )
        assert tok is not None  # _load returns a tokenizer whenever it finds no problem
        self._setup(tok, settings)

    @classmethod
    def _from_loaded(cls, tok: Tokenizer, settings: dict) -> ClipTokenizer:
        self = cls.__new__(cls)
        self._setup(tok, settings)
        return self

    def _setup(self, tok: Tokenizer, settings: dict) -> None:
        self._tok = tok
        self.max_length = settings["max_length"]
        self.pad_token = settings["pad_token"]
        self.pad_id = tok.token_to_id(self.pad_token)
        self.eos_id = tok.token_to_id(settings["eos_token"])
        self._tok.enable_truncation(max_length=self.max_length)
        self._tok.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token, length=self.max_length)

    def encode(self, prompts: list[str], labels: list[str] | None = None) -> np.ndarray:
        """``labels`` name the prompts in errors and warnings (default ``prompt 1``, ``prompt 2``, ...)."""
        labels = labels or [f"prompt {i + 1}" for i in range(len(prompts))]
        encodings = []
        # one by one: encode_batch hands a few prompts to tokenizers' thread pool, whose wake-up
        # costs more than the work and competes with the engine's threads
        for label, prompt in zip(labels, prompts, strict=True):
            if not isinstance(prompt, str):
                raise InvalidArgumentError(_text_problem(label, prompt))
            try:
                enc = self._tok.encode(prompt)
            except (TypeError, UnicodeError):  # tokenizers: "TextInputSequence must be str"
                problem = _text_problem(label, prompt)
                if problem is None:
                    raise
                raise InvalidArgumentError(problem) from None
            if enc.overflowing:
                self._warn_truncated(label, prompt, enc)
            encodings.append(enc)
        return np.asarray([e.ids for e in encodings], dtype=np.int64)

    def _warn_truncated(self, label: str, prompt: str, enc) -> None:
        # The overflowing encodings hold the dropped tokens (stride 0: each once), with offsets
        # into the prompt as given: the warning quotes the user's text, not BPE pieces.
        dropped, start = 0, None
        for o in enc.overflowing:
            for (begin, _), special, attended in zip(o.offsets, o.special_tokens_mask, o.attention_mask):
                if attended and not special:
                    dropped += 1
                    start = begin if start is None else start
        tail = prompt[start or 0 :]  # start is None only if every dropped token is a template one
        snippet = " ".join(tail[: 2 * _SNIPPET].split())  # one line: whitespace runs as one space
        if len(snippet) > _SNIPPET or len(tail) > 2 * _SNIPPET:  # cut at a word, as the user typed it
            cut = snippet[: _SNIPPET - 4]
            snippet = (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip() + " ..."
        logger.warning(
            '%s is longer than the model\'s %d tokens: %d token%s dropped, starting at "%s" '
            "(shorten the prompt to %d tokens or move what matters to its start)",
            label, self.max_length, dropped, "" if dropped == 1 else "s", snippet, self.max_length,
        )  # fmt: skip
