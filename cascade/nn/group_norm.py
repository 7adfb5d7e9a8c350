"""Group normalisation fused with ADM's adaptive scale-shift and SiLU, fast on channels-last CPU tensors.

    y = SiLU(GN(x) · γ_bc + β_bc),   GN(x) = (x − μ_bg) / √(σ²_bg + ε)           (Wu & He 2018)

with per-example, per-channel γ_bc = w_c (1 + scale_bc) and β_bc = b_c (1 + scale_bc) + shift_bc
(ADM's "AdaGN", Dhariwal & Nichol 2021 appendix A: GN's affine map composed with the embedding's
scale-shift). :func:`group_norm_act` is what every norm of the U-Net calls.

Why a second implementation: on CPUs, oneDNN's bf16 convolutions want channels-last (NHWC)
tensors and convert anything else on the way in and out, while PyTorch's channels-last GroupNorm
kernel is about 10× slower in bf16 than its NCHW one. Here a bf16 channels-last input is viewed as
(B, HW, C) rows and normalised with a few vectorised passes (per-channel sums, one multiply-add,
SiLU) and a hand-derived backward, so that the whole network can stay channels-last: on 2 CPU cores
the tiny base's bf16 training step runs 11 % faster channels-last than NCHW, where it ran 4 %
slower before (``scripts/benchmark.py``). Everything else (CUDA, NCHW, float32, small maps) takes
PyTorch's kernels.

Precision: each channel is first shifted by its own (rounded) mean and group means are formed
relative to one channel's shift, so the statistics are float32 sums of centred values and never
suffer the E[x²] − E[x]² cancellation (a mean 10⁴ σ from zero is exact to float32). The per-(b, c)
multiply-add coefficients are rounded to bf16 for the elementwise pass; the result is as close to
the float64 computation as PyTorch's own bf16 kernel (tests/test_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["group_norm_act", "uses_channels_last_kernel"]


# Below this many elements the kernel's ~20 small per-(b, c) ops cost more than they save: measured on 2 cores,
# GN + scale-shift + SiLU forward and backward, ours vs PyTorch's channels-last path: (16, 32, 64, 64) 4.1 vs
# 10.2 ms, (16, 64, 32, 32) 2.4 vs 3.5 ms, (16, 96, 16, 16) 1.25 vs 1.34 ms, (8, 32, 32, 32) 0.95 vs 0.80 ms.
MIN_ELEMENTS = 2**19


def uses_channels_last_kernel(x: Tensor) -> bool:
    """True where :func:`group_norm_act` takes the channels-last path: a bf16/fp16 4-d CPU tensor stored NHWC
    (and not also NCHW) of at least ``MIN_ELEMENTS``. In float32 PyTorch's own channels-last kernel is as fast."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 4
            and x.numel() >= MIN_ELEMENTS and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))


def group_norm_act(
    x: Tensor,  # (B, C, H, W)
    num_groups: int,
    weight: Tensor,  # (C,) GN scale w
    bias: Tensor,  # (C,) GN shift b
    eps: float,
    scale: Tensor | None = None,  # (B, C) adaptive scale: the output is multiplied by (1 + scale)
    shift: Tensor | None = None,  # (B, C) adaptive shift, added after
    act: bool = True,  # apply SiLU
) -> Tensor:
    """SiLU(GN(x)·w·(1 + scale) + b·(1 + scale) + shift), in x's dtype and memory format.

    Statistics and coefficients are float32 whatever x's dtype (ADM's ``GroupNorm32``).
    """
    if uses_channels_last_kernel(x):
        gamma = weight.float().expand(x.shape[0], -1)  # (B, C)
        beta = bias.float().expand(x.shape[0], -1)  # (B, C)
        if scale is not None:
            gamma, beta = gamma * (1 + scale.float()), beta * (1 + scale.float())  # (B, C)
        if shift is not None:
            beta = beta + shift.float()  # (B, C)
        return _ChannelsLastGroupNormAct.apply(x, gamma, beta, num_groups, eps, act)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.is_contiguous():
        h = F.group_norm(x, num_groups, weight, bias, eps)  # PyTorch's mixed-precision kernel: float32 statistics
    else:
        h = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps).type(x.dtype)
    if scale is not None:
        h = h * (1 + scale.to(h.dtype)[:, :, None, None])  # (B, C, H, W)
    if shift is not None:
        h = h + shift.to(h.dtype)[:, :, None, None]
    return F.silu(h) if act else h


def _rows(x: Tensor) -> Tensor:
    """(B, C, H, W) stored channels-last → its (B, HW, C) view (no copy)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def _per_group(per_channel: Tensor, groups: int) -> Tensor:
    """(B, C) → (B, G): the mean over each group's channels."""
    return per_channel.view(per_channel.shape[0], groups, -1).mean(-1)


