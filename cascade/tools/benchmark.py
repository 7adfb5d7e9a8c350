"""Measuring speed: training steps timed side by side, peak memory, model FLOPs, sampling latency, a diffusers twin.

Used by ``scripts/benchmark.py``. A *variant* is one way of running a stage's training step
(a network, a memory format, bf16 autocast on or off, compiled or not); all variants of a
stage are timed in interleaved rounds in one process, so that load from other processes
hits them alike, and each is reported by its fastest and median step.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import inspect
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from cascade.nn.native import group_norm_kernels
from cascade.training.checkpoint import inference_memory_format
from cascade.training.trainer import Stage, accumulate_gradients
from cascade.utils.device import bf16_autocast, native_bf16

__all__ = [
    "Variant",
    "PeakMemory",
    "peak_bf16_tflops",
    "count_flops",
    "training_step",
    "time_interleaved",
    "DiffusersTwin",
    "diffusers_twin",
    "unet_kwargs",
    "cpu_features",
    "describe_cpu",
]

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; matched against the device name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def cpu_features() -> dict[str, Any]:
    """The CPU's instruction sets that decide our CPU speed: AMX and AVX512-BF16 (native bf16 matrix arithmetic;
    without either, oneDNN emulates bf16 and bf16 autocast is off), AVX-512 and AVX2 (the vector width of float32
    code, and which build of the C++ kernels runs), from the kernel's CPU flags (Linux) and PyTorch's own detection."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    cpu = getattr(torch, "cpu", None)

    def torch_says(name: str) -> bool:
        check = getattr(cpu, name, None)
        return bool(check()) if check is not None else False

    capability = torch.backends.cpu.get_cpu_capability()
    return {
        "amx": torch_says("_is_amx_tile_supported") or "amx_tile" in flags,
        "avx512_bf16": torch_says("_is_avx512_bf16_supported") or "avx512_bf16" in flags,
        "avx512": capability.startswith("AVX512") or "avx512f" in flags,
        "avx2": capability.startswith(("AVX2", "AVX512")) or "avx2" in flags,
        "torch_cpu_capability": capability,
        "model_name": _cpu_model_name(),
    }


