"""``edgediff serve``: a local HTTP server that speaks AUTOMATIC1111's API (``/sdapi/v1/...``), so the desktop
plugins and client libraries written for it drive edgediff. Needs the ``serve`` extra (FastAPI, uvicorn).

``a1111``: request fields -> a checked call plan, the job that runs it, the response; ``jobs``: the worker that runs
one generation at a time and the state ``/progress`` reads; ``preview``: the cheap latent->RGB preview; ``app``:
the routes and the security rules (module docstring)."""

from __future__ import annotations

from .a1111 import Limits


def create_app(*args, **kwargs):
    """``app.create_app``: imported on use, so ``edgediff.runtime.serve`` loads without FastAPI installed."""
    from .app import create_app as create

    return create(*args, **kwargs)


__all__ = ["Limits", "create_app"]
