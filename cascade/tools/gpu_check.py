"""A prepared speed and correctness check for one CUDA GPU, with a tiny CPU mode so that it cannot rot.

Used by ``scripts/gpu_check.py``. Everything goes through what users run: the hydra configs (composed as
``scripts/train_stage.py`` does), the stages' ``build`` / ``loss`` / ``sample``, the trainer's step
(:func:`~cascade.training.trainer.accumulate_gradients`, gradient clipping, the config's fused AdamW), the
:class:`~cascade.training.trainer.Trainer` itself and its checkpoints. Sections, in order of value per second:

1. correctness: a 2-step run of every stage against a 1-step run resumed for one more step, with deterministic
   kernels: weights, EMA and optimizer state must be bit-identical; attention on a fused SDPA backend (flash or
   memory-efficient only, so a math fallback raises); DDP over NCCL when more than one GPU is visible;
2. training throughput in bf16 (images/s, MFU against the device's dense bf16 peak, peak memory) of every stage
   at the largest batch of a ladder that fits, eager;
3. sampling: the 64px base with classifier guidance (25 steps, batch 64) and one 1024px image through the whole
   cascade (25 + 20 + 10 steps), wall time and peak memory per stage;
4. the same training throughput under ``torch.compile``;
5. the efficiency switches one at a time on the base (channels-last, gradient checkpointing, fp32/TF32 instead
   of bf16, AdamW without ``fused``).

A :class:`Budget` guards the whole: a section that would not fit in the time left is skipped with that reason,
as is every CUDA-only part in the CPU mode. Random-weight networks are used throughout: speed does not depend on
the weights, and the resume check trains its own.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from cascade.tools.benchmark import count_flops, cpu_features, describe_cpu, peak_bf16_tflops, training_step
from cascade.training.checkpoint import load_checkpoint
from cascade.utils.device import bf16_autocast

__all__ = ["Budget", "Mode", "GpuCheck", "TimeUp", "run_gpu_check", "markdown", "write", "STAGES"]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
STAGES = ("base", "classifier", "sr256", "sr1024")
Mode = Literal["gpu", "tiny"]

# Batch ladders (global batch per step on one device); the largest that fits is reported. Tiny: CPU-sized.
LADDERS = {
    "gpu": {
        "base": (32, 64, 128, 256, 512),
        "classifier": (32, 64, 128, 256, 512),
        "sr256": (8, 16, 32, 64, 128),
        "sr1024": (8, 16, 32, 64, 128),
    },
    "tiny": {"base": (2, 4), "classifier": (2, 4), "sr256": (2,), "sr1024": (2,)},
}
# Rough seconds a section needs on an H100-class GPU (compilation dominates the compiled one); the budget guard
# skips a section whose estimate exceeds the time left.
ESTIMATE_S = {"resume": 25.0, "sdpa": 5.0, "ddp": 60.0, "train": 20.0, "sampling": 40.0, "compiled": 90.0, "switches": 30.0}


@dataclass
class Budget:
    """Wall-clock budget of the whole check; sections ask :meth:`allows` before they start."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, needed: float) -> bool:
        return self.left() >= needed


@dataclass
class GpuCheck:
    """What the check found: JSON-ready sections, and the reasons for everything skipped."""

    mode: Mode
    machine: dict[str, Any]
    correctness: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    sampling: list[dict[str, Any]] = field(default_factory=list)
    switches: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    wall_s: float = 0.0

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "machine": self.machine,
            "wall_s": self.wall_s,
            "correctness": self.correctness,
            "training": self.training,
            "sampling": self.sampling,
            "switches": self.switches,
            "skipped": self.skipped,
        }


def compose_config(stage: str, preset: str, overrides: Sequence[str] = ()):
    """The training config of ``stage`` as ``scripts/train_stage.py`` composes it."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=[f"stage={stage}", f"preset={preset}", *overrides])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _peak_memory(device: torch.device, out: dict[str, Any]) -> Iterator[None]:
    """``out["peak_memory_gb"]``: the CUDA allocator's peak inside the block (None on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# --- 1. correctness ------------------------------------------------------------------------------------


