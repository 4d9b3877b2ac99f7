"""Writing files and folders so that a reader never sees half of one: a temporary beside the
target, then a rename (atomic within one filesystem). Used by PNG and JSON output, export,
``edgediff build`` and ``edgediff optimize``."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputPathError

logger = logging.getLogger(__name__)


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can be written at ``path`` (its folder may not exist
    yet: write_atomic creates it). Raises OutputPathError naming the path and the reason."""
    text = os.fspath(path)
    path = Path(text)
    if not text.strip() or path.name in ("", ".", ".."):
        raise OutputPathError(f"the output path {text!r} names no file; give a file name such as out.png")
    if path.is_dir():
        raise OutputPathError(
            f"the output path {path} is an existing folder; give a file name such as {path / 'out.png'}"
        )
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a folder")
    try:  # the only reliable test (root ignores permission bits; read-only mounts): try it
        fd, probe = tempfile.mkstemp(prefix=".edgediff-probe.", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {ancestor} is not writable ({e.strerror or e})") from None
    return path


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Create ``path`` through a temporary file in the same folder, then rename: a reader never
    sees a half-written file. ``write`` is bytes or a callable that writes to a binary file.
    OS failures (no permission, disk full, a folder in the way) raise OutputPathError."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(write) if isinstance(write, bytes) else write(f)
        umask = os.umask(0)  # mkstemp creates 0600; give the file the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputPathError):
            raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    return path


def replace_dir(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``dst`` (beside it, same filesystem), replacing a folder
    already there. The old one is renamed aside to ``.<name>.old-<pid>`` first and renamed back if
    the second rename fails or is interrupted, so ``dst`` is always the old folder or the new one,
    never missing; the old one is deleted last (a failure to delete it is logged, not raised: the
    new folder is in place)."""
    tmp, dst = Path(tmp), Path(dst)
    if not os.path.lexists(dst):
        tmp.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)  # left by a killed process that had our pid
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(old):
        logger.warning("could not delete the replaced folder %s; delete it yourself", old)
