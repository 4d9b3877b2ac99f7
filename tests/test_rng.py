"""The numpy generator reproduces torch's CPU normal sampler: same seeds, same stream."""

import numpy as np
import pytest

from conftest import needs_torch
from edgediff.runtime.errors import InvalidArgumentError
from edgediff.runtime.rng import TorchCPUGenerator

SHAPES = [(1, 4, 8, 8), (3,), (1,), (5,), (15,), (16,), (17,), (33,), (2, 3), (2, 4, 64, 64), (7, 5), (1, 4, 9, 7)]


@needs_torch
@pytest.mark.parametrize("seed", [0, 1, 42, 1234, 2**31 - 1, 2**32 + 5, 987654321])
def test_matches_torch_randn_stream(seed):
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    ours = TorchCPUGenerator(seed)
    # successive draws of mixed sizes continue the same stream (and the cached normal of small draws)
    for shape in SHAPES:
        want = torch.randn(shape, generator=g).numpy()
        got = ours.randn(shape)
        assert got.shape == want.shape and got.dtype == np.float32
        # float32 log/sin/cos may differ from torch's vectorised ones in the last ulp
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_is_deterministic_and_seed_sensitive():
    a = TorchCPUGenerator(7).randn((2, 4, 8, 8))
    b = TorchCPUGenerator(7).randn((2, 4, 8, 8))
    c = TorchCPUGenerator(8).randn((2, 4, 8, 8))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    assert abs(float(a.mean())) < 0.2 and 0.8 < float(a.std()) < 1.2


def test_rejects_non_integer_seed():
    with pytest.raises(InvalidArgumentError, match="seed must be an integer"):
        TorchCPUGenerator(1.5)
    with pytest.raises(InvalidArgumentError, match="seed must be an integer"):
        TorchCPUGenerator(True)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_rejects_seeds_torch_refuses(seed):
    """torch.Generator.manual_seed raises outside [-2^63, 2^64 - 1]: such a seed has no diffusers image."""
    with pytest.raises(InvalidArgumentError, match=f"seed {seed} is outside the range torch accepts"):
        TorchCPUGenerator(seed)


def test_negative_and_large_seeds_follow_torch():
    """torch wraps a negative seed to 2^64 + seed; both ends of its range reproduce torch's stream."""
    torch = pytest.importorskip("torch")
    for seed in (-1, -(2**63), 2**64 - 1, 2**40 + 3):
        want = torch.randn(40, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_allclose(TorchCPUGenerator(seed).randn((40,)), want, rtol=1e-5, atol=1e-6)
