"""The generic training loop shared by every stage.

A stage (see ``stages/``) says *what* is learned: it builds its network, computes a
per-example loss from a batch, and reports (sample grids, accuracies). The trainer says
*how*: AdamW with linear warm-up, EMA of the weights (timm ``ModelEmaV3``), gradient
clipping, bf16 autocast (CUDA, and CPUs with native bf16), data-parallel training under ``torchrun``, periodic
self-describing checkpoints, resume from ``last.pt``, ``metrics.jsonl``, ``loss.png``
and a progress bar with loss, rate and ETA.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cascade.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from cascade.device import bf16_autocast
from cascade.plots import plot_loss_curve, read_metrics

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


class StepBatchSampler:
    """Index batches as a pure function of the global step: resume needs only the step.

    Epoch e is a permutation drawn from (seed, e); under data parallelism rank r takes every
    world-th index of it, so ranks see disjoint data and the global batch is split evenly.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if size < batch_size * world_size:
            raise ValueError(f"the data set has {size} items, fewer than one global batch ({batch_size * world_size}); lower trainer.batch_size")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.batches_per_epoch = size // (batch_size * world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.size, generator=g)
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, offset = divmod(step, self.batches_per_epoch)
            indices = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield indices[b * self.batch_size : (b + 1) * self.batch_size]
            step = (epoch + 1) * self.batches_per_epoch


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
        channels_last: bool = False,  # NHWC memory format (faster convolutions on CPU oneDNN and tensor cores)
        progress: bool = True,  # progress bar
    ) -> None:
        if max_steps < 1 or batch_size < 1:
            raise ValueError("trainer.max_steps and trainer.batch_size must be >= 1")
        self.optimizer = optimizer
        self.max_steps, self.batch_size, self.lr, self.warmup_steps = max_steps, batch_size, lr, warmup_steps
        self.grad_clip, self.ema_decay, self.ema_warmup = grad_clip, ema_decay, ema_warmup
        self.ckpt_every, self.keep_ckpts, self.sample_every, self.log_every = ckpt_every, keep_ckpts, sample_every, log_every
        self.num_workers, self.bf16, self.channels_last, self.progress = num_workers, bf16, channels_last, progress

    def fit(
        self,
        stage: Stage,
        dataset: Dataset,
        *,
        run_dir: str | Path,
        config: dict[str, Any],
        seed: int = 0,
        device: torch.device = torch.device("cpu"),
        val_data: Dataset | None = None,
    ) -> dict[str, Any]:
        """Train ``stage`` on ``dataset`` into ``run_dir``; resumes from ``run_dir/checkpoints/last.pt``."""
        rank, world_size = _setup_distributed(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if self.batch_size % world_size:
            raise ValueError(f"trainer.batch_size={self.batch_size} does not split across {world_size} ranks")
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
        generator = torch.Generator(device).manual_seed(seed * 7919 + rank)

        step = 0
        last = ckpt_dir / "last.pt"
        if last.exists():
            state = load_checkpoint(last, map_location=device)
            if state["stage"] != stage.name:
                raise ValueError(f"{last} belongs to stage {state['stage']!r}, not {stage.name!r}; use another run_dir")
            net.load_state_dict(state["model"])
            ema.module.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["lr_scheduler"])
            saved = state["rng"]["generator"]
            if len(saved) == world_size:  # same layout of ranks: continue each rank's noise stream
                generator.set_state(saved[rank].cpu())
            elif is_main:
                print(f"[{stage.name}] resuming on {world_size} rank(s) from a {len(saved)}-rank run: noise streams restart", flush=True)
            step = int(state["step"])
            if is_main:
                print(f"[{stage.name}] resumed from {last} at step {step}", flush=True)
        if step >= self.max_steps:
            if is_main:
                print(f"[{stage.name}] already trained to step {step} (max_steps={self.max_steps}); nothing to do", flush=True)
            return {"step": step, "run_dir": str(run_dir)}
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(run_dir / "metrics.jsonl", step)

        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else net
        per_rank = self.batch_size // world_size
        loader = DataLoader(
            dataset,
            batch_sampler=StepBatchSampler(len(dataset), per_rank, seed=seed, start_step=step, rank=rank, world_size=world_size),
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

        def checkpoint(numbered: bool) -> None:
            gen_states = [generator.get_state().cpu()]
            if world_size > 1:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, gen_states[0])
                gen_states = gathered
            if not is_main:
                return
            payload = {
                "stage": stage.name, "config": config, "class_names": class_names, "resolution": stage.resolution,
                "step": step, "model": net.state_dict(), "ema": ema.module.state_dict(),
                "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                "rng": {"generator": gen_states, "torch": torch.get_rng_state()},
            }
            save_checkpoint(payload, last)
            if numbered:
                save_checkpoint(payload, ckpt_dir / f"step_{step:07d}.pt")
                prune_checkpoints(ckpt_dir, self.keep_ckpts)

        def report() -> dict[str, float]:
            if not is_main:
                return {}
            ema.module.eval()
            with bf16_autocast(device, self.bf16):
                metrics = stage.report(ema.module, step=step, out_dir=sample_dir, class_names=class_names, val_data=val_data,
                                       device=device, generator=torch.Generator(device).manual_seed(seed))
            if metrics:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
            return metrics

        bar = tqdm(total=self.max_steps, initial=step, desc=stage.name, unit="step", disable=not (is_main and self.progress), dynamic_ncols=True)
        net.train()
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        data = iter(loader)
        while step < self.max_steps:
            images, labels = next(data)
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            with bf16_autocast(device, self.bf16):
                loss = stage.loss(model, images, labels, generator).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            step += 1
            ema.update(net, step=step)
            window_loss += loss.item()
            window_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")

            if step % self.log_every == 0 or step == self.max_steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "loss": window_loss / window_steps, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "steps_per_s": window_steps / elapsed,
                       "images_per_s": window_steps * self.batch_size / elapsed}
                if is_main:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{stage.name} training loss")
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if step % self.ckpt_every == 0 or step == self.max_steps:
                checkpoint(numbered=True)
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past ``step`` (written after the checkpoint a resumed run starts from)."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
