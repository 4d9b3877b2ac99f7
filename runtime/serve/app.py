"""``edgediff serve``: AUTOMATIC1111's HTTP API (``/sdapi/v1/...``) on FastAPI, over the configured model folders.

    from edgediff.runtime.serve import create_app
    app = create_app(["sd15-onnx"])           # then: uvicorn.run(app, host="127.0.0.1", port=7860)

Security (desktop_api.md §6): the CLI binds 127.0.0.1 unless ``--listen``; ``api_auth`` ("user:pass,...") puts HTTP
Basic on every route, compared in constant time; the Host header must be a loopback name unless listening (DNS
rebinding); a request with an ``Origin`` not in ``cors_origins`` is refused and no CORS header is sent unless
configured; POST bodies must be JSON and at most ``Limits.max_body_bytes``; no route takes a path or a URL, and
models are chosen by title among the configured folders only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import parameters
from ..errors import EdgediffError, InvalidArgumentError
from ..pipeline import Pipeline
from . import a1111
from .a1111 import ApiError, Limits
from .jobs import QueueFull, Worker
from .preview import latent_preview

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
SCHEDULES = [("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
             ("beta", "Beta"), ("sgm_uniform", "SGM Uniform")]  # fmt: skip


def _error(status: int, detail: str, error: str = "HTTPException") -> JSONResponse:
    """A1111's error body (``api_middleware.handle_exception``), with a message that names the field."""
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": detail}, status_code=status)


class Server:
    """The model folders a server was started with (by A1111 title), their pipelines (loaded on first use, once),
    the one selected, and the worker that runs the jobs."""

    def __init__(self, models: Sequence[str | Path | None], limits: Limits, max_queue: int, engine_options: dict,
                 workers: int = 1):  # fmt: skip
        self.limits = limits
        self.folders: dict[str, Path] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self._options = engine_options
        for model in models or [None]:
            pipe = Pipeline.load(model, **engine_options)  # validates the folder at start
            title = a1111.model_title(pipe)
            self.folders[title], self.pipelines[title] = pipe.folder.path, pipe
        self.current = next(iter(self.folders))
        self.worker = Worker(max_queue, workers)

    def pipeline(self, title: str | None = None) -> Pipeline:
        return self.pipelines[self.title_for(title) if title else self.current]

    def title_for(self, name) -> str:
        """A configured model by its title, its folder name, or the title without the hash."""
        if isinstance(name, str):
            for title, path in self.folders.items():
                if name in (title, path.name, title.split(" [")[0]):
                    return title
        raise ApiError(422, f"sd_model_checkpoint {name!r} is not one of the models this server was started with: "
                            f"{', '.join(self.folders)}")  # fmt: skip

    def close(self) -> None:
        for pipe in self.pipelines.values():
            pipe.close()


