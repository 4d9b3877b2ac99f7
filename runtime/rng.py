"""Random numbers that reproduce PyTorch's CPU generator in numpy.

``TorchCPUGenerator(seed).randn(shape)`` returns the same float32 values as
``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``, and successive calls
continue the same stream, so a seed gives diffusers' image. How torch draws normals on the CPU
(aten/src/ATen/native/cpu/DistributionTemplates.h, ATen/core/DistributionsHelper.h):

* the engine is MT19937, seeded with the low 32 bits of the seed (standard init_genrand);
* tensors of 16+ elements: fill with float uniforms ``(u32 & (2^24-1)) / 2^24``, then Box-Muller in
  blocks of 16 (the first 8 are ``u1`` as ``1-u``, the next 8 ``u2``: ``r·cos``, ``r·sin``); if the
  size is not a multiple of 16, the last 16 values are redrawn with fresh uniforms and transformed
  again (overwriting the tail of the previous block);
* smaller tensors: one double normal per element from 53-bit uniforms built from two 32-bit draws,
  Box-Muller keeping the sine half cached in the generator for the next small draw.

float32 transcendental functions differ from torch's vectorised ones in the last ulp; values agree
to about 1e-6 relative. The sampler is pluggable: anything with ``randn(shape) -> np.ndarray``
works (a CUDA-Philox emulation can slot in later).
"""

from __future__ import annotations

import math
import secrets
from typing import Protocol

import numpy as np

from .errors import InvalidArgumentError


class Generator(Protocol):
    def randn(self, shape: tuple[int, ...]) -> np.ndarray: ...


# torch.Generator.manual_seed's range: negative seeds wrap to 2^64 + seed; anything outside raises.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def check_seed(seed) -> int:
    """``seed`` as an int if torch would accept it for ``manual_seed`` (so that it reproduces
    diffusers' image); InvalidArgumentError otherwise."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
    if not SEED_MIN <= int(seed) <= SEED_MAX:
        raise InvalidArgumentError(
            f"seed {int(seed)} is outside the range torch accepts ({SEED_MIN} to {SEED_MAX}), so no diffusers "
            "image has it; use a smaller seed"
        )
    return int(seed)


class TorchCPUGenerator:
    """numpy emulation of ``torch.Generator("cpu").manual_seed(seed)`` for ``randn``."""

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        # RandomState's integer seeding is MT19937's init_genrand, exactly as torch's mt19937.
        self._mt = np.random.RandomState(self.seed & 0xFFFFFFFF)
        self._cached_normal: float | None = None

    def _u32(self, n: int) -> np.ndarray:
        # A full-range uint32 request returns the raw MT19937 outputs, one per value.
        return self._mt.randint(0, 2**32, size=n, dtype=np.uint64).astype(np.uint64)

    def _uniform_f32(self, n: int) -> np.ndarray:
        return ((self._u32(n) & np.uint64((1 << 24) - 1)).astype(np.float32)) * np.float32(2.0**-24)

    def _uniform_f64(self) -> float:
        hi, lo = (int(x) for x in self._u32(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    @staticmethod
    def _box_muller_16(block: np.ndarray) -> np.ndarray:
        u1 = np.float32(1) - block[:8]
        u2 = block[8:]
        radius = np.sqrt(np.float32(-2) * np.log(u1))
        theta = np.float32(2.0 * math.pi) * u2
        return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)])

    def randn(self, shape) -> np.ndarray:
        shape = tuple(int(s) for s in np.atleast_1d(shape)) if np.ndim(shape) else (int(shape),)
        size = int(np.prod(shape))
        if size >= 16:
            data = self._uniform_f32(size)
            full = size - size % 16
            if full:
                blocks = data[:full].reshape(-1, 16)
                u1 = np.float32(1) - blocks[:, :8]
                radius = np.sqrt(np.float32(-2) * np.log(u1))
                theta = np.float32(2.0 * math.pi) * blocks[:, 8:]
                data[:full] = np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)
            if size % 16:
                data[size - 16 :] = self._box_muller_16(self._uniform_f32(16))
            return data.reshape(shape)
        out = np.empty(size, dtype=np.float64)
        for k in range(size):
            if self._cached_normal is not None:
                out[k], self._cached_normal = self._cached_normal, None
                continue
            u1 = self._uniform_f64()
            u2 = self._uniform_f64()
            r = math.sqrt(-2.0 * math.log1p(-u2))
            theta = 2.0 * math.pi * u1
            self._cached_normal = r * math.sin(theta)
            out[k] = r * math.cos(theta)
        return out.astype(np.float32).reshape(shape)


def make_generator(seed: int | None) -> TorchCPUGenerator:
    """The default generator for a seed; a random seed (recorded in the result) when None."""
    if seed is None:
        seed = secrets.randbits(32)
    return TorchCPUGenerator(seed)


class GeneratorList:
    """One generator per image (``seeds=[...]``), as diffusers' list of generators: a draw of shape [n, ...] takes
    row i from generator i, so image i of a batch draws exactly what a one-image call with its seed draws."""

    def __init__(self, generators: list[TorchCPUGenerator]):
        self.generators = list(generators)

    @property
    def seeds(self) -> list[int]:
        return [g.seed for g in self.generators]

    @property
    def seed(self) -> int:
        """The first image's seed (what a record's ``seed`` and A1111's ``Seed:`` say for a batch)."""
        return self.generators[0].seed

    def randn(self, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"a draw of shape {shape} from {len(self.generators)} per-image generators")
        return np.concatenate([g.randn((1, *shape[1:])) for g in self.generators])
