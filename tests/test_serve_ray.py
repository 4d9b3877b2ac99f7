"""`edgediff serve --ray`: a local Ray instance (loopback, dashboard off) runs two replicas of the app behind Ray
Serve's HTTP proxy; concurrent requests from the same client library (webuiapi) get their own, correct images, and
both replicas answer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import webuiapi

from edgediff.runtime import Pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def ray_server():
    import ray
    from ray import serve

    from edgediff.runtime.serve.app import free_port
    from edgediff.runtime.serve.ray_app import deploy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    port = free_port()
    try:
        deploy([], replicas=2, host="127.0.0.1", port=port)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_concurrent_clients(ray_server):
    import requests

    results: dict = {}

    def job(seed):
        api = webuiapi.WebUIApi(host="127.0.0.1", port=ray_server)
        results[seed] = api.txt2img(prompt=PROMPT, seed=seed, steps=20, width=64, height=64, sampler_name="Euler")

    threads = [threading.Thread(target=job, args=(s,)) for s in range(20, 26)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    finished = {}  # replica pid -> jobs it ran; idle replicas answer in turn (Ray breaks ties at random)
    for _ in range(40):
        health = requests.get(f"http://127.0.0.1:{ray_server}/edgediff/v1/health", timeout=60).json()
        finished[health["pid"]] = health["jobs_finished"]
    assert len(finished) == 2 and all(n >= 1 for n in finished.values()), finished  # both replicas generated
    assert sum(finished.values()) == 6
    print("jobs per replica:", finished)
    with Pipeline.load() as pipe:
        for seed, r in results.items():
            want = pipe(PROMPT, num_inference_steps=20, width=64, height=64, guidance_scale=7.0, scheduler="euler",
                        seed=seed).images[0]  # fmt: skip
            assert r.info["all_seeds"] == [seed]
            assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(want.convert("RGB")))
    assert len(results) == 6