class _NoReport:
    """A stage whose periodic report (sample grids, accuracies) is skipped: the resume check compares weights only."""

    def __init__(self, stage: Any) -> None:
        self._stage = stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage, name)

    def report(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        return {}


@contextlib.contextmanager
def deterministic() -> Iterator[list[str]]:
    """Deterministic kernels (``torch.use_deterministic_algorithms``, cuDNN without autotuning), restored after.

    Ops without a deterministic implementation warn instead of raising; their messages are collected in the
    yielded list (the bit-identity comparison is what decides).
    """
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        try:
            yield messages
        finally:
            messages.extend(sorted({str(w.message).splitlines()[0][:160] for w in caught if "deterministic" in str(w.message)}))
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            torch.backends.cudnn.benchmark = benchmark


def _fit(cfg: Any, run_dir: Path, max_steps: int, device: torch.device) -> None:
    """One run of the real trainer on the config's stage and data (weights initialised from ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    stage = _NoReport(instantiate(cfg.stage))
    dataset = instantiate(cfg.data.train, resolution=stage.resolution)
    trainer = instantiate(cfg.trainer, max_steps=max_steps)
    trainer.fit(stage, dataset, run_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True), seed=cfg.seed, device=device)


def _state_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the tensors (model, EMA, optimizer state) that differ in any bit between two checkpoints."""
    out = []
    for part in ("model", "ema"):
        out += [f"{part}.{k}" for k in a[part] if not torch.equal(a[part][k], b[part][k])]
    for index, state in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][index]
        out += [f"optimizer.{index}.{k}" for k, v in state.items() if torch.is_tensor(v) and not torch.equal(v, other[k])]
    return out


