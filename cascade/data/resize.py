"""Resizing between cascade resolutions (docs/design.md §2.8, "Low-res making"): kornia, half-pixel centres.

The upsamplers make their low-res inputs with :func:`downsample` and resize the conditioning
up with :func:`upsample`; the evaluation uses the same two to make held-out inputs and the
bicubic baseline.
"""

from __future__ import annotations

from typing import Literal

import kornia
from torch import Tensor

__all__ = ["UpsampleMode", "downsample", "upsample"]

UpsampleMode = Literal["bicubic", "bilinear", "nearest"]


def downsample(images: Tensor, factor: int) -> Tensor:
    """(B, C, H, W) → (B, C, H/f, W/f), antialiased (kornia: Gaussian prefilter σ = (f−1)/2, then bilinear)."""
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the downsampling factor {factor}")
    return kornia.geometry.transform.resize(images, (h // factor, w // factor), interpolation="bilinear",
                                            align_corners=False, antialias=True)


def upsample(images: Tensor, factor: int, mode: UpsampleMode = "bicubic") -> Tensor:
    """(B, C, h, w) → (B, C, f·h, f·w) by ``mode`` interpolation (kornia; half-pixel centres, edges replicated)."""
    h, w = images.shape[-2:]
    return kornia.geometry.transform.resize(images, (factor * h, factor * w), interpolation=mode,
                                            align_corners=None if mode == "nearest" else False)
