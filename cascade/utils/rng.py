"""Per-image random streams: every image's noise is a function of (seed, stream, global image index) alone.

A sampler draws noise for a whole batch. With one ``torch.Generator`` per batch, image i's noise
depends on which batch it falls in, so results change with the batch size or the number of
ranks that share the work. :class:`ImageGenerators` holds one generator per image (EDM's
``StackedRandomGenerator`` idea) and draws each image's slice from its own generator, so
image i is the same whatever the batch it is sampled in.

Everything that draws sampling noise takes a :data:`Generator` (one ``torch.Generator``, an
:class:`ImageGenerators`, or ``None`` for the global stream) and draws through :func:`randn`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Generator", "ImageGenerators", "randn", "derive_seed", "keyed_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, stage, image index): SHA-256 of their 64-bit encodings."""
    digest = hashlib.sha256(struct.pack(f"<{len(parts)}q", *parts)).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_seed(key: bytes, *parts: int) -> int:
    """A 63-bit seed from integers under a key naming the stream: BLAKE2b (8 bytes, ``person=key``) of their 64-bit encodings.

    The data set's scenes (``shapes-v1``), the item augmentations (``item-seed``) and the
    training noise of each micro-batch (``step-noise``) are seeded with it; a new key gives an
    independent stream without touching the existing ones (their values are part of every
    data set and training run).
    """
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8, person=key).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ImageGenerators:
    """One ``torch.Generator`` per image of a batch, seeded by the caller (e.g. ``derive_seed(seed, stage, i)``)."""

    def __init__(self, seeds: Sequence[int], device: str | torch.device = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], *, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, …) standard normal noise; row i drawn from generator i. ``shape[0]`` must equal the batch size."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} images asked from {len(self.generators)} per-image generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)  # (B, …)


Generator = torch.Generator | ImageGenerators | None


def randn(
    shape: Sequence[int], generator: Generator, *, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal noise of ``shape`` from one generator, from per-image generators, or from the global stream."""
    if isinstance(generator, ImageGenerators):
        return generator.randn(shape, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