def _per_channel(per_group: Tensor, channels: int) -> Tensor:
    """(B, G) → (B, C): each group's value repeated over its channels."""
    return per_group.repeat_interleave(channels // per_group.shape[1], dim=1)


def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
    """(B, N, C) × (B, N, C) → (B, C) float32: Σ_n a·b per example and channel.

    Taken as the diagonal of the batched GEMM aᵀb (float32 accumulation, one rounding of the result):
    it reads both operands once and writes no (B, N, C) temporary, which at the widths where this
    kernel runs outweighs its C× extra multiply-adds (2 cores, (16, 4096, 64) rows: 1.05 ms
    against 1.37 ms for multiply-then-sum).
    """
    return torch.bmm(a.transpose(1, 2), b).diagonal(dim1=1, dim2=2).float()


class _ChannelsLastGroupNormAct(torch.autograd.Function):
    """z = (x − μ_g)·r_g·γ + β, y = SiLU(z) (or z), on (B, HW, C) rows; returns grads for x, γ, β.

    With d = x − K_c (K_c: channel c's mean, rounded to x's dtype; any shift is exact here) and
    o_c = K_c − μ_g, the normalised input is x̂ = (d + o)·r. The backward is GN's:
    dx = r (γ dz − mean_g(γ dz) − x̂ mean_g(γ dz x̂)),  dγ = Σ_hw dz x̂,  dβ = Σ_hw dz,
    written as dx = k1·dz + k2·d + k0 with per-(b, c) float32 coefficients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, groups: int, eps: float, act: bool) -> Tensor:
        rows = _rows(x)  # (B, N, C)
        n, channels = rows.shape[1], rows.shape[2]
        shift_c = (rows.sum(1).float() / n).to(x.dtype)  # (B, C) K_c, rounded: the centring needs no exactness
        d = rows - shift_c[:, None]  # (B, N, C) centred per channel
        mean_d = d.sum(1).float() / n  # (B, C) m_c
        sq_d = _dot_rows(d, d) / n  # (B, C) E[d²]
        # Channel means relative to each group's first K (differences of nearby numbers: exact), so that a mean far
        # from zero (10⁴ σ) costs no precision: u_c = K_c − K_ref + m_c, and μ_g − K_ref is u's group mean.
        shift = shift_c.float()
        ref = _per_channel(shift.view(shift.shape[0], groups, -1)[:, :, 0], channels)  # (B, C) K_ref
        u = (shift - ref) + mean_d  # (B, C)
        u_g = _per_channel(_per_group(u, groups), channels)  # (B, C) μ_g − K_ref
        # Group variance = mean of the channels' variances + variance of their means (no cancellation).
        var_g = _per_group(sq_d - mean_d.square(), groups) + _per_group((u - u_g).square(), groups)
        rstd = _per_channel(torch.rsqrt(var_g.clamp_min(0) + eps), channels)  # (B, C) r
        offset = (shift - ref) - u_g  # (B, C) o = K − μ_g
        a = gamma * rstd  # (B, C)
        z = torch.addcmul((beta + offset * a)[:, None].to(x.dtype), d, a[:, None].to(x.dtype))  # (B, N, C) z = d·a + β + o·a
        ctx.save_for_backward(d, z if act else None, gamma, rstd, offset)
        ctx.groups, ctx.act, ctx.shape = groups, act, x.shape
        y = F.silu(z) if act else z
        b, c, h, w = x.shape
        return y.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W) channels-last

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        d, z, gamma, rstd, offset = ctx.saved_tensors
        groups = ctx.groups
        grad_rows = _rows(grad_y.contiguous(memory_format=torch.channels_last))  # (B, N, C)
        dz = torch.ops.aten.silu_backward(grad_rows, z) if ctx.act else grad_rows  # (B, N, C)
        n, channels = d.shape[1], d.shape[2]
        sum_dz = dz.sum(1).float()  # (B, C) Σ dz
        sum_dz_d = _dot_rows(dz, d)  # (B, C) Σ dz·d
        grad_beta = sum_dz
        grad_gamma = rstd * (sum_dz_d + offset * sum_dz)  # (B, C) Σ dz·x̂
        g1 = _per_channel(_per_group(gamma * sum_dz, groups), channels) / n  # mean_g(γ dz)
        g2 = _per_channel(_per_group(gamma * grad_gamma, groups), channels) / n  # mean_g(γ dz x̂)
        k1 = rstd * gamma
        k2 = -rstd.square() * g2
        k0 = -rstd * g1 + k2 * offset
        grad_x = torch.addcmul(k0[:, None].to(d.dtype), d, k2[:, None].to(d.dtype))  # (B, N, C) k2·d + k0
        grad_x.addcmul_(dz, k1[:, None].to(d.dtype))  # + k1·dz
        b, c, h, w = ctx.shape
        return grad_x.view(b, h, w, c).permute(0, 3, 1, 2), grad_gamma, grad_beta, None, None, None
