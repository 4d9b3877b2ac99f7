"""Torch-free: the committed tiny LoRA (tests/fixtures/lora/, a kohya LoCon on micro-sd1's UNet and text encoder)
applied by the lean runtime gives the latents and image diffusers recorded with it fused (record_goldens.py
--lora): latents within 3e-5 of their magnitude, the image within 1/255, as the other goldens. The same call
without it is recorded too, so the test also proves the LoRA moved the result far beyond the tolerance."""

from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime import Pipeline
from golden_cases import LORA_FILE, LORA_KW, LORA_PROMPT, LORA_SCALE, LORA_SCHEDULER, LORA_SEED

FIXTURES = Path(__file__).parent / "fixtures"
LATENT_RTOL = 3e-5


@pytest.fixture(scope="module")
def goldens():
    return dict(np.load(FIXTURES / "goldens_lora.npz"))


def _run(pipe):
    final = {}

    def keep(i, t, latents):
        final["latents"] = latents.copy()

    result = pipe(LORA_PROMPT, seed=LORA_SEED, scheduler=LORA_SCHEDULER, callback=keep, **LORA_KW)
    return final["latents"], np.stack([np.asarray(im) for im in result.images])


@pytest.mark.parametrize("label", ["with", "without"])
def test_committed_lora_equals_diffusers_fused(goldens, label):
    loras = [(FIXTURES / LORA_FILE, LORA_SCALE)] if label == "with" else None
    with Pipeline.load(FIXTURES / "micro-sd1", loras=loras) as pipe:
        latents, image = _run(pipe)
    want = goldens[f"lora/{label}/latents"]
    assert np.isfinite(latents).all() and np.isfinite(want).all()
    tolerance = LATENT_RTOL * float(np.abs(want).max())
    assert float(np.abs(latents - want).max()) <= tolerance, label
    assert int(np.abs(image.astype(np.int16) - goldens[f"lora/{label}/image"].astype(np.int16)).max()) <= 1
    if label == "with":  # the LoRA's own effect, in tolerances: a LoRA left unapplied cannot pass
        effect = float(np.abs(goldens["lora/with/latents"] - goldens["lora/without/latents"]).mean())
        assert effect > 100 * tolerance


def test_serve_applies_its_loras_and_answers_their_tags(goldens):
    """`serve --lora`: the LoRAs go on the served model; /sdapi/v1/loras lists them; a prompt tag naming one at its
    strength is taken off the prompt (it is applied), any other tag is a 422 naming the field."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from edgediff.runtime.serve import create_app

    file = FIXTURES / LORA_FILE
    app = create_app([FIXTURES / "micro-sd1"], loras=[(str(file), LORA_SCALE)])
    client = TestClient(app, base_url="http://127.0.0.1")
    listed = client.get("/sdapi/v1/loras").json()
    assert [(x["name"], x["scale"]) for x in listed] == [(file.stem, LORA_SCALE)]
    body = {"prompt": f"{LORA_PROMPT} <lora:{file.stem}:{LORA_SCALE}>", "negative_prompt": LORA_KW["negative_prompt"],
            "seed": LORA_SEED, "steps": LORA_KW["num_inference_steps"], "cfg_scale": LORA_KW["guidance_scale"],
            "sampler_name": "Euler", "width": 32, "height": 32}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    want = goldens["lora/with/image"][0]
    assert image.shape == want.shape
    assert int(np.abs(image.astype(np.int16) - want.astype(np.int16)).max()) <= 1
    for tag in ("<lora:other:1>", f"<lora:{file.stem}:0.3>"):
        r = client.post("/sdapi/v1/txt2img", json={**body, "prompt": f"{LORA_PROMPT} {tag}"})
        assert r.status_code == 422 and "prompt" in r.text and "--lora FILE:" in r.text
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # still serving
