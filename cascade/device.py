"""Where a run computes: device resolution and bf16 autocast where the hardware has native bf16."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["resolve_device", "native_bf16", "bf16_autocast"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA GPU is visible; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


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
