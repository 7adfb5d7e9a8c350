"""The generic training loop shared by every stage.

A stage (see ``stages/``, :class:`cascade.roles.Trainable`) says *what* is learned: it builds
its network and computes a per-example loss from a batch. A :class:`Reporter` injected by the
caller (``cascade.evaluation.previews``) makes the periodic previews. The trainer says *how*: AdamW with linear warm-up, EMA of the weights (timm ``ModelEmaV3``), gradient
clipping, bf16 autocast (CUDA, and CPUs with native bf16), data-parallel training under ``torchrun``
with gradient accumulation over micro-batches, optional ``torch.compile``, periodic
self-describing checkpoints, resume from ``last.pt``, ``metrics.jsonl``, ``loss.png``
and a progress bar with loss, rate and ETA.

:meth:`Trainer._fit` runs named sections in the order of EDM's ``training_loop``: initialise,
resume, prepare, then per step train → log → checkpoint → (stop) → report, and finish. What a
run resumes from is one :class:`~cascade.training.state.TrainingState`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cascade.data.order import SeededItems, StepBatchSampler
from cascade.nn.native import group_norm_kernels
from cascade.roles import Trainable
from cascade.training import faults
from cascade.training.checkpoint import load_latest, prune_checkpoints, remove_temporaries, save_checkpoint
from cascade.training.state import TrainingState
from cascade.utils.device import bf16_autocast, choose_compute
from cascade.utils.plots import plot_loss_curve, read_metrics
from cascade.utils.rng import keyed_seed

__all__ = ["Stage", "Trainer", "Reporter", "ReportContext", "count_parameters", "StepBatchSampler", "LrDecay", "lr_factor"]


Stage = Trainable  # what the trainer needs from a stage (cascade.roles.Trainable)


@dataclass(frozen=True)
class ReportContext:
    """What a reporter is given besides the EMA network: where to write and what to report on."""

    step: int
    out_dir: Path  # samples/ of the run folder
    class_names: list[str]
    val_data: Dataset | None  # held-out images at the stage resolution, if the data config has a val split
    device: torch.device
    generator: torch.Generator  # seeded with the run seed at every report: reports are comparable across steps


class Reporter(Protocol):
    """The periodic preview of a run (e.g. :func:`cascade.evaluation.previews.bind`); returns metrics for ``metrics.jsonl``."""

    def __call__(self, net: nn.Module, context: ReportContext) -> dict[str, float]: ...


LrDecay = Literal["none", "cosine", "linear"]


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, decay: LrDecay) -> float:
    """The learning rate at optimisation step ``step`` (0-based) as a fraction of the peak: linear warm-up, then ``decay``.

    ``none``: constant after warm-up (ADM). ``cosine`` (Loshchilov & Hutter 2017, SGDR without restarts) and
    ``linear`` fall from the peak at the end of warm-up to 0 one step after the last, so a run of a fixed, short
    budget ends on small steps instead of relying on the EMA alone to average the noise of large ones.
    """
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if decay == "none" or step < warmup_steps:
        return warm
    progress = min(1.0, (step - warmup_steps + 1) / (max_steps - warmup_steps + 1))  # < 1 up to the last step
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun; returns (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    """Trains one stage. Every argument is a hyperparameter of the loop, overridable as ``trainer.<name>``."""

    def __init__(
        self,
        *,
        optimizer: Callable[..., torch.optim.Optimizer] = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0),
        max_steps: int = 100_000,  # total optimisation steps
        batch_size: int = 64,  # global batch, split across ranks
        lr: float = 1e-4,  # peak learning rate (after warm-up)
        warmup_steps: int = 1000,  # linear warm-up from 0 to lr
        lr_decay: LrDecay = "none",  # after warm-up: none (constant, ADM), cosine or linear to 0 at max_steps
        grad_clip: float = 1.0,  # max global grad norm; 0 disables
        ema_decay: float = 0.9999,  # EMA decay (ADM: 0.9999)
        ema_warmup: bool = True,  # timm warm-up of the EMA decay, so short runs have a usable EMA
        ckpt_every: int = 5000,  # numbered checkpoint period (last.pt is refreshed with it)
        keep_ckpts: int = 3,  # numbered checkpoints kept
        sample_every: int = 5000,  # report period: sample grids / accuracies (also at the end)
        log_every: int = 100,  # metrics.jsonl period
        num_workers: int = 4,  # data loader workers per rank
        bf16: bool | Literal["auto"] = "auto",  # bf16 autocast: true where native, auto where native and faster (choose_compute)
        channels_last: bool | Literal["auto"] = False,  # NHWC memory format; auto: by the machine (utils.device.choose_compute)
        micro_batch_size: int | None = None,  # per-rank micro-batch for gradient accumulation; None = the whole rank batch
        compile: bool = False,  # torch.compile the network for the training step (EMA and checkpoints keep the plain module)
        tf32: bool = True,  # TF32 matmuls/convolutions for float32 work on Ampere+ GPUs (no effect on CPU)
        progress: bool = True,  # progress bar
        max_nonfinite_steps: int = 10,  # non-finite loss/gradient steps in a row (each skipped) before the run stops
    ) -> None:
        if max_steps < 1 or batch_size < 1:
            raise ValueError("trainer.max_steps and trainer.batch_size must be >= 1")
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"trainer.channels_last must be true, false or auto, got {channels_last!r}")
        if bf16 not in (True, False, "auto"):
            raise ValueError(f"trainer.bf16 must be true, false or auto, got {bf16!r}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"trainer.micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        self.micro_batch_size, self.compile, self.tf32 = micro_batch_size, compile, tf32
        faults.NonFiniteSteps(max_nonfinite_steps)  # validates the limit now: bad config fails before any work
        self.max_nonfinite_steps = max_nonfinite_steps
        self.optimizer = optimizer
        if lr_decay not in get_args(LrDecay):
            raise ValueError(f"trainer.lr_decay must be none, cosine or linear, got {lr_decay!r}")
        self.max_steps, self.batch_size, self.lr, self.warmup_steps = max_steps, batch_size, lr, warmup_steps
        self.lr_decay = lr_decay
        self.grad_clip, self.ema_decay, self.ema_warmup = grad_clip, ema_decay, ema_warmup
        self.ckpt_every, self.keep_ckpts, self.sample_every, self.log_every = ckpt_every, keep_ckpts, sample_every, log_every
        self.num_workers, self.bf16, self.channels_last, self.progress = num_workers, bf16, channels_last, progress

    def fit(self, stage: Stage, dataset: Dataset, *, reporter: Reporter | None = None, **kwargs: Any) -> dict[str, Any]:
        """Train ``stage`` on ``dataset`` into ``run_dir``; resumes from the newest intact checkpoint there.

        Keywords: ``run_dir``, ``config``, ``seed``, ``device``, ``val_data``; ``reporter``
        (e.g. :func:`cascade.evaluation.previews.bind`) makes the periodic previews, none
        without it. SIGTERM/SIGINT end the run cleanly after a checkpoint (``"stopped_by"`` in
        the result names the signal); see :mod:`cascade.training.faults` and README "Reliability".
        """
        with faults.StopRequest(f"[{stage.name}] ") as stop, contextlib.ExitStack() as cleanup:
            return self._fit(stage, dataset, reporter=reporter, stop=stop, cleanup=cleanup, **kwargs)

    def _fit(
        self,
        stage: Stage,
        dataset: Dataset,
        *,
        run_dir: str | Path,
        config: dict[str, Any],
        seed: int = 0,
        device: torch.device = torch.device("cpu"),
        val_data: Dataset | None = None,
        reporter: Reporter | None,
        stop: faults.StopRequest,
        cleanup: contextlib.ExitStack,
    ) -> dict[str, Any]:
        run = self._initialise(stage, dataset, Path(run_dir), config, seed, device, val_data, reporter)
        self._resume(run)
        if run.state.step >= self.max_steps:
            run.say(f"already trained to step {run.state.step} (max_steps={self.max_steps}); nothing to do")
            return {"step": run.state.step, "run_dir": str(run.run_dir)}
        self._prepare_training(run, cleanup)
        while run.state.step < self.max_steps:
            self._train_step(run, stop)
            if self._due(run, self.log_every):
                self._log(run)
            if self._due(run, self.ckpt_every) or run.stopping:
                self._checkpoint(run, numbered=self._due(run, self.ckpt_every))
            if run.stopping:
                return self._stop(run, stop)
            if self._due(run, self.sample_every):
                self._report(run)
        return self._finish(run)

    # --- the sections of _fit, in order ---

    def _initialise(
        self,
        stage: Stage,
        dataset: Dataset,
        run_dir: Path,
        config: dict[str, Any],
        seed: int,
        device: torch.device,
        val_data: Dataset | None,
        reporter: Reporter | None,
    ) -> _Run:
        """Ranks and device, the network, EMA, optimizer, schedule and random streams at step 0."""
        rank, world_size = _setup_distributed(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if self.batch_size % world_size:
            raise ValueError(f"trainer.batch_size={self.batch_size} does not split across {world_size} ranks")
        micro = self.micro_batch_size or self.batch_size // world_size
        if (self.batch_size // world_size) % micro:
            raise ValueError(
                f"trainer.micro_batch_size={micro} does not divide the per-rank batch "
                f"{self.batch_size // world_size} (trainer.batch_size={self.batch_size} over {world_size} ranks)"
            )
        if device.type == "cuda" and self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (outside bf16 autocast) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        class_names = list(dataset.class_names)
        compute = choose_compute(
            device, bf16=self.bf16, channels_last=self.channels_last, norm_kernel=lambda: group_norm_kernels() is not None
        )
        memory_format = torch.channels_last if compute.channels_last else torch.contiguous_format
        net = stage.build(num_classes=len(class_names)).to(device).to(memory_format=memory_format)
        if rank == 0:
            print(f"[{stage.name}] {compute.line()}", flush=True)
            print(
                f"[{stage.name}] {type(net).__name__}: {count_parameters(net) / 1e6:.1f}M parameters, "
                f"{len(dataset)} images of {len(class_names)} classes at {stage.resolution}px, device {device}, "
                f"{world_size} rank(s)",
                flush=True,
            )
        optimizer = self.optimizer(net.parameters(), lr=self.lr)
        state = TrainingState(
            net=net,
            ema=ModelEmaV3(net, decay=self.ema_decay, use_warmup=self.ema_warmup),
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(
                optimizer, partial(lr_factor, warmup_steps=self.warmup_steps, max_steps=self.max_steps, decay=self.lr_decay)
            ),
            generator=torch.Generator(device).manual_seed(seed * 7919 + rank),  # reseeded per micro-batch by accumulate_gradients
            nonfinite=faults.NonFiniteSteps(self.max_nonfinite_steps),
            device=device,
            rank=rank,
            world_size=world_size,
        )
        return _Run(
            stage=stage,
            dataset=dataset,
            run_dir=run_dir,
            config=config,
            seed=seed,
            device=device,
            val_data=val_data,
            reporter=reporter,
            rank=rank,
            world_size=world_size,
            micro=micro,
            bf16=compute.bf16,
            memory_format=memory_format,
            class_names=class_names,
            state=state,
        )

    def _resume(self, run: _Run) -> None:
        """Load the newest intact checkpoint of the run folder, if any, and drop metric rows written after it."""
        ckpt_dir = run.ckpt_dir
        if run.is_main and ckpt_dir.is_dir():
            remove_temporaries(ckpt_dir)  # left by a write that a kill interrupted
        found = load_latest(ckpt_dir, map_location=run.device) if ckpt_dir.is_dir() else None
        if found is not None:
            source, saved = found
            if saved["stage"] != run.stage.name:
                raise ValueError(f"{source} belongs to stage {saved['stage']!r}, not {run.stage.name!r}; use another run_dir")
            run.state.load_state_dict(saved)
            if not run.state.streams_restored:
                run.say(f"resuming on {run.world_size} rank(s) from a {run.state.saved_ranks}-rank run: noise streams restart")
            run.say(f"resumed from {source} at step {run.state.step}")
            run.last_saved = run.state.step
        if run.is_main and run.state.step < self.max_steps:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(run.run_dir / "metrics.jsonl", run.state.step)

    def _prepare_training(self, run: _Run, cleanup: contextlib.ExitStack) -> None:
        """DDP and compile wrappers, the data loader from the current step, the progress bar."""
        net, device = run.state.net, run.device
        if run.world_size > 1:
            run.ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        run.model = run.ddp or net
        if device.type == "cpu" and run.memory_format == torch.channels_last:
            # Channels-last norms (bf16 and float32) run on the C++ GroupNorm kernel: build or load it now: its one-time build
            # message then comes before the progress bar, and torch.compile traces norms onto it only if it is loaded before tracing.
            group_norm_kernels()
        if self.compile:  # compile after wrapping (DDP-aware graph breaks); ``net`` stays the plain module for EMA and state_dict
            run.model = torch.compile(run.model)
        per_rank = self.batch_size // run.world_size
        loader = DataLoader(
            SeededItems(run.dataset, run.seed),  # item augmentations seeded by (seed, epoch, index): exact on resume
            batch_sampler=StepBatchSampler(
                len(run.dataset), per_rank, seed=run.seed, start_step=run.state.step, rank=run.rank, world_size=run.world_size
            ),
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(run.seed),  # worker seeds without drawing from the global RNG
            worker_init_fn=faults.ignore_stop_signals,
        )
        run.data = iter(loader)
        cleanup.callback(faults.close_loader, run.data)  # workers ignore SIGTERM: stop them before the process exits
        run.bar = tqdm(
            total=self.max_steps,
            initial=run.state.step,
            desc=run.stage.name,
            unit="step",
            disable=not (run.is_main and self.progress),
            dynamic_ncols=True,
        )
        run.window.restart()
        net.train()

    def _train_step(self, run: _Run, stop: faults.StopRequest) -> None:
        """One optimisation step; a non-finite loss or gradient (agreed over ranks) changes no weights, EMA or optimizer state."""
        state, device = run.state, run.device
        images, labels = next(run.data)
        state.optimizer.zero_grad(set_to_none=True)
        per_rank = self.batch_size // run.world_size
        loss_value = accumulate_gradients(
            run.stage,
            run.model,
            images.to(device, non_blocking=True).contiguous(memory_format=run.memory_format),
            labels.to(device, non_blocking=True),
            micro_batch_size=run.micro,
            generator=state.generator,
            seed=run.seed,
            step=state.step,
            first_chunk=run.rank * (per_rank // run.micro),
            no_sync=run.ddp.no_sync if run.ddp is not None else None,
            autocast=partial(bf16_autocast, device, run.bf16),
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf)
        bad, run.stopping = faults.agree([not faults.is_finite(loss_value, grad_norm), stop.requested], device, run.world_size)
        if state.nonfinite.record(not bad):
            state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        run.grad_norm = float(grad_norm)
        if not bad:
            state.ema.update(state.net, step=state.step)
        elif state.nonfinite.exceeded:
            kept = (
                f"{run.ckpt_dir / 'last.pt'} (step {run.last_saved})"
                if run.last_saved is not None
                else "none (no checkpoint was written)"
            )
            raise faults.TrainingDiverged(
                f"{state.nonfinite.in_a_row} non-finite steps in a row up to step {state.step} (loss {loss_value}, grad norm "
                f"{float(grad_norm)}); stopped without saving. Last good checkpoint: {kept}. Lower trainer.lr, "
                "check the data, or raise trainer.max_nonfinite_steps"
            )
        elif run.is_main:
            run.bar.write(
                f"[{run.stage.name}] step {state.step}: non-finite loss {loss_value} / grad norm {float(grad_norm)}; "
                f"step skipped ({state.nonfinite.in_a_row} in a row, {state.nonfinite.total} in all)"
            )
        run.window.add(loss_value, finite=not bad)
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss_value:.4f}")

    def _due(self, run: _Run, every: int) -> bool:
        return run.state.step % every == 0 or run.state.step == self.max_steps

    def _log(self, run: _Run) -> None:
        """A ``metrics.jsonl`` row for the window since the last one (loss, lr, rates, fault counts) and ``loss.png``."""
        row = run.window.row(
            run.state.step, lr=run.state.scheduler.get_last_lr()[0], grad_norm=run.grad_norm, batch_size=self.batch_size
        )
        data_faults = faults.data_fault_counts(run.dataset, run.device, run.world_size)
        row.update(nonfinite_steps=run.state.nonfinite.total, **data_faults)
        if run.is_main and sum(data_faults.values()) > run.faults_seen:
            run.faults_seen = sum(data_faults.values())
            run.bar.write(
                f"[{run.stage.name}] step {run.state.step}: data faults so far: "
                + ", ".join(f"{k}={v}" for k, v in data_faults.items())
            )
        if run.is_main:
            with open(run.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            plot_loss_curve(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png", title=f"{run.stage.name} training loss")
        run.window.restart()

    def _checkpoint(self, run: _Run, *, numbered: bool) -> None:
        """``last.pt`` (and ``step_NNNNNNN.pt`` when ``numbered``), written by rank 0 with every rank's random streams."""
        resumable = run.state.state_dict()  # collective: every rank's streams
        run.last_saved = run.state.step
        if not run.is_main:
            return
        payload = {
            "stage": run.stage.name,
            "config": run.config,
            "class_names": run.class_names,
            "resolution": run.stage.resolution,
            **resumable,
        }
        order = [
            "stage",
            "config",
            "class_names",
            "resolution",
            "step",
            "model",
            "ema",
            "optimizer",
            "lr_scheduler",
            "rng",
            "trainer",
        ]
        payload = {key: payload[key] for key in order}  # the entries' order is part of the digest
        save_checkpoint(payload, run.ckpt_dir / "last.pt")
        if numbered:
            save_checkpoint(payload, run.ckpt_dir / f"step_{run.state.step:07d}.pt")
            prune_checkpoints(run.ckpt_dir, self.keep_ckpts)

    def _report(self, run: _Run) -> None:
        """The reporter on the EMA weights (rank 0), its metrics into ``metrics.jsonl``; training's random streams untouched."""
        if run.reporter is None or not run.is_main:
            return
        state, device = run.state, run.device
        state.net.eval()
        state.ema.module.eval()
        context = ReportContext(
            step=state.step,
            out_dir=run.sample_dir,
            class_names=run.class_names,
            val_data=run.val_data,
            device=device,
            generator=torch.Generator(device).manual_seed(run.seed),
        )
        # fork_rng: whatever the report draws from the global generators, training continues as if it had not run.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bf16_autocast(device, run.bf16):
            metrics = run.reporter(state.ema.module, context)
        state.net.train()
        if metrics:
            with open(run.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": state.step, **metrics}) + "\n")
            run.bar.write(f"[{run.stage.name}] step {state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def _stop(self, run: _Run, stop: faults.StopRequest) -> dict[str, Any]:
        """End a run a signal stopped (after its checkpoint)."""
        run.bar.close()
        run.say(
            f"stopped by {stop.signal_name or 'a signal on another rank'} at step {run.state.step}: "
            f"saved {run.ckpt_dir / 'last.pt'}; run the same command to resume"
        )
        if run.world_size > 1:
            dist.barrier()
        return {"step": run.state.step, "run_dir": str(run.run_dir), "stopped_by": stop.signal_name or "peer"}

    def _finish(self, run: _Run) -> dict[str, Any]:
        run.bar.close()
        if run.is_main:
            print(
                f"[{run.stage.name}] done: {run.run_dir}/checkpoints/last.pt, samples in {run.sample_dir}, "
                f"loss curve {run.run_dir}/loss.png",
                flush=True,
            )
        if run.world_size > 1:
            dist.barrier()
        return {"step": run.state.step, "run_dir": str(run.run_dir)}


class _MetricWindow:
    """Loss and rate over the steps since the last ``metrics.jsonl`` row."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.loss, self.steps, self.finite, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, *, finite: bool) -> None:
        self.steps += 1
        if finite:
            self.loss += loss
            self.finite += 1

    def row(self, step: int, *, lr: float, grad_norm: float, batch_size: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        row: dict[str, Any] = {"step": step}
        if self.finite:  # a window of only non-finite steps logs no loss
            row["loss"] = self.loss / self.finite
        row |= {
            "lr": lr,
            "grad_norm": grad_norm,
            "steps_per_s": self.steps / elapsed,
            "images_per_s": self.steps * batch_size / elapsed,
        }
        return row


@dataclass(eq=False)
class _Run:
    """One call of :meth:`Trainer.fit`: what it trains on, where it writes, its state and its running parts."""

    stage: Stage
    dataset: Dataset
    run_dir: Path
    config: dict[str, Any]
    seed: int
    device: torch.device
    val_data: Dataset | None
    reporter: Reporter | None
    rank: int
    world_size: int
    micro: int  # per-rank micro-batch
    bf16: bool  # bf16 autocast in training steps and reports (choose_compute)
    memory_format: torch.memory_format
    class_names: list[str]
    state: TrainingState
    last_saved: int | None = None  # step of the newest checkpoint on disk
    ddp: nn.parallel.DistributedDataParallel | None = None
    model: nn.Module | None = None  # what the loss runs: the network, DDP-wrapped and/or compiled
    data: Any = None  # the loader's iterator
    bar: Any = None  # tqdm
    window: _MetricWindow = field(default_factory=_MetricWindow)
    grad_norm: float = 0.0
    faults_seen: int = 0
    stopping: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def sample_dir(self) -> Path:
        return self.run_dir / "samples"

    def say(self, message: str) -> None:
        """Print ``[stage] message`` on rank 0."""
        if self.is_main:
            print(f"[{self.stage.name}] {message}", flush=True)


def micro_batch_seed(seed: int, step: int, chunk: int) -> int:
    """A 63-bit seed from a stable hash of (seed, step, chunk): the randomness of one micro-batch of one step."""
    return keyed_seed(b"step-noise", seed, step, chunk)


def accumulate_gradients(
    stage: Stage,
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    micro_batch_size: int,
    generator: torch.Generator,
    seed: int,
    step: int,
    first_chunk: int,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """Add to the parameters' ``.grad`` the gradient of this rank's mean loss, one micro-batch at a time; return that mean.

    The rank's batch (B, …) is split into micro-batches of ``micro_batch_size``; each one's
    per-example loss *sum* is divided by B before ``backward``, so the accumulated gradient is
    exactly that of the batch mean, and after DDP's average over ranks that of the global
    batch mean. With DDP (``no_sync``) gradients are all-reduced only on the last micro-batch.

    Randomness: micro-batch j is global chunk c = ``first_chunk`` + j of the step's global
    batch (rank r holds chunks r·B/m … (r+1)·B/m − 1, the sampler giving it the r-th block of
    the global batch). Its diffusion noise (``generator``) and dropout (torch's global
    generators, forked) are seeded from (seed, step, c) alone, so for a fixed micro-batch size
    the run is the same function of the data whatever the number of ranks, and resumes exactly.
    """
    batch = images.shape[0]
    total = torch.zeros((), device=images.device)
    cuda = [images.device] if images.device.type == "cuda" else []
    for j, start in enumerate(range(0, batch, micro_batch_size)):
        last = start + micro_batch_size >= batch
        chunk_seed = micro_batch_seed(seed, step, first_chunk + j)
        generator.manual_seed(chunk_seed)
        sync = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        with sync, torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(chunk_seed)
            if cuda:
                torch.cuda.manual_seed(chunk_seed)
            with autocast():
                losses = stage.loss(
                    model, images[start : start + micro_batch_size], labels[start : start + micro_batch_size], generator
                )  # (m,)
            (losses.float().sum() / batch).backward()
        total += losses.detach().float().sum()
    return total.item() / batch


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past ``step`` (written after the checkpoint a resumed run starts from)."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