def create_app(models: Sequence[str | Path | None] = (), api_auth: str | None = None, limits: Limits | None = None,
               listen: bool = False, cors_origins: Sequence[str] = (), max_queue: int = 8, workers: int = 1,
               **engine_options) -> FastAPI:  # fmt: skip
    """The FastAPI application serving ``models`` (model folders; none: the embedded model); ``workers``
    generations at a time (default one)."""
    limits = limits or Limits()
    server = Server(list(models), limits, max_queue, engine_options, workers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(title="edgediff", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    credentials = _parse_auth(api_auth)
    if not listen:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip

    app.add_middleware(_Guard, credentials=credentials, cors_origins=tuple(cors_origins),
                       max_body=limits.max_body_bytes)  # fmt: skip

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.detail)

    @app.exception_handler(EdgediffError)
    async def edgediff_error(request: Request, e: EdgediffError):
        status = 422 if isinstance(e, InvalidArgumentError) else 500
        return _error(status, str(e), type(e).__name__)

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is over the {limits.max_body_bytes} bytes the server takes")
        try:
            return json.loads(raw or b"null")
        except ValueError as e:
            raise ApiError(422, f"the request body is not valid JSON ({e})") from None

    async def generate(request: Request, mode: str):
        body = await body_of(request)
        overrides = (body.get("override_settings") or {}) if isinstance(body, dict) else {}
        checkpoint = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
        pipe = server.pipeline(checkpoint)
        p = a1111.plan(body, pipe, limits, mode)
        try:
            state, future = server.worker.submit(lambda st: a1111.run(pipe, p, st), job=f"scripts_{mode}")
        except QueueFull as e:
            raise ApiError(503, str(e)) from None
        waiting = asyncio.wrap_future(future)
        while not waiting.done():  # a client that goes away does not leave its job running for nobody
            await asyncio.wait([waiting], timeout=0.25)
            if not waiting.done() and await request.is_disconnected():
                if not future.cancel():  # already running: stop it at its next step
                    state.interrupted.set()
                with contextlib.suppress(BaseException):
                    await waiting
                raise ApiError(499, "the client went away; the job was cancelled")
        made = waiting.result()
        result = await run_in_threadpool(a1111.response, p, made, pipe, bool(body.get("send_images", True)))
        return result

    @app.get("/edgediff/v1/health")
    async def health():
        """For load balancers and Ray: the process that answered, its models, and its queue."""
        return {"ok": True, "pid": os.getpid(), "models": list(server.folders), "queued": server.worker.queued(),
                "busy": server.worker.current is not None, "jobs_finished": server.worker.finished}  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def page():
        """The web page: a prompt, the settings, an image to edit with a mask drawn by hand, the live preview."""
        return (resources.files(__package__) / "page.html").read_text(encoding="utf-8")

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate(request, "img2img")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        state = server.worker.current
        if state is None:
            idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                    "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
            return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None,
                    "current_task": None}  # fmt: skip
        fraction = state.fraction()
        elapsed = max(0.0, time.time() - state.started)
        image = None
        if not skip_current_image and state.denoised is not None:
            image = await run_in_threadpool(_preview_png, state.pipeline or server.pipeline(), state.denoised)
        return {
            "progress": fraction, "eta_relative": elapsed / fraction - elapsed,
            "state": {"skipped": state.skipped.is_set(), "interrupted": state.interrupted.is_set(),
                      "stopping_generation": False, "job": state.job, "job_count": state.job_count,
                      "job_timestamp": state.timestamp, "job_no": state.job_no,
                      "sampling_step": state.sampling_step, "sampling_steps": state.sampling_steps},
            "current_image": image, "textinfo": None, "current_task": state.id,
        }  # fmt: skip

    def progress_now(skip_current_image: bool = True) -> dict:
        state = server.worker.current
        if state is None:
            return {"active": False, "queued": server.worker.queued(), "progress": 0.0}
        out = {"active": True, "queued": server.worker.queued(), "id": state.id, "progress": state.fraction(),
               "job_no": state.job_no, "job_count": state.job_count, "sampling_step": state.sampling_step,
               "sampling_steps": state.sampling_steps}  # fmt: skip
        if not skip_current_image and state.denoised is not None:
            out["current_image"] = _preview_png(state.pipeline or server.pipeline(), state.denoised)
        return out

    @app.get("/edgediff/v1/progress/stream")
    async def progress_stream(request: Request, previews: bool = False, interval: float = 0.5):
        """Server-sent events: one ``data:`` JSON line per ``interval`` seconds (at least 0.1) with the running
        job's progress (and its preview with ``previews=true``), until the client goes away."""
        interval = min(max(interval, 0.1), 10.0)

        async def events():
            while not await request.is_disconnected():
                now = await run_in_threadpool(progress_now, not previews)
                yield f"data: {json.dumps(now)}\n\n"
                await asyncio.sleep(interval)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        state = server.worker.current
        if state is not None:
            state.interrupted.set()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        state = server.worker.current
        if state is not None:
            state.skipped.set()
        return None

    @app.get("/sdapi/v1/options")
    async def get_options():
        pipe = server.pipeline()
        return {"sd_model_checkpoint": server.current, "sd_checkpoint_hash": parameters.model_hash(pipe.folder),
                "samples_format": "png"}  # fmt: skip

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise ApiError(422, "the options body must be a JSON object")
        if "sd_model_checkpoint" in body:  # the only setting a request may change; nothing is persisted
            server.current = server.title_for(body["sd_model_checkpoint"])
        return None

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        out = []
        for title, path in server.folders.items():
            full = parameters.model_hash(server.pipelines[title].folder)
            out.append({"title": title, "model_name": path.name, "hash": (full or "")[:10] or None, "sha256": full,
                        "filename": path.name, "config": None})  # fmt: skip
        return out

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        out = []
        for name in parameters.A1111_SAMPLER_NAMES:
            edgediff_name, options = parameters.from_a1111(name, None)
            scheduler = parameters.a1111_schedule_type(*a1111._class_and_config(
                {**parameters.name_spec(edgediff_name), **options}))  # fmt: skip
            out.append({"name": name, "aliases": [edgediff_name],
                        "options": {"scheduler": scheduler.lower()} if scheduler else {}})  # fmt: skip
        return out

    @app.get("/sdapi/v1/schedulers")
    async def schedules():
        return [{"name": n, "label": label, "aliases": None, "default_rho": 7.0 if n == "karras" else -1.0,
                 "need_inner_model": False} for n, label in SCHEDULES]  # fmt: skip

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        body = await body_of(request)
        image = a1111.decode_image(body.get("image") if isinstance(body, dict) else None, "image", limits)
        text = image.info.get(parameters.TEXT_KEY) or ""
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != parameters.TEXT_KEY}
        return {"info": text, "items": items, "parameters": _parse_infotext(text) if text else {}}

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        return None

    @app.get("/sdapi/v1/loras")
    async def loras():  # A1111's list (the Lora extension's): the LoRAs the selected model was started with
        return [{"name": Path(file).stem, "alias": Path(file).stem, "path": file, "metadata": {}, "scale": scale}
                for file, scale in server.pipeline().loras]  # fmt: skip

    # stubs the clients call when they connect (desktop_api.md §1.1)
    stubs: dict[str, Any] = {
        "scripts": {"txt2img": [], "img2img": []}, "sd-vae": [], "hypernetworks": [],
        "latent-upscale-modes": [], "prompt-styles": [], "face-restorers": [], "realesrgan-models": [],
        "embeddings": {"loaded": {}, "skipped": {}}, "cmd-flags": {},
        "upscalers": [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}],
    }  # fmt: skip
    for route, value in stubs.items():
        app.add_api_route(f"/sdapi/v1/{route}", (lambda v=value: v), methods=["GET"])

    return app


