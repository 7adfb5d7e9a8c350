"""Where a run computes: device resolution, bf16 autocast where the hardware has native bf16, and the precision and
memory format a training run picks for the machine it is on (:func:`choose_compute`)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "resolve_device",
    "keep_freed_memory",
    "native_bf16",
    "bf16_autocast",
    "cpu_kind",
    "cpu_vector_width",
    "cpu_vendor",
    "bf16_trains_faster",
    "ComputeChoice",
    "choose_compute",
]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error.

    A CPU run also gets :func:`keep_freed_memory` (its tensors are big for a CPU allocator).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA GPU is visible; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "cpu":
        keep_freed_memory()
    return torch.device(name)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (Linux only).

    glibc serves large blocks (a 64-channel 1024² activation is 256 MB) with a fresh ``mmap`` and
    unmaps them on free, so every such tensor is page-faulted in again, op after op: a tiny sr1024
    step at 1024px spent as much time in the kernel as in convolutions. With mmap off and trimming
    off, freed blocks stay in the heap and are reused (the usual remedy is jemalloc/tcmalloc via
    LD_PRELOAD; this needs nothing installed). Full-size sr1024 sampling on a CPU gains the most
    (README, "Speed and scale"). The process keeps its peak memory until it exits.
    Returns whether the allocator was changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix arithmetic is native here: CUDA with bf16 support, or a CPU with AVX512-BF16/AMX.

    On other CPUs oneDNN emulates bf16 and autocast would slow training down.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _cpu_has("_is_amx_tile_supported") or _cpu_has("_is_avx512_bf16_supported")


def _cpu_has(check: str) -> bool:
    """PyTorch's run-time CPU feature check ``torch.cpu.<check>()``; False where this PyTorch lacks it."""
    found = getattr(getattr(torch, "cpu", None), check, None)
    return found is not None and bool(found())


