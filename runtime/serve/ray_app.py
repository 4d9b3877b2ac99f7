"""``edgediff serve --ray``: the same application as a Ray Serve deployment, one pipeline per replica, behind Ray's
own HTTP proxy (no load balancer of ours). Needs the ``ray`` extra (``ray[serve]``).

    edgediff serve --ray --replicas 2 --model ./sd15-onnx     # a local Ray instance, or the cluster in RAY_ADDRESS

Each replica builds its own app (``app.create_app``: model folders, engines and its job worker) in its process; a
request reaches one replica through Ray's proxy and is answered by that replica's app, in-process. Generation
requests spread over the replicas; ``/progress``, ``/interrupt`` and ``/skip`` are each replica's own (A1111's
single global job does not exist across replicas): clients that poll progress should keep to one replica, or use
one replica per client.
"""

from __future__ import annotations

from typing import Any, cast

from ray import serve
from starlette.requests import Request
from starlette.responses import Response


# One generation at a time per replica (its job worker): at most one more request in flight, so that Ray's router
# queues the rest and hands them to the replica that frees up first, instead of stacking them on one replica.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2)
class EdgediffReplica:
    def __init__(self, models: list[str], options: dict[str, Any]):
        import httpx

        from .app import create_app

        self.app = create_app(models, listen=True, **options)  # Ray's proxy checks nothing: the app does
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://127.0.0.1")

    async def __call__(self, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        r = await self.client.request(request.method, request.url.path, params=dict(request.query_params),
                                      content=await request.body(), headers=headers, timeout=None)  # fmt: skip
        return Response(
            r.content,
            status_code=r.status_code,
            headers={k: v for k, v in r.headers.items() if k.lower() != "content-length"},
        )


def deploy(models: list[str], replicas: int, host: str = "127.0.0.1", port: int = 7860, **options) -> None:
    """Start (or join) Ray, then run ``replicas`` replicas behind Ray Serve's HTTP proxy on ``host:port``."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    replica = cast(Any, EdgediffReplica).options(num_replicas=replicas)
    serve.run(replica.bind([str(m) for m in models], options), name="edgediff", route_prefix="/")
