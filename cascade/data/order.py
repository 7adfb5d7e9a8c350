"""Training examples as a pure function of (seed, step): the order, and the randomness inside each item.

Exact resume needs the examples of step s to be the same whether the run got there in one
go or after a crash. Two things make that so:

* :class:`StepBatchSampler` yields the batches of step s from (seed, s) alone; each entry
  is an ``(index, epoch)`` pair.
* :class:`SeededItems` fetches ``dataset[index]`` with torch's, Python's and NumPy's global
  generators seeded from (seed, epoch, index), and restores them afterwards. Augmentations
  drawn from those generators (random flips, torchvision transforms) therefore repeat
  exactly on resume — and do not depend on the number of loader workers, which each carry
  their own generator state otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cascade.utils.rng import keyed_seed

__all__ = ["StepBatchSampler", "SeededItems", "item_seed"]


class StepBatchSampler:
    """Batches of ``(index, epoch)`` as a pure function of the global step: resume needs only the step.

    Epoch e is a permutation drawn from (seed, e), cut into global batches of
    ``batch_size · world_size``; under data parallelism rank r takes the r-th block of
    ``batch_size`` of each, so ranks see disjoint data and global batch s holds the same
    examples in the same order whatever the number of ranks (the trainer's per-micro-batch
    noise relies on it).
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if size < batch_size * world_size:
            raise ValueError(
                f"the data set has {size} items, fewer than one global batch ({batch_size * world_size}); lower trainer.batch_size"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.batches_per_epoch = size // (batch_size * world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.size, generator=g)[: self.batches_per_epoch * self.batch_size * self.world_size]
        return perm.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            epoch, offset = divmod(step, self.batches_per_epoch)
            indices = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield [(i, epoch) for i in indices[b * self.batch_size : (b + 1) * self.batch_size]]
            step = (epoch + 1) * self.batches_per_epoch


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from a stable hash of (seed, epoch, index)."""
    return keyed_seed(b"item-seed", seed, epoch, index)


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, epoch)``, each item drawn under global generators seeded by (seed, epoch, index).

    Only torch's CPU generator is touched (not CUDA's); every generator is restored after
    the item, so the caller's random streams are unaffected. Other attributes (``class_names``,
    ``fault_counts``, …) are those of ``dataset``.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        s = item_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(s)
                random.seed(s)
                np.random.seed(s % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
