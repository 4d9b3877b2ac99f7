"""What every benchmark result records about its own run: the command that made it and when."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def command_and_date(script: str, argv: list[str] | None) -> dict[str, str]:
    """``{"command": "python benchmarks/<script> <args>", "date": "YYYY-MM-DD HH:MM UTC"}``;
    ``argv`` None means the process's own arguments."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python", f"benchmarks/{Path(script).name}", *args]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