def _cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def describe_cpu(features: dict[str, Any]) -> str:
    """One line, e.g. ``Intel Xeon … — AVX-512, AVX2; no AVX512-BF16, no AMX (bf16 emulated: float32 runs)``."""
    names = (("amx", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512", "AVX-512"), ("avx2", "AVX2"))
    has = [label for key, label in names if features[key]]
    lacks = [f"no {label}" for key, label in names if not features[key]]
    kind = "native bf16" if features["amx"] or features["avx512_bf16"] else "bf16 emulated: float32 runs"
    return f"{features['model_name']}: {', '.join(has) or 'none of them'}; {', '.join(lacks) or 'all'} ({kind})"


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocator peak, or on CPU (Linux) the process RSS sampled every ms.

    On CPU, freed memory that the C allocator kept is first handed back (glibc ``malloc_trim``), so
    the start is the live memory and the peak is the block's working set above it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self, start: int) -> None:
        while not self._stop.wait(0.001):
            self.peak_bytes = max(self.peak_bytes, self._rss() - start)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self._thread = threading.Thread(target=self._poll, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()


class _FlopCount(TorchDispatchMode):
    """Sums torch's FLOP formulas (``torch.utils.flop_counter``) over the ops run inside it.

    ``FlopCounterMode`` does the same but also tracks modules with backward hooks, which
    ``torch.autograd.grad`` on a leaf (classifier guidance) refuses.
    """

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations (multiply and add counted apart) of the matmuls, convolutions and attention ``fn`` runs."""
    with _FlopCount() as counter:
        fn()
    return int(counter.total)


@dataclass
class Variant:
    """One way of running a training step: ``prepare`` (untimed, e.g. memory-format switch) then ``step`` (timed)."""

    model: str  # "ours" or "diffusers"
    name: str  # e.g. "bf16 channels-last"
    step: Callable[[], None]
    prepare: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)  # seconds per step, one per round
    peak_bytes: int = 0

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return sorted(self.times)[len(self.times) // 2]


def training_step(
    stage: Stage,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    device: torch.device,
    bf16: bool,
    forward: nn.Module | None = None,
) -> Callable[[], None]:
    """The trainer's step on one batch: zero grads, the stage's loss and backward (:func:`~cascade.training.trainer.accumulate_gradients`),
    gradient clipping and the optimizer step. ``forward`` (e.g. a compiled ``net``) runs the network if given."""
    generator = torch.Generator(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(
            stage,
            net if forward is None else forward,
            images,
            labels,
            micro_batch_size=len(images),
            generator=generator,
            seed=0,
            step=0,
            first_chunk=0,
            autocast=partial(bf16_autocast, device, bf16),
        )
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()

    return step


def time_interleaved(
    variants: Sequence[Variant], *, rounds: int, warmup: int, device: torch.device, on_step: Callable[[], None] = lambda: None
) -> None:
    """Run every variant ``warmup`` untimed steps, then ``rounds`` rounds of one timed step each (in ``Variant.times``).

    Peak memory (``Variant.peak_bytes``) is measured in one more, untimed, round first: on CPU
    :class:`PeakMemory` hands the allocator's free memory back to the OS, and the timed steps should
    not pay for faulting it in again (a training loop keeps it, see
    :func:`~cascade.utils.device.keep_freed_memory`).
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for v in variants:
        v.prepare()
        sync()
        with PeakMemory(device) as memory:
            v.step()
            sync()
        v.peak_bytes = memory.peak_bytes
        on_step()
    for r in range(warmup + rounds):
        for v in variants:
            v.prepare()
            sync()
            start = time.perf_counter()
            v.step()
            sync()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                v.times.append(elapsed)
            on_step()


# --- diffusers' UNet2DModel at our U-Net's configuration ---------------------------------------------


def unet_kwargs(net_factory: Callable[..., nn.Module], filled: dict[str, Any]) -> dict[str, Any]:
    """Every keyword our U-Net is built with: the config's partial, the stage's run-time values, and the defaults."""
    from cascade.nn import UNet

    given = dict(getattr(net_factory, "keywords", {}))
    defaults = {k: p.default for k, p in inspect.signature(UNet).parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **given, **filled}


class DiffusersTwin(nn.Module):
    """diffusers' ``UNet2DModel`` behind our network signature, so a stage's loss can train it unchanged.

    ``lowres`` is concatenated to x_t on channels (as our U-Net does); ``aug_level`` is accepted and
    ignored (UNet2DModel has one embedding slot; the level's small MLP is left out of the comparison).
    """

    def __init__(self, model: nn.Module, num_classes: int | None = None) -> None:
        super().__init__()
        self.model, self.num_classes = model, num_classes  # num_classes: the null label a stage's label dropout uses

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        class_labels: Tensor | None = None,
        lowres: Tensor | None = None,
        aug_level: Tensor | None = None,
    ) -> Tensor:
        if lowres is not None:
            x_t = torch.cat([x_t, lowres.to(x_t.dtype)], dim=1)  # (B, 3 + 3, H, W)
        return self.model(x_t, t, class_labels=class_labels).sample  # (B, out, H, W)


def _diffusers_config(kw: dict[str, Any], layers: int, width_scale: float) -> dict[str, Any]:
    mult, groups = list(kw["channel_mult"]), int(kw["norm_groups"])
    widths = [max(groups, round(kw["model_channels"] * m * width_scale / groups) * groups) for m in mult]
    attention = [kw["resolution"] // 2**i in set(kw["attention_resolutions"]) for i in range(len(mult))]
    resample = "resnet" if kw["resblock_updown"] else "conv"
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if kw["resblock_updown"] else ("DownBlock2D", "UpBlock2D")
    )
    heads = kw["head_channels"] or widths[-1] // kw["num_heads"]
    return dict(
        sample_size=kw["resolution"],
        in_channels=kw["in_channels"] + kw["lowres_channels"],
        out_channels=kw["out_channels"],
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attention)),
        downsample_type=resample,
        upsample_type=resample,
        attention_head_dim=heads,
        norm_num_groups=groups,
        resnet_time_scale_shift="scale_shift" if kw["use_scale_shift_norm"] else "default",
        dropout=kw["dropout"],
        add_attention=kw["middle_attention"],
        num_class_embeds=None if kw["num_classes"] is None else kw["num_classes"] + int(kw["null_class"]),
    )


