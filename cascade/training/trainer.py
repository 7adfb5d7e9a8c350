"""The generic training loop shared by every stage.

A stage (see ``stages/``) says *what* is learned: it builds its network, computes a
per-example loss from a batch, and reports (sample grids, accuracies). The trainer says
*how*: AdamW with linear warm-up, EMA of the weights (timm ``ModelEmaV3``), gradient
clipping, bf16 autocast (CUDA, and CPUs with native bf16), data-parallel training under ``torchrun``
with gradient accumulation over micro-batches, optional ``torch.compile``, periodic
self-describing checkpoints, resume from ``last.pt``, ``metrics.jsonl``, ``loss.png``
and a progress bar with loss, rate and ETA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cascade.training import faults
from cascade.training.checkpoint import load_latest, prune_checkpoints, remove_temporaries, rng_state, save_checkpoint, set_rng_state
from cascade.data.order import SeededItems, StepBatchSampler
from cascade.utils.device import bf16_autocast
from cascade.nn.native import group_norm_kernels
from cascade.utils.plots import plot_loss_curve, read_metrics

__all__ = ["Stage", "Trainer", "count_parameters", "StepBatchSampler"]


class Stage(Protocol):
    """What the trainer needs from a stage."""

    name: str
    resolution: int

    def build(self, num_classes: int) -> nn.Module: ...

    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor: ...

    def report(
        self, net: nn.Module, *, step: int, out_dir: Path, class_names: list[str], val_data: Dataset | None,
        device: torch.device, generator: torch.Generator,
    ) -> dict[str, float]: ...


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
        grad_clip: float = 1.0,  # max global grad norm; 0 disables
        ema_decay: float = 0.9999,  # EMA decay (ADM: 0.9999)
        ema_warmup: bool = True,  # timm warm-up of the EMA decay, so short runs have a usable EMA
        ckpt_every: int = 5000,  # numbered checkpoint period (last.pt is refreshed with it)
        keep_ckpts: int = 3,  # numbered checkpoints kept
        sample_every: int = 5000,  # report period: sample grids / accuracies (also at the end)
        log_every: int = 100,  # metrics.jsonl period
        num_workers: int = 4,  # data loader workers per rank
        bf16: bool = True,  # bf16 autocast where native: CUDA, CPUs with AMX / AVX512-BF16
        channels_last: bool = False,  # NHWC memory format (tensor cores; on CPU with our C++ GroupNorm kernel, see README)
        micro_batch_size: int | None = None,  # per-rank micro-batch for gradient accumulation; None = the whole rank batch
        compile: bool = False,  # torch.compile the network for the training step (EMA and checkpoints keep the plain module)
        tf32: bool = True,  # TF32 matmuls/convolutions for float32 work on Ampere+ GPUs (no effect on CPU)
        progress: bool = True,  # progress bar
        max_nonfinite_steps: int = 10,  # non-finite loss/gradient steps in a row (each skipped) before the run stops
    ) -> None:
        if max_steps < 1 or batch_size < 1:
            raise ValueError("trainer.max_steps and trainer.batch_size must be >= 1")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"trainer.micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        self.micro_batch_size, self.compile, self.tf32 = micro_batch_size, compile, tf32
        faults.NonFiniteSteps(max_nonfinite_steps)  # validates the limit now: bad config fails before any work
        self.max_nonfinite_steps = max_nonfinite_steps
        self.optimizer = optimizer
        self.max_steps, self.batch_size, self.lr, self.warmup_steps = max_steps, batch_size, lr, warmup_steps
        self.grad_clip, self.ema_decay, self.ema_warmup = grad_clip, ema_decay, ema_warmup
        self.ckpt_every, self.keep_ckpts, self.sample_every, self.log_every = ckpt_every, keep_ckpts, sample_every, log_every
        self.num_workers, self.bf16, self.channels_last, self.progress = num_workers, bf16, channels_last, progress

    def fit(self, stage: Stage, dataset: Dataset, **kwargs: Any) -> dict[str, Any]:
        """Train ``stage`` on ``dataset`` into ``run_dir``; resumes from the newest intact checkpoint there.

        Keywords: ``run_dir``, ``config``, ``seed``, ``device``, ``val_data``. SIGTERM/SIGINT
        end the run cleanly after a checkpoint (``"stopped_by"`` in the result names the
        signal); see :mod:`cascade.training.faults` and README "Reliability".
        """
        with faults.StopRequest(f"[{stage.name}] ") as stop, contextlib.ExitStack() as cleanup:
            return self._fit(stage, dataset, stop=stop, cleanup=cleanup, **kwargs)

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
        stop: faults.StopRequest,
        cleanup: contextlib.ExitStack,
    ) -> dict[str, Any]:
        rank, world_size = _setup_distributed(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if self.batch_size % world_size:
            raise ValueError(f"trainer.batch_size={self.batch_size} does not split across {world_size} ranks")
        micro = self.micro_batch_size or self.batch_size // world_size
        if (self.batch_size // world_size) % micro:
            raise ValueError(f"trainer.micro_batch_size={micro} does not divide the per-rank batch "
                             f"{self.batch_size // world_size} (trainer.batch_size={self.batch_size} over {world_size} ranks)")
        if device.type == "cuda" and self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (outside bf16 autocast) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        is_main = rank == 0
        run_dir = Path(run_dir)
        ckpt_dir, sample_dir = run_dir / "checkpoints", run_dir / "samples"
        class_names = list(dataset.class_names)

        net = stage.build(num_classes=len(class_names)).to(device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        net = net.to(memory_format=memory_format)
        if is_main:
            print(f"[{stage.name}] {type(net).__name__}: {count_parameters(net) / 1e6:.1f}M parameters, "
                  f"{len(dataset)} images of {len(class_names)} classes at {stage.resolution}px, device {device}, "
                  f"{world_size} rank(s)", flush=True)
        ema = ModelEmaV3(net, decay=self.ema_decay, use_warmup=self.ema_warmup)
        optimizer = self.optimizer(net.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, self.warmup_steps)))
        generator = torch.Generator(device).manual_seed(seed * 7919 + rank)  # reseeded per micro-batch by accumulate_gradients
        nonfinite = faults.NonFiniteSteps(self.max_nonfinite_steps)

        step = 0
        last = ckpt_dir / "last.pt"
        if is_main and ckpt_dir.is_dir():
            remove_temporaries(ckpt_dir)  # left by a write that a kill interrupted
        found = load_latest(ckpt_dir, map_location=device) if ckpt_dir.is_dir() else None
        if found is not None:
            source, state = found
            if state["stage"] != stage.name:
                raise ValueError(f"{source} belongs to stage {state['stage']!r}, not {stage.name!r}; use another run_dir")
            net.load_state_dict(state["model"])
            ema.module.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["lr_scheduler"])
            saved = state["rng"].get("ranks") or [{"generator": g} for g in state["rng"]["generator"]]  # format 1: generators only
            if len(saved) == world_size:  # same layout of ranks: continue each rank's random streams exactly
                set_rng_state(saved[rank], generator, device)
            elif is_main:
                print(f"[{stage.name}] resuming on {world_size} rank(s) from a {len(saved)}-rank run: noise streams restart", flush=True)
            if "nonfinite" in state.get("trainer", {}):
                nonfinite.load_state_dict(state["trainer"]["nonfinite"])
            step = int(state["step"])
            if is_main:
                print(f"[{stage.name}] resumed from {source} at step {step}", flush=True)
        last_saved = step if found is not None else None  # step of the newest checkpoint on disk
        if step >= self.max_steps:
            if is_main:
                print(f"[{stage.name}] already trained to step {step} (max_steps={self.max_steps}); nothing to do", flush=True)
            return {"step": step, "run_dir": str(run_dir)}
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(run_dir / "metrics.jsonl", step)

        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else None
        model = ddp or net
        if device.type == "cpu" and self.channels_last:
            # Channels-last norms (bf16 and float32) run on the C++ GroupNorm kernel: build or load it now: its one-time build message then comes before the progress bar,
            # and torch.compile traces norms onto it only if it is loaded before tracing.
            group_norm_kernels()
        if self.compile:  # compile after wrapping (DDP-aware graph breaks); ``net`` stays the plain module for EMA and state_dict
            model = torch.compile(model)
        per_rank = self.batch_size // world_size
        loader = DataLoader(
            SeededItems(dataset, seed),  # item augmentations seeded by (seed, epoch, index): exact on resume
            batch_sampler=StepBatchSampler(len(dataset), per_rank, seed=seed, start_step=step, rank=rank, world_size=world_size),
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),  # worker seeds without drawing from the global RNG
            worker_init_fn=faults.ignore_stop_signals,
        )

        def checkpoint(numbered: bool) -> None:
            nonlocal last_saved
            rank_states = [rng_state(generator, device)]
            if world_size > 1:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, {k: v.cpu() for k, v in rank_states[0].items()})
                rank_states = gathered
            last_saved = step
            if not is_main:
                return
            payload = {
                "stage": stage.name, "config": config, "class_names": class_names, "resolution": stage.resolution,
                "step": step, "model": net.state_dict(), "ema": ema.module.state_dict(),
                "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                "rng": {"ranks": rank_states}, "trainer": {"nonfinite": nonfinite.state_dict()},
            }
            save_checkpoint(payload, last)
            if numbered:
                save_checkpoint(payload, ckpt_dir / f"step_{step:07d}.pt")
                prune_checkpoints(ckpt_dir, self.keep_ckpts)

        def report() -> dict[str, float]:
            if not is_main:
                return {}
            ema.module.eval()
            # fork_rng: whatever the report draws from the global generators, training continues as if it had not run.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bf16_autocast(device, self.bf16):
                metrics = stage.report(ema.module, step=step, out_dir=sample_dir, class_names=class_names, val_data=val_data,
                                       device=device, generator=torch.Generator(device).manual_seed(seed))
            if metrics:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
            return metrics

        bar = tqdm(total=self.max_steps, initial=step, desc=stage.name, unit="step", disable=not (is_main and self.progress), dynamic_ncols=True)
        net.train()
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        window_finite, faults_seen = 0, 0
        data = iter(loader)
        cleanup.callback(faults.close_loader, data)  # workers ignore SIGTERM: stop them before the process exits
        while step < self.max_steps:
            images, labels = next(data)
            optimizer.zero_grad(set_to_none=True)
            loss_value = accumulate_gradients(
                stage, model, images.to(device, non_blocking=True).contiguous(memory_format=memory_format),
                labels.to(device, non_blocking=True), micro_batch_size=micro, generator=generator, seed=seed, step=step,
                first_chunk=rank * (per_rank // micro), no_sync=ddp.no_sync if ddp is not None else None,
                autocast=partial(bf16_autocast, device, self.bf16),
            )
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf)
            bad, stopping = faults.agree([not faults.is_finite(loss_value, grad_norm), stop.requested], device, world_size)
            if nonfinite.record(not bad):  # a non-finite step changes no weights, EMA or optimizer state
                optimizer.step()
            scheduler.step()
            step += 1
            if not bad:
                ema.update(net, step=step)
                window_loss += loss_value
                window_finite += 1
            elif nonfinite.exceeded:
                kept = f"{last} (step {last_saved})" if last_saved is not None else "none (no checkpoint was written)"
                raise faults.TrainingDiverged(
                    f"{nonfinite.in_a_row} non-finite steps in a row up to step {step} (loss {loss_value}, grad norm "
                    f"{float(grad_norm)}); stopped without saving. Last good checkpoint: {kept}. Lower trainer.lr, "
                    "check the data, or raise trainer.max_nonfinite_steps")
            elif is_main:
                bar.write(f"[{stage.name}] step {step}: non-finite loss {loss_value} / grad norm {float(grad_norm)}; "
                          f"step skipped ({nonfinite.in_a_row} in a row, {nonfinite.total} in all)")
            window_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")

            if step % self.log_every == 0 or step == self.max_steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "loss": window_loss / window_finite if window_finite else None, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "steps_per_s": window_steps / elapsed,
                       "images_per_s": window_steps * self.batch_size / elapsed}
                if row["loss"] is None:
                    del row["loss"]  # every step of the window was non-finite
                data_faults = faults.data_fault_counts(dataset, device, world_size)
                row.update(nonfinite_steps=nonfinite.total, **data_faults)
                if is_main and sum(data_faults.values()) > faults_seen:
                    faults_seen = sum(data_faults.values())
                    bar.write(f"[{stage.name}] step {step}: data faults so far: " + ", ".join(f"{k}={v}" for k, v in data_faults.items()))
                if is_main:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{stage.name} training loss")
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                window_finite = 0
            if step % self.ckpt_every == 0 or step == self.max_steps or stopping:
                checkpoint(numbered=step % self.ckpt_every == 0 or step == self.max_steps)
            if stopping:
                bar.close()
                if is_main:
                    print(f"[{stage.name}] stopped by {stop.signal_name or 'a signal on another rank'} at step {step}: "
                          f"saved {last}; run the same command to resume", flush=True)
                if world_size > 1:
                    dist.barrier()
                return {"step": step, "run_dir": str(run_dir), "stopped_by": stop.signal_name or "peer"}
            if step % self.sample_every == 0 or step == self.max_steps:
                net.eval()
                metrics = report()
                net.train()
                if metrics and is_main:
                    bar.write(f"[{stage.name}] step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        bar.close()
        if is_main:
            print(f"[{stage.name}] done: {run_dir}/checkpoints/last.pt, samples in {sample_dir}, loss curve {run_dir}/loss.png", flush=True)
        if world_size > 1:
            dist.barrier()
        return {"step": step, "run_dir": str(run_dir)}


def micro_batch_seed(seed: int, step: int, chunk: int) -> int:
    """A 63-bit seed from a stable hash of (seed, step, chunk): the randomness of one micro-batch of one step."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, step, chunk), digest_size=8, person=b"step-noise").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


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
                losses = stage.loss(model, images[start : start + micro_batch_size], labels[start : start + micro_batch_size],
                                    generator)  # (m,)
            (losses.float().sum() / batch).backward()
        total += losses.detach().float().sum()
    return total.item() / batch


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past ``step`` (written after the checkpoint a resumed run starts from)."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
