"""The files made from a model folder's export (an engine's optimised or int8 variant, a compiled-model cache)
and the keys that say what they were made from: one place for the rule every engine follows, that a derived
file is used only while its key matches the source file, the library version and the machine, and is otherwise
reported and rebuilt or refused, never used blindly.

A key is a JSON object in a file beside the derived model (``key.json``, ``optimized.json``); its ``source``
entry is ``source_identity`` of the exported file it came from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def source_identity(source: Path) -> dict:
    """Size and mtime of a model file and of the weights beside it (ONNX external data, an IR's ``.bin``)."""
    files = [source, source.with_name(source.name + "_data"), source.with_name(source.name + ".data")]
    if source.suffix == ".xml":
        files.append(source.with_suffix(".bin"))
    return {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files if p.is_file()}


def read_key(path: Path) -> dict | None:
    """The key file's content, None when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def stale_entries(recorded: dict, current: dict) -> list[str]:
    """The entries of ``current`` that ``recorded`` does not match."""
    return [k for k in current if recorded.get(k) != current[k]]


def matching(key_path: Path, current: dict, component: str, kind: str, command: str) -> bool:
    """Whether the derived file (``kind``, e.g. "optimised variant") whose key is ``key_path`` may be used; a stale
    one is logged with the command that remakes it."""
    recorded = read_key(key_path)
    if recorded is None:
        return False
    stale = stale_entries(recorded, current)
    if stale:
        logger.warning("%s: ignoring the %s in %s (made for another %s); run `%s` again", component, kind,
                       key_path.parent, ", ".join(stale), command)  # fmt: skip
    return not stale