def diffusers_twin(kw: dict[str, Any], target_params: int) -> tuple[DiffusersTwin, dict[str, Any]]:
    """The ``UNet2DModel`` closest to our U-Net built with ``kw`` (see :func:`unet_kwargs`): same widths, depth,
    attention levels, up/down blocks, scale-shift norm and conditioning; where ours has per-level block
    counts (UNet2DModel has one), the block count and a width scale are chosen to match ``target_params``.

    Returns the model (in a :class:`DiffusersTwin`) and its config. Needs ``diffusers`` (the ``dev`` extra).
    """
    try:
        from diffusers import UNet2DModel
    except ImportError as error:
        raise ImportError("the diffusers comparison needs diffusers: pip install -e '.[dev]'") from error
    if kw.get("patch_size", 1) != 1:  # UNet2DModel has no patch input: its full-resolution twin would not be the same design
        raise ValueError(f"no UNet2DModel twin of a patched U-Net (patch_size {kw['patch_size']}); run with --no-diffusers")
    blocks = (
        [kw["num_res_blocks"]] * len(kw["channel_mult"]) if isinstance(kw["num_res_blocks"], int) else list(kw["num_res_blocks"])
    )
    candidates = []
    for layers in range(min(blocks), max(blocks) + 1):
        for scale in [1.0] if min(blocks) == max(blocks) else [0.75 + 0.05 * i for i in range(16)]:
            config = _diffusers_config(kw, layers, scale)
            with torch.device("meta"):
                params = sum(p.numel() for p in UNet2DModel(**config).parameters())
            candidates.append((abs(math.log(params / target_params)), config))
    config = min(candidates, key=lambda c: c[0])[1]
    return DiffusersTwin(UNet2DModel(**config), kw["num_classes"]), config


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for float32 matmuls and convolutions inside the block (CUDA), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --- one stage ---------------------------------------------------------------------------------------