class _Guard:
    """The checks every request passes before a route sees it (pure ASGI, so that a route can still tell when its
    client goes away): Origin, Basic auth, and for POST the body's declared size and JSON content type."""

    def __init__(self, app, credentials: list[tuple[str, str]], cors_origins: tuple[str, ...], max_body: int):
        self.app, self.credentials, self.cors_origins, self.max_body = app, credentials, cors_origins, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            response = self._refusal(Request(scope))
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> JSONResponse | None:
        origin = request.headers.get("origin")
        own = {f"{scheme}://{request.headers.get('host', '')}" for scheme in ("http", "https")}  # the page at /
        if origin is not None and origin not in self.cors_origins and origin not in own:
            return _error(403, f"requests from the origin {origin!r} are not allowed (--cors-allow-origins)")
        if self.credentials and not _authorized(request.headers.get("authorization"), self.credentials):
            response = _error(401, "Incorrect username or password")
            response.headers["WWW-Authenticate"] = "Basic"
            return response
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                return _error(413, f"the request body is {int(length)} bytes, over the {self.max_body} the server "
                                   "takes")  # fmt: skip
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            empty = length in (None, "0") and "transfer-encoding" not in request.headers  # interrupt, skip: no body
            if kind != "application/json" and not empty:
                return _error(415, f"POST bodies must be application/json, got {kind or 'no content type'!r}")
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int | None = None):
    """Run ``app`` on uvicorn in a background thread (tests, the load benchmark); yields the port, stops on exit."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _parse_auth(api_auth: str | None) -> list[tuple[str, str]]:
    if not api_auth:
        return []
    pairs = []
    for item in api_auth.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise InvalidArgumentError(f"--api-auth takes user:password[,user:password...], got {item!r}")
        pairs.append((user, password))
    return pairs


def _authorized(header: str | None, credentials: list[tuple[str, str]]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    ok = False
    for u, p in credentials:  # every pair compared, in constant time
        ok |= secrets.compare_digest(u.encode(), user.encode()) & secrets.compare_digest(p.encode(), password.encode())
    return ok


def _preview_png(pipe: Pipeline, denoised) -> str:
    """The live preview as base64 PNG at the output size: the tiny decoder's image when the folder has one, else
    the latent->RGB approximation scaled up by the VAE's factor."""
    latents = denoised()
    if pipe.folder.has_tiny_vae:
        image = pipe.decode(latents, "tiny")[0]
    else:
        small = latent_preview(latents, pipe.folder.family.name)
        f = pipe.folder.vae_downscale
        image = small.resize((small.width * f, small.height * f), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _parse_infotext(text: str) -> dict[str, str]:
    """A1111's ``parse_generation_parameters`` as far as clients read it: Prompt, Negative prompt, each
    ``Key: value`` as a string, Size split into Size-1 and Size-2."""
    lines = text.strip().split("\n")
    *head, last = lines if len(lines) > 1 else (lines + [""])
    out: dict[str, str] = {}
    prompt, negative = [], []
    for line in head:
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out["Prompt"], out["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    for key, value in parameters.INFOTEXT_PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        out[key.strip()] = value
    if "Size" in out and "x" in out["Size"]:
        out["Size-1"], out["Size-2"] = out["Size"].split("x", 1)
    return out
