"""Where a run computes: device resolution and bf16 autocast where the hardware has native bf16."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch

__all__ = ["resolve_device", "keep_freed_memory", "native_bf16", "bf16_autocast"]

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
    cpu = getattr(torch, "cpu", None)
    checks = (getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def bf16_autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 on ``device`` when ``enabled`` and native there (:func:`native_bf16`), else a no-op.

    Convolutions and matmuls run in bf16; normalisation, losses and the samplers' arithmetic
    stay in float32 (our GroupNorm and model functions cast back).
    """
    if enabled and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
