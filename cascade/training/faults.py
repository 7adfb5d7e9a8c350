"""Faults a long training run must survive: preemption signals and non-finite steps.

* :class:`StopRequest` turns the first SIGTERM / SIGINT into a request the training loop
  polls once per step: it finishes the step, writes a checkpoint and returns (exit 0).
  A second signal acts at once (SIGINT: KeyboardInterrupt; SIGTERM: terminate).
* :class:`NonFiniteSteps` counts steps whose loss or gradient norm is not finite. Such a
  step leaves weights, EMA and optimizer untouched; ``limit`` of them in a row raise
  :class:`TrainingDiverged`.
* :func:`agree` makes both decisions the same on every rank (one tiny all-reduce), so
  data-parallel ranks skip, checkpoint and stop together instead of deadlocking.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "StopRequest",
    "NonFiniteSteps",
    "TrainingDiverged",
    "agree",
    "ignore_stop_signals",
    "close_loader",
    "data_fault_counts",
    "is_finite",
]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set :attr:`signal_name` instead of killing the process.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, label: str = "") -> None:
        self.label = label  # prefix of the message printed on the first signal
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:  # second signal: stop waiting
            self._restore()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        print(
            f"{self.label}received {self.signal_name}: saving a checkpoint after this step, then exiting "
            "(send it again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM/SIGINT sent to the whole process group.

    Ctrl-C and Slurm signal every process of the job; a worker killed by the signal would
    make the main process fail (torch's SIGCHLD handler) before its checkpoint. The main
    process stops the workers itself (:func:`close_loader`); if it dies, they notice and exit.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def close_loader(iterator: Any) -> None:
    """Stop a DataLoader iterator's worker processes now.

    Needed because they ignore SIGTERM: Python's exit would otherwise terminate and join
    them, and wait forever, whenever something still references the iterator.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)  # private but stable since torch 1.x; absent without workers
    if shutdown is not None:
        shutdown()


class NonFiniteSteps:
    """Counts non-finite steps (total and in a row); :meth:`exceeded` once ``limit`` came in a row."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"trainer.max_nonfinite_steps must be >= 1, got {limit}")
        self.limit = limit
        self.total = 0  # non-finite steps of the whole run (resumes included)
        self.in_a_row = 0  # current streak

    def record(self, finite: bool) -> bool:
        """Count one step; returns ``finite`` (whether to apply the update)."""
        if finite:
            self.in_a_row = 0
        else:
            self.total += 1
            self.in_a_row += 1
        return finite

    @property
    def exceeded(self) -> bool:
        return self.in_a_row >= self.limit

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row = int(state["total"]), int(state["in_a_row"])


def agree(flags: list[bool], device: torch.device, world_size: int) -> list[bool]:
    """Each flag OR-ed over ranks (identity for one rank)."""
    if world_size == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)  # (F,)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def is_finite(*values: float | torch.Tensor) -> bool:
    """Whether every value (Python number or 0-d tensor) is finite."""
    return all(math.isfinite(float(v)) for v in values)


def data_fault_counts(dataset: Any, device: torch.device, world_size: int) -> dict[str, int]:
    """The data set's skip/upscale counts (``dataset.fault_counts()``), summed over ranks; {} if it keeps none."""
    counts_fn = getattr(dataset, "fault_counts", None)
    if counts_fn is None:
        return {}
    counts: dict[str, int] = counts_fn()
    if world_size > 1:
        t = torch.tensor(list(counts.values()), dtype=torch.float64, device=device)  # (K,)
        dist.all_reduce(t)
        counts = {k: int(v) for k, v in zip(counts, t.tolist())}
    return counts