def bf16_autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 on ``device`` when ``enabled`` and native there (:func:`native_bf16`), else a no-op.

    Convolutions and matmuls run in bf16; normalisation, losses and the samplers' arithmetic
    stay in float32 (our GroupNorm and model functions cast back).
    """
    if enabled and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_kind() -> str:
    """What decides CPU speed here, e.g. ``AVX-512, no AVX512-BF16/AMX``: native bf16 matrix units or not, and the
    float32 vector width (PyTorch's run-time detection)."""
    has = [
        label
        for check, label in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
        if _cpu_has(check)
    ]
    width = cpu_vector_width()
    return f"{width}, {'/'.join(has)}" if has else f"{width}, no AVX512-BF16/AMX"


def cpu_vector_width() -> str:
    """The widest vector instructions PyTorch's CPU kernels use here: ``AVX-512``, ``AVX2``, or its own name for others."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX-512" if capability.startswith("AVX512") else "AVX2" if capability.startswith("AVX2") else capability


def cpu_vendor() -> str:
    """The CPU's vendor string from ``/proc/cpuinfo`` (``GenuineIntel``, ``AuthenticAMD``, ...), or ``""`` where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def bf16_trains_faster(device: torch.device) -> tuple[bool, str]:
    """Whether a bf16-autocast training step beats a float32 one here, and why: ``trainer.bf16=auto``.

    Native bf16 (:func:`native_bf16`) is not enough on every CPU. With AMX tiles, and on AMD's AVX512-BF16 (EPYC),
    bf16 training steps measured faster than float32 ones; on an Intel CPU with AVX512-BF16 but no AMX (measured on an
    Emerald Rapids guest whose AMX is hidden; Cooper Lake is the other such part, not measured) every tiny stage's
    step measured slower in bf16 (README, "Speed and scale" has the ratios). A likely reason: there, float32 FMAs run
    at full 512-bit rate, so bf16 dot products gain little and the conversions around oneDNN's bf16 kernels cost more.
    """
    if not native_bf16(device):
        return False, "bf16 would be emulated"
    if device.type == "cuda":
        return True, "native bf16 on this GPU"
    if not _cpu_has("_is_amx_tile_supported") and cpu_vendor() == "GenuineIntel":
        return False, "Intel AVX512-BF16 without AMX: float32 steps are faster"
    return True, "native bf16"


@dataclass(frozen=True)
class ComputeChoice:
    """The precision and memory format of a training run, and why (:func:`choose_compute`)."""

    bf16: bool  # bf16 autocast really on (asked for and native here)
    channels_last: bool  # network and batches in NHWC
    reason: str

    def line(self) -> str:
        precision = "bf16 autocast" if self.bf16 else "float32"
        layout = "channels-last" if self.channels_last else "NCHW"
        return f"compute: {precision}, {layout} ({self.reason})"


def choose_compute(
    device: torch.device,
    *,
    bf16: bool | Literal["auto"],  # the config's trainer.bf16: true (wherever native), false, or auto (where it pays)
    channels_last: bool | Literal["auto"],  # the config's trainer.channels_last
    norm_kernel: Callable[[], bool],  # whether the C++ channels-last GroupNorm kernel is available (may build it)
) -> ComputeChoice:
    """Precision and memory format for ``device``; ``auto`` picks each by what the machine has.

    - ``bf16=True``: bf16 autocast wherever native (:func:`native_bf16`), float32 elsewhere. ``bf16="auto"``: only where
      native and faster for training (:func:`bf16_trains_faster`: not on Intel CPUs with AVX512-BF16 but no AMX).
    - ``channels_last="auto"`` on a CPU: channels-last when the C++ GroupNorm kernel is there (oneDNN's convolutions
      run NHWC without layout conversions, and the norms run on the kernel in bf16 and float32; README "Speed and
      scale" has the measured gain per CPU kind); NCHW without it (PyTorch's channels-last GroupNorm is the slow one),
      and NCHW on a CPU whose widest vectors are AVX2 (float32 there: oneDNN's NCHW training steps measured faster
      than NHWC for every stage, README "On a CPU with AVX2 only"; sampling there stays channels-last, see
      :func:`cascade.training.checkpoint.inference_memory_format`).
    - ``channels_last="auto"`` on CUDA: channels-last under bf16 (cuDNN's tensor-core convolutions are NHWC kernels),
      NCHW in float32.
    """
    if channels_last not in (True, False, "auto"):
        raise ValueError(f"trainer.channels_last must be true, false or auto, got {channels_last!r}")
    if bf16 not in (True, False, "auto"):
        raise ValueError(f"trainer.bf16 must be true, false or auto, got {bf16!r}")
    native = native_bf16(device)
    faster, why = bf16_trains_faster(device)
    autocast = native if bf16 is True else faster if bf16 == "auto" else False
    where = "this GPU" if device.type == "cuda" else f"this CPU has {cpu_kind()}"
    if bf16 is False:
        precision = f"bf16 off by config; {where}"
    elif bf16 is True and native:
        precision = f"{where}: native bf16 (trainer.bf16=true)"
    else:
        precision = f"{where}: {why}"
    if channels_last != "auto":
        return ComputeChoice(autocast, bool(channels_last), f"{precision}; layout set in the config")
    if device.type == "cuda":
        layout = "NHWC tensor-core convolutions" if autocast else "float32 convolutions"
        return ComputeChoice(autocast, autocast, f"{precision}; auto layout: {layout}")
    if not autocast and cpu_vector_width() == "AVX2":
        return ComputeChoice(False, False, f"{precision}; auto layout: NCHW, whose float32 training steps are faster on AVX2")
    if norm_kernel():
        return ComputeChoice(autocast, True, f"{precision}; auto layout: NHWC convolutions with the C++ GroupNorm kernel")
    return ComputeChoice(autocast, False, f"{precision}; auto layout: no C++ GroupNorm kernel, so NCHW")
