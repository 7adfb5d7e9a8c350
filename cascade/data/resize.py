"""Resizing between cascade resolutions (docs/design.md §2.8, "Low-res making"): kornia, half-pixel centres.

The upsamplers make their low-res inputs with :func:`downsample` and resize the conditioning
up with :func:`upsample`; the evaluation uses the same two to make held-out inputs and the
bicubic baseline.
"""

from __future__ import annotations

from typing import Literal

import kornia
from torch import Tensor

__all__ = ["UpsampleMode", "downsample", "upsample", "central_crop"]

UpsampleMode = Literal["bicubic", "bilinear", "nearest"]


def downsample(images: Tensor, factor: int) -> Tensor:
    """(B, C, H, W) → (B, C, H/f, W/f), antialiased (kornia: Gaussian prefilter σ = (f−1)/2, then bilinear)."""
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the downsampling factor {factor}")
    return kornia.geometry.transform.resize(
        images, (h // factor, w // factor), interpolation="bilinear", align_corners=False, antialias=True
    )


def upsample(images: Tensor, factor: int, mode: UpsampleMode = "bicubic") -> Tensor:
    """(B, C, h, w) → (B, C, f·h, f·w) by ``mode`` interpolation (kornia; half-pixel centres, edges replicated)."""
    h, w = images.shape[-2:]
    return kornia.geometry.transform.resize(
        images, (factor * h, factor * w), interpolation=mode, align_corners=None if mode == "nearest" else False
    )


def central_crop(images: Tensor, size: int, align: int = 1) -> Tensor:
    """The central ``size``×``size`` window of (…, H, W) images, its offsets multiples of ``align``.

    With ``align`` = f and ``size`` = f·c, the window is the hi-res partner of the central c×c
    window of the f× downsampled image (:func:`downsample`): the same region at both resolutions.
    """
    h, w = images.shape[-2:]
    if size > min(h, w) or size % align:
        raise ValueError(f"a central {size}px crop (aligned to {align}) does not fit {h}x{w} images")
    top, left = (h // align - size // align) // 2 * align, (w // align - size // align) // 2 * align
    return images[..., top : top + size, left : left + size]