@dataclass
class StageBench:
    """Everything measured for one stage (JSON-ready through :meth:`summary`)."""

    stage: str
    batch_size: int
    params: int
    train_flops_per_image: int  # forward + backward of the network in one training example
    sample_flops_per_image_step: int  # one network evaluation at sampling resolution
    variants: list[Variant]
    twin_params: int | None = None
    twin_config: dict[str, Any] | None = None
    twin_flops_per_image: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)  # in the layout load_stage picks here, and per layout
    peak_tflops: float | None = None

    def images_per_s(self, v: Variant, best: bool = True) -> float:
        return self.batch_size / (v.best if best else v.median)

    def find(self, model: str, name: str) -> Variant | None:
        return next((v for v in self.variants if v.model == model and v.name == name), None)

    def summary(self) -> dict[str, Any]:
        rows = []
        for v in self.variants:
            flops = self.train_flops_per_image if v.model == "ours" else self.twin_flops_per_image
            row = {
                "model": v.model,
                "variant": v.name,
                "images_per_s": self.images_per_s(v),
                "images_per_s_median": self.images_per_s(v, best=False),
                "step_s_best": v.best,
                "step_s_median": v.median,
                "peak_memory_mb": v.peak_bytes / 2**20,
                "achieved_tflops": flops * self.images_per_s(v) / 1e12,
            }
            if self.peak_tflops:
                row["mfu"] = row["achieved_tflops"] / self.peak_tflops
            rows.append(row)
        return {
            "stage": self.stage,
            "batch_size": self.batch_size,
            "params": self.params,
            "train_gflops_per_image": self.train_flops_per_image / 1e9,
            "sample_gflops_per_image_step": self.sample_flops_per_image_step / 1e9,
            "twin_params": self.twin_params,
            "twin_config": self.twin_config,
            "variants": rows,
            "sampling": self.sampling,
            "peak_bf16_tflops": self.peak_tflops,
            "speedups": self.speedups(),
        }

    def speedups(self) -> dict[str, float]:
        """Throughput ratios: each speed option against its baseline, and ours against diffusers per variant."""
        out: dict[str, float] = {}
        pairs = [
            ("bf16 (vs fp32)", "bf16", "fp32"),
            ("channels-last (bf16)", "bf16 channels-last", "bf16"),
            ("channels-last (fp32)", "fp32 channels-last", "fp32"),
            ("grad checkpointing (bf16)", "bf16 grad-ckpt", "bf16"),
            ("torch.compile (bf16)", "bf16 compiled", "bf16"),
            ("torch.compile (bf16 channels-last)", "bf16 channels-last compiled", "bf16 channels-last"),
            ("tf32 (vs fp32)", "fp32 tf32", "fp32"),
        ]
        for model in ("ours", "diffusers"):
            for label, a, b in pairs:
                va, vb = self.find(model, a), self.find(model, b)
                if va and vb:
                    out[f"{model}: {label}"] = vb.best / va.best
        for v in self.variants:
            twin = self.find("diffusers", v.name) if v.model == "ours" else None
            if twin:
                out[f"ours / diffusers: {v.name}"] = twin.best / v.best
        ours = [v for v in self.variants if v.model == "ours" and "grad-ckpt" not in v.name]
        theirs = [v for v in self.variants if v.model == "diffusers"]
        if ours and theirs:
            out["ours best / diffusers best"] = min(v.best for v in theirs) / min(v.best for v in ours)
        return out


