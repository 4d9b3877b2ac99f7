"""`edgediff serve` against a real AUTOMATIC1111 API client (webuiapi 0.9.17 from PyPI), on a server started here
on 127.0.0.1 and a free port with the embedded model: txt2img, img2img, inpainting, progress with a preview,
interrupt, the listings, png-info; the images equal the Python API's for the same seeds. Bad requests get a 4xx that
names the field, and the next good request succeeds. Loopback only."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from edgediff.runtime import Pipeline
from parity import mask_for, picture

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def server():
    from edgediff.runtime.serve import create_app
    from edgediff.runtime.serve.app import serve_in_thread

    app = create_app([])
    with serve_in_thread(app) as port:
        yield port, app


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server[0], sampler="Euler a", steps=4)


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load() as p:
        yield p


def _post(server, route: str, body, **kw):
    return requests.post(f"http://127.0.0.1:{server[0]}/sdapi/v1/{route}", json=body, timeout=120, **kw)


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# -- generation ---------------------------------------------------------------------------------------------------
def test_txt2img_batch_has_per_image_seeds_and_equals_the_python_api(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=42, steps=4, width=64, height=64, batch_size=2, cfg_scale=7.0)
    assert len(result.images) == 2
    assert result.info["all_seeds"] == [42, 43] and len(result.info["infotexts"]) == 2
    assert "Seed: 43" in result.info["infotexts"][1] and "Sampler: Euler a" in result.info["infotexts"][0]
    want = pipe(PROMPT, num_inference_steps=4, width=64, height=64, guidance_scale=7.0, scheduler="euler_a",
                seeds=[42, 43], num_images_per_prompt=2).images  # fmt: skip
    assert all(_same(g, w) for g, w in zip(result.images, want))
    again = api.txt2img(prompt=PROMPT, seed=42, steps=4, width=64, height=64, batch_size=2, cfg_scale=7.0)
    assert _same(again.images[0], result.images[0])


def test_n_iter_continues_the_seeds(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=7, steps=3, width=64, height=64, n_iter=2, sampler_name="DPM++ 2M")
    assert result.info["all_seeds"] == [7, 8]
    for seed, image in zip((7, 8), result.images):
        want = pipe(PROMPT, num_inference_steps=3, width=64, height=64, guidance_scale=7.0,
                    scheduler="dpmpp_2m_karras", seed=seed).images[0]  # fmt: skip
        assert _same(image, want)  # A1111's "Automatic" schedule for DPM++ 2M is Karras


def test_img2img_and_inpainting_equal_the_python_api(api, pipe):
    image, mask = picture(64, 64), mask_for(64, 64)
    got = api.img2img(images=[image], prompt=PROMPT, denoising_strength=0.6, seed=5, steps=5, width=64, height=64,
                      sampler_name="Euler", cfg_scale=5.0)  # fmt: skip
    want = pipe(PROMPT, image=image, strength=0.6, seed=5, num_inference_steps=5, guidance_scale=5.0,
                scheduler="euler").images[0]  # fmt: skip
    assert _same(got.image, want) and got.info["denoising_strength"] == 0.6
    got = api.img2img(images=[image], mask_image=mask, prompt=PROMPT, denoising_strength=1.0, seed=6, steps=5,
                      width=64, height=64, sampler_name="Euler", cfg_scale=5.0, inpaint_full_res=False,
                      mask_blur=0)  # fmt: skip
    want = pipe(PROMPT, image=image, mask_image=mask, strength=1.0, seed=6, num_inference_steps=5, guidance_scale=5.0,
                scheduler="euler").images[0]  # fmt: skip
    assert _same(got.image, want)


def test_progress_has_a_preview_and_interrupt_returns_the_partial_image(api, server):
    result: dict = {}

    def job():
        result["r"] = api.txt2img(prompt=PROMPT, seed=1, steps=150, width=256, height=256)

    thread = threading.Thread(target=job)
    thread.start()
    seen = None
    deadline = time.time() + 60
    while time.time() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress with a preview while the job ran"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150 and seen["eta_relative"] >= 0
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size == (256, 256)
    api.interrupt()
    thread.join(60)
    assert len(result["r"].images) == 1 and result["r"].images[0].size == (256, 256)  # 200 with what it had
    stopped = server[1].state.server.worker.last
    assert stopped.interrupted.is_set() and stopped.sampling_step < 150  # it did stop early
    idle = api.get_progress()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0  # what util_wait_for_ready waits for


def test_concurrent_clients_get_their_own_images(server, pipe):
    results: dict = {}

    def job(seed):
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server[0])
        results[seed] = api.txt2img(prompt=PROMPT, seed=seed, steps=3, width=64, height=64, sampler_name="Euler")

    threads = [threading.Thread(target=job, args=(s,)) for s in (11, 12, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for seed, r in results.items():
        want = pipe(PROMPT, num_inference_steps=3, width=64, height=64, guidance_scale=7.0, scheduler="euler",
                    seed=seed).images[0]  # fmt: skip
        assert r.info["all_seeds"] == [seed] and _same(r.image, want)
    assert len(results) == 3


# -- listings and settings ----------------------------------------------------------------------------------------
def test_listings_options_and_png_info(api):
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert {"automatic", "karras", "exponential"} <= {s["name"] for s in api.get_schedulers()}
    [title] = api.util_get_model_names()
    assert api.get_options()["sd_model_checkpoint"] == title and title.startswith("shapes [")
    assert api.set_options({"sd_model_checkpoint": title}) is None
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    raw = api.txt2img(prompt=PROMPT, seed=42, steps=2, width=64, height=64).json["images"][0]
    # the PNG as sent (webuiapi's png_info re-encodes a PIL image, which drops its text chunks)
    info = requests.post(f"{api.baseurl}/png-info", json={"image": "data:image/png;base64," + raw}, timeout=30).json()
    assert info["parameters"]["Seed"] == "42" and info["parameters"]["Prompt"] == PROMPT
    assert info["parameters"]["Size-1"] == "64" and info["info"].startswith(PROMPT) and "edgediff" in info["items"]
    assert api.png_info(picture(8, 8)).parameters == {}  # no parameters chunk: an empty parse, not an error


# -- bad input ----------------------------------------------------------------------------------------------------
GOOD = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "seed": 3}


@pytest.mark.parametrize(
    ("route", "body", "status", "detail"),
    [
        ("txt2img", {**GOOD, "steps": "many"}, 422, "steps must be an integer"),
        ("txt2img", {**GOOD, "steps": 10_000}, 422, "steps must be an integer 1..150"),
        ("txt2img", {**GOOD, "batch_size": 8, "n_iter": 4}, 422, "batch_size x n_iter is 32"),
        ("txt2img", {**GOOD, "width": 60}, 422, "width must be a positive multiple of 16"),
        ("txt2img", {**GOOD, "sampler_name": "Restart"}, 404, "Sampler not found"),
        ("txt2img", {**GOOD, "enable_hr": True}, 422, "enable_hr: hires fix is not supported"),
        ("txt2img", {**GOOD, "seed": "abc"}, 422, "seed must be an integer"),
        ("txt2img", {**GOOD, "override_settings": {"sd_model_checkpoint": "nope"}}, 422, "sd_model_checkpoint 'nope'"),
        ("img2img", dict(GOOD), 404, "Init image not found"),
        ("img2img", {**GOOD, "init_images": ["@@not base64@@"]}, 422, "init_images[0] is not valid base64"),
        ("img2img", {**GOOD, "init_images": [base64.b64encode(b"hello").decode()]}, 422,
         "init_images[0] is not an image"),
        ("img2img", {**GOOD, "init_images": ["https://example.com/a.png"]}, 422, "image URLs are not fetched"),
        ("options", {"sd_model_checkpoint": "other"}, 422, "sd_model_checkpoint 'other'"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field_and_the_server_goes_on(server, route, body, status, detail):
    r = _post(server, route, body)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"] and set(r.json()) == {"error", "detail", "body", "errors"}
    assert _post(server, "txt2img", GOOD).status_code == 200


def test_bad_images_masks_and_payloads(server):
    image = base64.b64encode(_png(picture(64, 64))).decode()
    small_mask = base64.b64encode(_png(mask_for(32, 32))).decode()
    r = _post(server, "img2img", {**GOOD, "init_images": [image], "mask": small_mask, "inpaint_full_res": False})
    assert r.status_code == 422 and "mask is 32x32 but init_images[0] is 64x64" in r.json()["detail"]
    full = base64.b64encode(_png(mask_for(64, 64))).decode()
    r = _post(server, "img2img", {**GOOD, "init_images": [image], "mask": full})  # webuiapi's default: True
    assert r.status_code == 422 and r.json()["detail"].startswith("inpaint_full_res:")
    url = f"http://127.0.0.1:{server[0]}/sdapi/v1/txt2img"
    r = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = requests.post(url, data=json.dumps(GOOD), headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415  # a cross-site form cannot send JSON
    r = requests.post(url, json=GOOD, headers={"Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 403
    r = requests.get(f"http://127.0.0.1:{server[0]}/sdapi/v1/options", headers={"Host": "evil.example"}, timeout=30)
    assert r.status_code == 400  # DNS rebinding: not a loopback host name
    ai_render = {"prompt": PROMPT, "negative_prompt": "", "width": 64, "height": 64, "seed": 9, "cfg_scale": 7,
                 "steps": 2, "sampler_index": "Euler", "image_similarity": 0.4, "sampler": "Euler",
                 "denoising_strength": 0.6, "init_images": ["data:image/png;base64," + image]}  # fmt: skip
    assert _post(server, "img2img", ai_render).status_code == 200  # unknown keys are ignored, as A1111 does
    assert requests.get(f"http://127.0.0.1:{server[0]}/sdapi/v1/server-kill", timeout=30).status_code == 404


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_basic_auth_on_every_route():
    from fastapi.testclient import TestClient

    from edgediff.runtime.serve import create_app

    client = TestClient(create_app([], api_auth="ann:secret"), base_url="http://127.0.0.1")
    r = client.get("/sdapi/v1/options")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic"
    assert client.get("/sdapi/v1/options", auth=("ann", "wrong")).status_code == 401
    assert client.get("/sdapi/v1/options", auth=("ann", "secret")).status_code == 200
    with pytest.raises(ValueError, match="--api-auth takes user:password"):
        create_app([], api_auth="nocolon")


def test_body_and_image_limits():
    from fastapi.testclient import TestClient

    from edgediff.runtime.serve import Limits, create_app

    client = TestClient(create_app([], limits=Limits(max_body_bytes=2000)), base_url="http://127.0.0.1")
    r = client.post("/sdapi/v1/txt2img", json={**GOOD, "prompt": "x" * 3000})
    assert r.status_code == 413 and "over the 2000" in r.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json=GOOD).status_code == 200
    client = TestClient(create_app([], limits=Limits(max_image_pixels=32 * 32)), base_url="http://127.0.0.1")
    big = base64.b64encode(_png(picture(40, 40))).decode()
    r = client.post("/sdapi/v1/png-info", json={"image": big})
    assert r.status_code == 422 and "40x40, over the 1024 pixels" in r.json()["detail"]
    small = base64.b64encode(_png(picture(8, 8))).decode()
    assert client.post("/sdapi/v1/png-info", json={"image": small}).status_code == 200


def test_a_client_that_goes_away_stops_its_job(server):
    """A request abandoned mid-job (the client's timeout closes the connection) interrupts the job, which frees
    the worker for the next request."""
    worker = server[1].state.server.worker
    body = {**GOOD, "steps": 150, "width": 256, "height": 256}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"http://127.0.0.1:{server[0]}/sdapi/v1/txt2img", json=body, timeout=1.0)
    deadline = time.time() + 60
    while worker.current is not None and time.time() < deadline:
        time.sleep(0.05)
    assert worker.current is None and worker.last is not None and worker.last.interrupted.is_set()
    assert worker.last.sampling_step < 150  # stopped before its end
    assert _post(server, "txt2img", GOOD).status_code == 200


def test_progress_stream_sends_events_while_a_job_runs(api, server):
    thread = threading.Thread(target=lambda: api.txt2img(prompt=PROMPT, seed=2, steps=60, width=128, height=128))
    url = f"http://127.0.0.1:{server[0]}/edgediff/v1/progress/stream?interval=0.1&previews=true"
    with requests.get(url, stream=True, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        thread.start()
        events = []
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if event["active"] and event.get("current_image"):
                    events.append(event)
                if len(events) == 2:
                    break
    thread.join(60)
    assert all(0 < e["progress"] <= 1 and e["sampling_steps"] == 60 for e in events)
    assert Image.open(io.BytesIO(base64.b64decode(events[0]["current_image"]))).size == (128, 128)


def test_load_script_runs_clean():
    """benchmarks/serve_load.py, bounded: every request completes, none fails (its figures are not judged here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from serve_load import run

    result = run(clients=2, requests=2, size=64, steps=2, model=None)
    assert result["completed"] == 4 and result["failures"] == 0
    assert result["latency_s"]["min"] <= result["latency_s"]["p50"] <= result["latency_s"]["max"]


def test_web_page_generates_with_a_live_preview_and_edits_with_a_drawn_mask(server, tmp_path):
    """The page at / in headless Chromium (Debian's, which the README's test command installs): a prompt typed,
    the live preview shown while it generates, the result with its parameters; then an image loaded, a mask drawn
    by hand on it, and the edit sent to img2img with that mask."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium; the README's test command installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server[0]}/")
            page.wait_for_function("document.getElementById('sampler').options.length > 0")
            page.fill("#prompt", PROMPT)
            for field, value in (("#width", "256"), ("#height", "256"), ("#steps", "120"), ("#seed", "4")):
                page.fill(field, value)
            page.click("#generate")
            page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')",
                                   timeout=60_000)  # fmt: skip
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=120_000)
            assert page.get_attribute("#result", "src").startswith("data:image/png;base64,")
            assert "Seed: 4" in page.inner_text("#params")

            picture(64, 64).save(tmp_path / "in.png")
            page.set_input_files("#image", str(tmp_path / "in.png"))
            page.wait_for_function("document.getElementById('canvas').width === 64")
            box = page.locator("#canvas").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
            page.mouse.up()
            page.fill("#steps", "4")
            with page.expect_request("**/sdapi/v1/img2img") as sent:
                page.click("#generate")
            body = sent.value.post_data_json
            assert body["init_images"][0].startswith("data:image/png;base64,") and body["mask"]
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=120_000)
            mask = np.asarray(a1111_image(body["mask"]).convert("L"))
            assert mask.shape == (64, 64) and 0 < (mask > 127).mean() < 0.6  # drawn by hand: some of it, not all
        finally:
            browser.close()


def a1111_image(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_interrupt_affects_only_the_running_job(server):
    """Two requests: the running one interrupted mid-way returns its partial image; the one queued behind it runs
    whole (interrupt is A1111's: the current job's)."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server[0])
    worker = server[1].state.server.worker
    out: dict = {}

    def run(key, **kw):
        out[key] = api.txt2img(prompt=PROMPT, **kw)

    long = threading.Thread(target=run, args=("a",), kwargs=dict(seed=1, steps=150, width=256, height=256))
    long.start()
    while worker.current is None or worker.current.sampling_step < 2:
        time.sleep(0.02)
    first = worker.current
    queued = threading.Thread(target=run, args=("b",), kwargs=dict(seed=2, steps=5, width=64, height=64))
    queued.start()
    while worker.queued() == 0 and queued.is_alive():
        time.sleep(0.01)
    api.interrupt()
    long.join(120)
    queued.join(120)
    assert first.interrupted.is_set() and first.sampling_step < 150
    assert worker.last is not first and not worker.last.interrupted.is_set() and worker.last.sampling_step == 5
    assert len(out["a"].images) == 1 and len(out["b"].images) == 1


def test_skip_moves_to_the_next_batch(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server[0])
    worker = server[1].state.server.worker
    out: dict = {}

    def job():
        out["r"] = api.txt2img(prompt=PROMPT, seed=30, steps=150, width=256, height=256, n_iter=2)

    thread = threading.Thread(target=job)
    thread.start()
    while worker.current is None or worker.current.sampling_step < 2:
        time.sleep(0.02)
    api.skip()
    while worker.current is not None and worker.current.job_no == 0:
        time.sleep(0.02)
    api.interrupt()  # the second batch too, to keep the test short
    thread.join(120)
    assert out["r"].info["all_seeds"] == [30, 31] and len(out["r"].images) == 2
    skipped, interrupted = worker.last.steps_done
    assert skipped < 150 and interrupted < 150  # the first batch was cut short by skip, the second ran after it


def test_an_engine_failure_is_a_500_and_the_next_job_runs(server, monkeypatch):
    from edgediff.runtime.errors import EngineRunError

    pipe = server[1].state.server.pipeline()
    unet = pipe.engines["unet"]
    real = unet.run
    calls = {"n": 0}

    def failing(feeds):
        calls["n"] += 1
        if calls["n"] == 1:
            raise EngineRunError("unet failed on this call (a test's injected failure)")
        return real(feeds)

    monkeypatch.setattr(unet, "run", failing)
    r = _post(server, "txt2img", GOOD)
    assert r.status_code == 500 and "injected failure" in r.json()["detail"] and r.json()["error"] == "EngineRunError"
    assert _post(server, "txt2img", GOOD).status_code == 200


def test_model_switching_among_the_configured_folders(tmp_path):
    from pathlib import Path

    from fastapi.testclient import TestClient

    from edgediff.runtime.serve import create_app

    micro = Path(__file__).parent / "fixtures" / "micro-sd1"
    client = TestClient(create_app([None, micro]), base_url="http://127.0.0.1")
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert len(titles) == 2 and titles[1].startswith("micro-sd1 [")
    assert all("/" not in m["filename"] for m in client.get("/sdapi/v1/sd-models").json())  # names, never paths
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "micro-sd1"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[1]
    body = {**GOOD, "width": 32, "height": 32}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sd_model_name"] == "micro-sd1"
    body["override_settings"] = {"sd_model_checkpoint": titles[0]}  # one request on the other model
    info = json.loads(client.post("/sdapi/v1/txt2img", json={**body, "width": 64, "height": 64}).json()["info"])
    assert info["sd_model_name"] == "shapes"


def test_two_workers_run_two_generations_at_once(pipe):
    from edgediff.runtime.serve import create_app
    from edgediff.runtime.serve.app import serve_in_thread

    app = create_app([], workers=2)
    with serve_in_thread(app) as port:
        worker = app.state.server.worker
        out: dict = {}

        def job(seed):
            out[seed] = webuiapi.WebUIApi(host="127.0.0.1", port=port).txt2img(
                prompt=PROMPT, seed=seed, steps=60, width=128, height=128, sampler_name="Euler")  # fmt: skip

        jobs = [threading.Thread(target=job, args=(s,)) for s in (51, 52)]
        for t in jobs:
            t.start()
        both = False
        while any(t.is_alive() for t in jobs):
            both |= len(worker.running) == 2
            time.sleep(0.01)
        assert both, "the two jobs never ran at the same time"
        for seed, r in out.items():  # and each is still exactly its own image
            want = pipe(PROMPT, num_inference_steps=60, width=128, height=128, guidance_scale=7.0,
                        scheduler="euler", seed=seed).images[0]  # fmt: skip
            assert _same(r.image, want)
