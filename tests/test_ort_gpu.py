"""ONNX Runtime on an NVIDIA GPU (CUDA execution provider, I/O binding). Marked `gpu`: skips with
the reason where onnxruntime-gpu or a GPU is absent (this project's CI machines have neither)."""

import numpy as np
import onnxruntime as ort
import pytest

from edgediff.runtime import Pipeline

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu (pip install 'edgediff[gpu]') and an NVIDIA GPU"),
]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cuda_provider_matches_cpu_and_keeps_embeddings_on_device():
    """Same seed on the CPU and CUDA providers: the embedded fp32 model within a mean of 2/255 and a
    max of 16/255 per pixel (cuDNN picks other convolution algorithms, and TF32 where allowed)."""
    kwargs = {"num_inference_steps": 10, "seed": 4}
    prompt = "a small blue circle on the left, yellow background"
    with Pipeline.load() as pipe:
        cpu = np.asarray(pipe(prompt, **kwargs).images[0], dtype=np.int16)
    with Pipeline.load(providers=CUDA) as pipe:
        unet = pipe.engines["unet"]
        assert unet.providers[0] == "CUDAExecutionProvider" and unet.io_binding and unet.device == "cuda"
        gpu = np.asarray(pipe(prompt, **kwargs).images[0], dtype=np.int16)
        assert "encoder_hidden_states" in unet._bound  # the embeddings stayed on the device
    diff = np.abs(gpu - cpu)
    assert diff.mean() <= 2 and diff.max() <= 16, (diff.mean(), diff.max())