def benchmark_stage(
    stage: Any,
    *,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    rounds: int,
    warmup: int,
    compile: bool = False,
    compare: bool = True,
    ckpt_net: nn.Module | None = None,
    sample: Callable[[nn.Module, int], None] | None = None,
    sample_batch: int = 1,
    sample_steps: int = 5,
    optimizer: Callable[..., torch.optim.Optimizer] = partial(torch.optim.AdamW, lr=1e-4),
    on_step: Callable[[], None] = lambda: None,
) -> StageBench:
    """Time a stage's training step in every variant (ours, and diffusers' twin for U-Net stages), and its sampling.

    ``ckpt_net``: the stage's network built with gradient checkpointing (its weights are copied
    from the plain one). ``sample(net, steps)``: one sampling run of ``sample_batch`` images.
    ``optimizer(params)``: the trainer's optimizer (the config's ``trainer.optimizer`` at its ``lr``).
    """
    from cascade.nn import UNet

    generator = torch.Generator().manual_seed(0)
    net = stage.build(num_classes=num_classes).to(device)
    r = stage.resolution
    images = (torch.rand(batch_size, 3, r, r, generator=generator) * 2 - 1).to(device)  # (B, 3, R, R)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)  # (B,)
    native = native_bf16(device)  # else bf16 autocast is off (see cascade.utils.device) and the bf16 variants would be fp32
    precisions = [("fp32", False), ("bf16", True)] if native else [("fp32", False)]
    if device.type == "cuda":
        precisions.insert(1, ("fp32 tf32", False))

    def variants_of(model: str, module: nn.Module, extra: bool) -> list[Variant]:
        out = []
        for fmt_name, fmt in (("", torch.contiguous_format), (" channels-last", torch.channels_last)):
            for prec, bf16 in precisions:
                if prec == "fp32 tf32" and fmt_name:
                    continue
                copy_ = copy.deepcopy(module).to(memory_format=fmt)
                step = training_step(
                    stage,
                    copy_,
                    optimizer(copy_.parameters()),
                    images.contiguous(memory_format=fmt),
                    labels,
                    device=device,
                    bf16=bf16,
                )
                if device.type == "cuda":
                    step = _with(partial(tf32, prec == "fp32 tf32"), step)
                out.append(Variant(model, f"{prec}{fmt_name}", step))
        if extra and ckpt_net is not None:
            ckpt_net.load_state_dict(net.state_dict())
            out.append(
                Variant(
                    model,
                    f"{precisions[-1][0]} grad-ckpt",
                    training_step(stage, ckpt_net, optimizer(ckpt_net.parameters()), images, labels, device=device, bf16=native),
                )
            )
        if compile:
            group_norm_kernels()  # as the trainer does: traced norms use the C++ kernel only if it is loaded
            for fmt_name, fmt in (("", torch.contiguous_format), (" channels-last", torch.channels_last)):
                plain = copy.deepcopy(module).to(memory_format=fmt)
                out.append(
                    Variant(
                        model,
                        f"{precisions[-1][0]}{fmt_name} compiled",
                        training_step(
                            stage,
                            plain,
                            optimizer(plain.parameters()),
                            images.contiguous(memory_format=fmt),
                            labels,
                            device=device,
                            bf16=native,
                            forward=torch.compile(plain),
                        ),
                    )
                )
        return out

    variants = variants_of("ours", net, extra=True)
    bench = StageBench(stage.name, batch_size, sum(p.numel() for p in net.parameters()), 0, 0, variants)
    one = images[:1], labels[:1]
    bench.train_flops_per_image = count_flops(lambda: stage.loss(net, *one, torch.Generator(device)).sum().backward())
    net.zero_grad(set_to_none=True)
    if compare and getattr(stage.net, "func", None) is UNet:
        kw = unet_kwargs(stage.net, stage.net_kwargs(num_classes))
        twin, bench.twin_config = diffusers_twin(kw, bench.params)
        twin = stage.precondition(twin).to(device)  # the stage's own wrapping (LowresPrior): both train through one loss
        bench.twin_params = sum(p.numel() for p in twin.parameters())
        bench.twin_flops_per_image = count_flops(lambda: stage.loss(twin, *one, torch.Generator(device)).sum().backward())
        twin.zero_grad(set_to_none=True)
        variants += variants_of("diffusers", twin, extra=False)
    bench.peak_tflops = peak_bf16_tflops(device)
    time_interleaved(variants, rounds=rounds, warmup=warmup, device=device, on_step=on_step)

    if sample is not None:
        net.eval()
        with torch.inference_mode():
            bench.sample_flops_per_image_step = count_flops(lambda: sample(net, 1)) // sample_batch
        # The layout load_stage gives the network here, and on CPUs where that is channels-last also NCHW, interleaved.
        layouts = {"NCHW": torch.contiguous_format}
        if inference_memory_format(device) == torch.channels_last:
            layouts["channels-last"] = torch.channels_last
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        best = dict.fromkeys(layouts, math.inf)
        for fmt in layouts.values():
            sample(net.to(memory_format=fmt), 1)  # warm-up
        for _ in range(2):
            for layout, fmt in layouts.items():
                net.to(memory_format=fmt)
                sync()
                start = time.perf_counter()
                sample(net, sample_steps)
                sync()
                best[layout] = min(best[layout], time.perf_counter() - start)
        used = list(layouts)[-1]
        bench.sampling = {
            "batch": sample_batch,
            "steps": sample_steps,
            "layout": used,
            "s_per_step": best[used] / sample_steps,
            "s_per_image": best[used] / sample_batch,
            "s_per_image_step": best[used] / sample_steps / sample_batch,
            "s_per_step_by_layout": {layout: seconds / sample_steps for layout, seconds in best.items()},
        }
    return bench


def _with(context: Callable[[], contextlib.AbstractContextManager], fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run inside a fresh ``context()``."""

    def run() -> None:
        with context():
            fn()

    return run
