"""What a training run resumes from, as one object: weights, EMA, optimizer, schedule, step, random streams, fault counters.

:meth:`TrainingState.state_dict` gives the resumable entries of a checkpoint (the trainer adds
what describes the run: stage name, config, class names, resolution) and
:meth:`TrainingState.load_state_dict` restores them, so that a resumed run continues
bit-identically (see :mod:`cascade.training.checkpoint` for the file and
:func:`~cascade.training.checkpoint.rng_state` for the random streams).

Under data parallelism every rank holds its own state; the random streams differ per rank, so
:meth:`TrainingState.state_dict` gathers all ranks' streams (a collective call: every rank makes
it) and :meth:`TrainingState.load_state_dict` restores this rank's own, or restarts the streams
when the number of ranks changed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn

from cascade.training.checkpoint import rng_state, set_rng_state
from cascade.training.faults import NonFiniteSteps

__all__ = ["TrainingState"]


class TrainingState:
    """The resumable state of one rank of a training run."""

    def __init__(
        self,
        *,
        net: nn.Module,  # the plain network (not DDP- or compile-wrapped)
        ema: ModelEmaV3,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,  # this rank's diffusion-noise generator
        nonfinite: NonFiniteSteps,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.net, self.ema, self.optimizer, self.scheduler = net, ema, optimizer, scheduler
        self.generator, self.nonfinite, self.device = generator, nonfinite, device
        self.rank, self.world_size = rank, world_size
        self.step = 0
        self.saved_ranks = world_size  # ranks of the run the state was loaded from

    def rank_streams(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's random streams, rank order (collective under data parallelism)."""
        mine = rng_state(self.generator, self.device)
        if self.world_size == 1:
            return [mine]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in mine.items()})
        return gathered

    def state_dict(self) -> dict[str, Any]:
        """``step``, ``model``, ``ema``, ``optimizer``, ``lr_scheduler``, ``rng`` (all ranks) and ``trainer`` (fault counters)."""
        return {
            "step": self.step,
            "model": self.net.state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "rng": {"ranks": self.rank_streams()},
            "trainer": {"nonfinite": self.nonfinite.state_dict()},
        }

    @property
    def streams_restored(self) -> bool:
        """Whether the random streams continue those of the saved run (False when its number of ranks differed)."""
        return self.saved_ranks == self.world_size

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` (or a format-1 checkpoint) holds."""
        self.net.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        saved = state["rng"].get("ranks") or [{"generator": g} for g in state["rng"]["generator"]]  # format 1: generators only
        self.saved_ranks = len(saved)
        if self.streams_restored:  # same layout of ranks: continue each rank's random streams exactly
            set_rng_state(saved[self.rank], self.generator, self.device)
        if "nonfinite" in state.get("trainer", {}):
            self.nonfinite.load_state_dict(state["trainer"]["nonfinite"])
        self.step = int(state["step"])