def resume_check(stage: str, preset: str, device: torch.device, batch: int, work: Path) -> dict[str, Any]:
    """2 uninterrupted steps against 1 step + resume for 1 more: weights, EMA and optimizer state must be bit-identical."""
    overrides = [
        f"trainer.batch_size={batch}",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.ckpt_every=1",
        "trainer.log_every=1",
        "trainer.sample_every=1000000",
        f"data.train.size={4 * batch}",
        "trainer.compile=false",
    ]
    cfg = compose_config(stage, preset, overrides)
    start = time.perf_counter()
    with deterministic() as nondeterministic, contextlib.redirect_stdout(sys.stderr):
        _fit(cfg, work / f"{stage}-straight", 2, device)
        _fit(cfg, work / f"{stage}-resumed", 1, device)
        _fit(cfg, work / f"{stage}-resumed", 2, device)
    straight = load_checkpoint(work / f"{stage}-straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(work / f"{stage}-resumed" / "checkpoints" / "last.pt")
    differ = _state_differences(straight, resumed)
    return {
        "check": "2-step train + resume bit-identical",
        "stage": stage,
        "batch": batch,
        "passed": not differ and straight["step"] == resumed["step"] == 2,
        "differing_tensors": differ[:10],
        "nondeterministic_ops": nondeterministic,
        "wall_s": time.perf_counter() - start,
    }


def sdpa_check(stage: Any, net: nn.Module, device: torch.device, batch: int) -> dict[str, Any]:
    """The stage's own loss forward and backward with SDPA restricted to the fused backends (flash, memory-efficient):
    if any attention call needed the math fallback, PyTorch raises instead of silently falling back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    images, labels = _batch(stage, batch, 10, device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), bf16_autocast(device, True):
        try:
            stage.loss(net, images, labels, torch.Generator(device).manual_seed(0)).float().mean().backward()
            passed, error = True, None
        except RuntimeError as e:
            passed, error = False, str(e).splitlines()[0][:300]
    net.zero_grad(set_to_none=True)
    return {
        "check": "attention on a fused SDPA backend (flash / memory-efficient), bf16, forward + backward",
        "stage": stage.name,
        "passed": passed,
        "error": error,
    }


def ddp_check(stage: str, gpus: int, work: Path, timeout: float) -> dict[str, Any]:
    """``torchrun`` over ``gpus`` GPUs (NCCL) of the real training script for 2 steps, against the same run on one GPU:
    the trainer makes a step the same function of the data for any rank count at a fixed micro-batch."""
    script = ROOT / "scripts" / "train_stage.py"
    common = [
        f"stage={stage}",
        "trainer.max_steps=2",
        f"trainer.batch_size={2 * gpus}",
        "trainer.micro_batch_size=2",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.sample_every=1000000",
        "trainer.ckpt_every=2",
        f"data.train.size={8 * gpus}",
        "device=cuda",
    ]
    runs = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", str(script)],
        "single": [sys.executable, str(script)],
    }
    start = time.perf_counter()
    for name, command in runs.items():
        done = subprocess.run(
            [*command, *common, f"run_dir={work / ('ddp-' + name)}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={
                **os.environ,
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))
                if name == "ddp"
                else "0",
            },
        )
        if done.returncode != 0:
            return {
                "check": f"DDP over NCCL, {gpus} GPUs",
                "stage": stage,
                "passed": False,
                "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300],
            }
    a = load_checkpoint(work / "ddp-ddp" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(work / "ddp-single" / "checkpoints" / "last.pt")["model"]
    worst = max(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)).item() for k in a)
    return {
        "check": f"DDP over NCCL, {gpus} GPUs, 2 steps vs 1 GPU at the same micro-batch",
        "stage": stage,
        "passed": worst < 1e-2,
        "max_relative_weight_difference": worst,
        "wall_s": time.perf_counter() - start,
    }


# --- 2, 4, 5. training throughput --------------------------------------------------------------------


def _batch(
    stage: Any, batch: int, num_classes: int, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    r = stage.resolution
    images = (torch.rand(batch, 3, r, r, generator=generator) * 2 - 1).to(device).contiguous(memory_format=memory_format)
    return images, torch.randint(0, num_classes, (batch,), generator=generator).to(device)  # (B, 3, R, R), (B,)


def time_training(
    cfg: Any,
    stage: Any,
    device: torch.device,
    batch: int,
    *,
    steps: int,
    preset: str,
    compiled: bool = False,
    bf16: bool = True,
    channels_last: bool = False,
    grad_checkpointing: bool | None = None,
    fused: bool | None = None,
    num_classes: int = 10,
) -> dict[str, Any]:
    """Images/s of the trainer's step (loss, backward, clipping, optimizer) at ``batch``; raises on out-of-memory."""
    if grad_checkpointing is not None:
        stage = instantiate(
            compose_config(cfg.stage.name, preset, [f"++stage.net.grad_checkpointing={str(grad_checkpointing).lower()}"]).stage
        )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = stage.build(num_classes=num_classes).to(device).to(memory_format=memory_format)
    optimizer_kwargs = {} if fused is None else {"fused": fused}
    optimizer = instantiate(cfg.trainer.optimizer)(net.parameters(), lr=float(cfg.trainer.lr), **optimizer_kwargs)
    images, labels = _batch(stage, batch, num_classes, device, memory_format)
    forward = torch.compile(net) if compiled else None
    step = training_step(stage, net, optimizer, images, labels, device=device, bf16=bf16, forward=forward)
    row: dict[str, Any] = {}
    try:
        compile_start = time.perf_counter()
        step()  # warm-up (compilation, cuDNN algorithm choice, allocator growth)
        _sync(device)
        row["first_step_s"] = time.perf_counter() - compile_start
        with _peak_memory(device, row):
            times = []
            for _ in range(steps):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - start)
        flops = count_flops(lambda: stage.loss(net, images[:1], labels[:1], torch.Generator(device)).sum().backward())
    finally:
        net = optimizer = step = forward = None  # release the memory before the next ladder rung
        _free(device)
    best = min(times)
    row.update(
        batch=batch,
        step_s_best=best,
        step_s_median=sorted(times)[len(times) // 2],
        images_per_s=batch / best,
        train_gflop_per_image=flops / 1e9,
        achieved_tflops=flops * batch / best / 1e12,
    )
    peak = peak_bf16_tflops(device)
    row["mfu"] = row["achieved_tflops"] / peak if peak and bf16 else None
    return row


def largest_batch(
    cfg: Any,
    stage: Any,
    device: torch.device,
    ladder: Sequence[int],
    budget: Budget,
    *,
    steps: int,
    preset: str,
    compiled: bool,
    start_at: int | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """Walk up ``ladder`` (from ``start_at``) until a batch does not fit (or the budget ends): the last one that fit."""
    best, note = None, None
    for batch in ladder:
        if start_at is not None and batch < start_at:
            continue
        if best is not None and not budget.allows(ESTIMATE_S["train"]):
            note = "ladder stopped by the time budget"
            break
        try:
            best = time_training(cfg, stage, device, batch, steps=steps, preset=preset, compiled=compiled)
        except Exception as error:
            if not _is_oom(error):
                raise
            _free(device)
            note = f"batch {batch} did not fit"
            break
        if compiled:
            break  # compiling again per batch costs minutes: the compiled run uses the eager run's batch
    return best, note


# --- 3. sampling ---------------------------------------------------------------------------------------


def _timed(device: torch.device, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    row: dict[str, Any] = {}
    with _peak_memory(device, row):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        row["wall_s"] = time.perf_counter() - start
    return out, row


def sampling_check(mode: Mode, device: torch.device, preset: str, num_classes: int = 10) -> list[dict[str, Any]]:
    """Base + classifier guidance (25 steps, batch 64), and one image through base → sr256 → sr1024 (25 + 20 + 10 steps).

    Tiny mode: batch 2, 2 + 2 + 1 steps, and the cascade continues from a 16px crop of the base's 64px image (a full
    1024px solver step costs seconds on a CPU), so the upsamplers produce 64px and 256px images.
    """
    tiny = mode == "tiny"
    stages = {name: instantiate(compose_config(name, preset).stage) for name in ("base", "classifier", "sr256", "sr1024")}
    torch.manual_seed(0)
    nets = {name: stage.build(num_classes=num_classes).to(device).eval() for name, stage in stages.items()}
    generator = torch.Generator(device).manual_seed(0)
    rows = []
    batch, steps = (2, 2) if tiny else (64, 25)
    labels = torch.arange(batch, device=device) % num_classes
    with bf16_autocast(device, True):
        stages["base"].sample(
            nets["base"],
            labels[:1],
            steps=1,
            classifier=nets["classifier"],
            classifier_scale=1.0,
            generator=generator,
            progress=False,
        )  # warm-up
        _, row = _timed(
            device,
            lambda: stages["base"].sample(
                nets["base"],
                labels,
                steps=steps,
                classifier=nets["classifier"],
                classifier_scale=1.0,
                generator=generator,
                progress=False,
            ),
        )
    rows.append(
        {
            "what": "base 64px + classifier guidance (scale 1)",
            "batch": batch,
            "steps": steps,
            **row,
            "images_per_s": batch / row["wall_s"],
        }
    )
    cascade_steps = (2, 2, 1) if tiny else (25, 20, 10)
    one = labels[:1]
    with bf16_autocast(device, True):
        for name in ("base", "sr256", "sr1024"):  # warm-up at 1 step, small inputs
            image = _cascade_stage(stages, nets, name, one, 1, generator, torch.zeros(1, 3, 16, 16, device=device))
        image = None
        for name, s in zip(("base", "sr256", "sr1024"), cascade_steps):
            if tiny and name == "sr256":
                image = image[:, :, :16, :16]  # (1, 3, 16, 16)
            image, row = _timed(device, partial(_cascade_stage, stages, nets, name, one, s, generator, image))
            rows.append({"what": f"cascade 1 image: {name}", "batch": 1, "steps": s, "output_px": image.shape[-1], **row})
    total = sum(r["wall_s"] for r in rows[1:])
    rows.append(
        {
            "what": "cascade 1 image: total",
            "batch": 1,
            "steps": sum(cascade_steps),
            "output_px": rows[-1]["output_px"],
            "wall_s": total,
            "peak_memory_gb": max((r["peak_memory_gb"] or 0) for r in rows[1:]) if device.type == "cuda" else None,
        }
    )
    nets.clear()
    _free(device)
    return rows


def _cascade_stage(
    stages: dict[str, Any],
    nets: dict[str, nn.Module],
    name: str,
    labels: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    lowres: torch.Tensor | None,
) -> torch.Tensor:
    if name == "base":
        return stages["base"].sample(nets["base"], labels, steps=steps, generator=generator, progress=False)
    return stages[name].sample(nets[name], lowres, labels, steps=steps, generator=generator, progress=False)


# --- the whole check -------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": describe_cpu(cpu_features()),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpus_visible=torch.cuda.device_count(),
            gpu_memory_gb=torch.cuda.get_device_properties(device).total_memory / 2**30,
            cuda=torch.version.cuda,
            peak_bf16_tflops=peak_bf16_tflops(device),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


class TimeUp(Exception):
    """Raised (by the script's alarm) when the hard time limit is reached inside a section."""


def run_gpu_check(
    mode: Mode, device: torch.device, *, budget_s: float, stages: Sequence[str] = STAGES, log: Callable[[str], None] = print
) -> GpuCheck:
    """Run every section that fits in ``budget_s`` seconds; see the module docstring.

    Sections that would not fit are skipped with the reason; one that overruns is cut by :class:`TimeUp` (raised by
    the caller's alarm, see ``scripts/gpu_check.py``), and what was measured before is kept.
    """
    budget = Budget(budget_s)
    report = GpuCheck(mode, machine_info(device))
    try:
        _run_sections(report, mode, device, budget, stages, log)
    except TimeUp:
        report.skip("the rest of the check", f"hard time limit reached after {budget.seconds - budget.left():.0f} s")
    report.wall_s = budget.seconds - budget.left()
    return report


def _run_sections(
    report: GpuCheck, mode: Mode, device: torch.device, budget: Budget, stages: Sequence[str], log: Callable[[str], None]
) -> None:
    preset = "tiny" if mode == "tiny" else "default"
    cuda = device.type == "cuda"
    steps = 1 if mode == "tiny" else 3
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the trainer does
    configs = {name: compose_config(name, preset) for name in stages}

    def section(what: str, estimate: str) -> bool:
        if budget.allows(ESTIMATE_S[estimate]):
            log(f"gpu_check: {what} ({budget.left():.0f} s left)")
            return True
        report.skip(what, f"time budget: {budget.left():.0f} s left, about {ESTIMATE_S[estimate]:.0f} s needed")
        return False

    # 1. correctness
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name in stages:
            if section(f"{name}: 2-step train + resume", "resume"):
                report.correctness.append(resume_check(name, preset, device, 2, Path(work)))
        gpus = torch.cuda.device_count() if cuda else 0
        if gpus > 1 and section("DDP over NCCL", "ddp"):
            report.correctness.append(ddp_check("base", gpus, Path(work), timeout=max(30.0, budget.left() / 2)))
        else:
            report.skip("DDP over NCCL", "needs more than one CUDA GPU; " + (f"{gpus} visible" if cuda else "CPU mode"))
    for name in (n for n in stages if n != "sr1024"):  # sr1024 has no attention
        stage = instantiate(configs[name].stage)
        if section(f"{name}: fused SDPA backend", "sdpa"):  # CPUs have a flash kernel too, with the same input rules
            net = stage.build(num_classes=10).to(device)
            report.correctness.append(sdpa_check(stage, net, device, 2))
            del net
            _free(device)

    # 2. eager training throughput
    found: dict[str, int] = {}
    for name in stages:
        if not section(f"{name}: eager bf16 training throughput", "train"):
            continue
        stage = instantiate(configs[name].stage)
        row, note = largest_batch(
            configs[name], stage, device, LADDERS[mode][name], budget, steps=steps, preset=preset, compiled=False
        )
        if row is None:
            report.skip(f"{name}: eager training", note or "no batch of the ladder fit")
            continue
        found[name] = row["batch"]
        report.training.append({"stage": name, "variant": "eager", "ladder": list(LADDERS[mode][name]), "note": note, **row})

    # 3. sampling
    if not all(s in stages for s in STAGES):
        report.skip("sampling", "needs all four stages (--stages)")
    elif section("sampling", "sampling"):
        report.sampling = sampling_check(mode, device, preset)

    # 4. compiled training throughput
    for name in stages:
        if name not in found:
            continue
        if mode == "tiny":
            report.skip(f"{name}: torch.compile training", "tiny mode: compilation takes minutes on a CPU (GPU mode runs it)")
            continue
        if not section(f"{name}: torch.compile training throughput", "compiled"):
            continue
        stage = instantiate(configs[name].stage)
        row, note = largest_batch(
            configs[name],
            stage,
            device,
            LADDERS[mode][name],
            budget,
            steps=steps,
            preset=preset,
            compiled=True,
            start_at=found[name],
        )
        if row is not None:
            report.training.append({"stage": name, "variant": "torch.compile", "ladder": [found[name]], "note": note, **row})
        else:
            report.skip(f"{name}: torch.compile training", note or "did not fit")

    # 5. switches, one at a time, on the base at its eager batch
    if "base" not in found:
        report.skip("switches", "measured on the base stage, which did not run")
    else:
        stage = instantiate(configs["base"].stage)
        switches = [
            ("bf16 autocast, NCHW, fused AdamW (the default)", {}),
            ("channels-last", {"channels_last": True}),
            ("gradient checkpointing per block", {"grad_checkpointing": True}),
            ("fp32 (TF32 on CUDA) instead of bf16", {"bf16": False}),
            ("AdamW without fused", {"fused": False}),
        ]
        for label, kwargs in switches:
            if not section(f"base: switch '{label}'", "switches"):
                break
            try:
                row = time_training(configs["base"], stage, device, found["base"], steps=steps, preset=preset, **kwargs)
            except Exception as error:
                if not _is_oom(error):
                    raise
                _free(device)
                report.skip(f"base: switch '{label}'", f"batch {found['base']} did not fit")
                continue
            report.switches.append({"switch": label, **row})


def markdown(report: GpuCheck) -> str:
    """The check as Markdown tables."""
    m = report.machine
    device = m.get("gpu", "CPU")
    lines = [
        f"# GPU check ({report.mode} mode)",
        "",
        f"Device: {device}"
        + (
            f" ({m['gpus_visible']} visible, {m['gpu_memory_gb']:.0f} GiB, dense bf16 peak {m['peak_bf16_tflops']} TFLOP/s)"
            if "gpu" in m
            else f"; CPU {m['cpu']}"
        )
        + f"; torch {m['torch']}; wall time {report.wall_s:.0f} s.",
        "",
    ]

    def fmt(value: Any, spec: str = ".1f") -> str:
        return "–" if value is None else format(value, spec)

    if report.training:
        lines += [
            "## Training (the trainer's step; bf16 autocast where native, else float32)",
            "",
            "| stage | variant | batch | images/s | step ms | GFLOP/img | TFLOP/s | MFU | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report.training:
            lines.append(
                f"| {r['stage']} | {r['variant']} | {r['batch']} | {r['images_per_s']:.1f} | {r['step_s_best'] * 1e3:.0f} | "
                f"{r['train_gflop_per_image']:.1f} | {r['achieved_tflops']:.2f} | {fmt(r['mfu'], '.1%')} | "
                f"{fmt(r['peak_memory_gb'], '.1f')} |"
            )
        lines.append("")
    if report.sampling:
        lines += [
            "## Sampling (bf16 autocast where native, else float32)",
            "",
            "| what | batch | steps | output px | wall s | peak GiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in report.sampling:
            lines.append(
                f"| {r['what']} | {r['batch']} | {r['steps']} | {r.get('output_px', 64)} | {r['wall_s']:.2f} | "
                f"{fmt(r['peak_memory_gb'], '.1f')} |"
            )
        lines.append("")
    if report.switches:
        base = report.switches[0]["images_per_s"]
        lines += [
            "## Switches (base, one at a time)",
            "",
            "| switch | batch | images/s | vs default | peak GiB |",
            "|---|---|---|---|---|",
        ]
        for r in report.switches:
            lines.append(
                f"| {r['switch']} | {r['batch']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}× | "
                f"{fmt(r['peak_memory_gb'], '.1f')} |"
            )
        lines.append("")
    if report.correctness:
        lines += ["## Correctness", "", "| check | stage | passed | detail |", "|---|---|---|---|"]
        for r in report.correctness:
            detail = r.get("error") or ", ".join(r.get("differing_tensors", [])) or ("; ".join(r.get("nondeterministic_ops", [])))
            lines.append(f"| {r['check']} | {r['stage']} | {'yes' if r['passed'] else '**NO**'} | {detail or ''} |")
        lines.append("")
    if report.skipped:
        lines += ["## Skipped", ""] + [f"- {s['what']}: {s['reason']}" for s in report.skipped] + [""]
    return "\n".join(lines)


def write(report: GpuCheck, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    return out / "gpu_check.json", out / "gpu_check.md"
