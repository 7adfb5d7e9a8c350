"""Group normalisation fused with ADM's adaptive scale-shift and SiLU, fast on channels-last CPU tensors.

    y = SiLU(GN(x) · γ_bc + β_bc),   GN(x) = (x − μ_bg) / √(σ²_bg + ε)           (Wu & He 2018)

with per-example, per-channel γ_bc = w_c (1 + scale_bc) and β_bc = b_c (1 + scale_bc) + shift_bc
(ADM's "AdaGN", Dhariwal & Nichol 2021 appendix A: GN's affine map composed with the embedding's
scale-shift). :func:`group_norm_act` is what every norm of the U-Net calls.

Why a second implementation: on CPUs, oneDNN's bf16 convolutions want channels-last (NHWC)
tensors and convert anything else on the way in and out, while PyTorch's channels-last GroupNorm
kernel is several times slower in bf16 than its NCHW one (README, Speed and scale). Here a bf16 channels-last input is viewed as
(B, HW, C) rows and normalised by C++ kernels (``csrc/group_norm_act.cpp``, built on first use by
:mod:`cascade.nn.native`) in four memory passes, forward and backward, so that the whole network can
stay channels-last (the measured times are in the README's speed section). The same algorithm in
PyTorch ops is the fallback where the C++ kernels cannot be built, and for fp16. Float32 channels-last maps take the same C++ kernels (on CPUs without native bf16 the networks train in
float32, and PyTorch's channels-last float32 GroupNorm is about as slow as its NCHW one, while oneDNN's float32
convolutions gain from NHWC); everything else (CUDA, NCHW) takes PyTorch's kernels.

Precision: each channel is shifted by one of its own values and group means are formed relative to
one channel's shift, so the statistics are float32 sums of centred values and never suffer the
E[x²] − E[x]² cancellation (a mean 10⁴ σ from zero is exact to float32). The C++ kernels compute in
float32 and round the output and dx once; the result is closer to the float64 computation than
PyTorch's own bf16 kernel (tests/test_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.nn import native
from cascade.nn.native import group_norm_kernels

__all__ = ["group_norm_act", "channels_last_kernel"]


# Below this many elements the PyTorch-ops fallback's ~20 small per-(b, c) ops cost more than they save against
# PyTorch's channels-last path (GN + scale-shift + SiLU forward and backward timed per shape; the cut-off is where
# the two cross).
MIN_ELEMENTS = 2**19


def channels_last_kernel(x: Tensor) -> type[torch.autograd.Function] | None:
    """The autograd function :func:`group_norm_act` runs on ``x``, or None for PyTorch's GroupNorm.

    Bf16/fp16/float32 4-d CPU tensors stored NHWC (and not also NCHW) take the channels-last kernel: the C++
    one for bf16 and float32 where it could be built (under ``torch.compile``: where it is already loaded), else
    for bf16/fp16 the PyTorch-ops one from ``MIN_ELEMENTS`` up, and for float32 PyTorch's own kernel (the
    PyTorch-ops algorithm is no faster than it in float32).
    """
    if not (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return None
    if x.dtype in (torch.bfloat16, torch.float32):
        # torch.compile traces through here: it may only look at what is loaded (the trainer loads it first).
        available = native.loaded_group_norm_kernels() if torch.compiler.is_compiling() else group_norm_kernels()
        if available is not None:
            return _NativeGroupNormAct
        if x.dtype == torch.float32:
            return None
    return _ChannelsLastGroupNormAct if x.numel() >= MIN_ELEMENTS else None


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
    kernel = channels_last_kernel(x)
    if kernel is _NativeGroupNormAct:
        return kernel.apply(x, weight, bias, scale, shift, num_groups, eps, act)
    if kernel is not None:
        gamma = weight.float().expand(x.shape[0], -1)  # (B, C)
        beta = bias.float().expand(x.shape[0], -1)  # (B, C)
        if scale is not None:
            gamma, beta = gamma * (1 + scale.float()), beta * (1 + scale.float())  # (B, C)
        if shift is not None:
            beta = beta + shift.float()  # (B, C)
        return kernel.apply(x, gamma, beta, num_groups, eps, act)
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


def _maps(rows: Tensor, shape: torch.Size) -> Tensor:
    """(B, HW, C) rows → the (B, C, H, W) channels-last tensor they store (no copy)."""
    b, c, h, w = shape
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)


def _per_group(per_channel: Tensor, groups: int) -> Tensor:
    """(B, C) → (B, G): the mean over each group's channels."""
    return per_channel.view(per_channel.shape[0], groups, -1).mean(-1)


def _per_channel(per_group: Tensor, channels: int) -> Tensor:
    """(B, G) → (B, C): each group's value repeated over its channels."""
    return per_group.repeat_interleave(channels // per_group.shape[1], dim=1)


def _group_statistics(shift: Tensor, mean_d: Tensor, sq_d: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per-(b, c) float32 r = 1/√(σ²_g + ε) and o = K_c − μ_g of channel c's group, from each channel's shift K_c and
    the moments m_c = E[d], E[d²] of d = x − K_c (all (B, C) float32).

    Channel means are taken relative to each group's first K (differences of nearby numbers: exact), so that a mean
    far from zero (10⁴ σ) costs no precision: u_c = K_c − K_ref + m_c, and μ_g − K_ref is u's group mean. The group
    variance is the mean of the channels' variances plus the variance of their means (no E[x²] − E[x]² cancellation).
    """
    channels = shift.shape[1]
    ref = _per_channel(shift.view(shift.shape[0], groups, -1)[:, :, 0], channels)  # (B, C) K_ref
    u = (shift - ref) + mean_d  # (B, C)
    u_g = _per_channel(_per_group(u, groups), channels)  # (B, C) μ_g − K_ref
    var_g = _per_group(sq_d - mean_d.square(), groups) + _per_group((u - u_g).square(), groups)  # (B, G)
    rstd = _per_channel(torch.rsqrt(var_g.clamp_min(0) + eps), channels)  # (B, C) r
    return rstd, (shift - ref) - u_g


def _input_gradient_coefficients(
    gamma: Tensor, rstd: Tensor, offset: Tensor, sum_dz: Tensor, sum_dz_d: Tensor, groups: int, n: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GN's backward as per-(b, c) coefficients: returns dγ = Σ dz·x̂ and (k1, k2, k0) with dx = k1·dz + k2·d + k0,
    from Σ dz and Σ dz·d over the n positions (all (B, C) float32).

    dx = r (γ dz − mean_g(γ dz) − x̂ mean_g(γ dz x̂)) with x̂ = (d + o)·r (Wu & He 2018, differentiated).
    """
    channels = gamma.shape[1]
    grad_gamma = rstd * (sum_dz_d + offset * sum_dz)  # (B, C) Σ dz·x̂
    g1 = _per_channel(_per_group(gamma * sum_dz, groups), channels) / n  # mean_g(γ dz)
    g2 = _per_channel(_per_group(gamma * grad_gamma, groups), channels) / n  # mean_g(γ dz x̂)
    k1 = rstd * gamma
    k2 = -rstd.square() * g2
    k0 = -rstd * g1 + k2 * offset
    return grad_gamma, k1, k2, k0


# The C++ kernels as PyTorch operators with shape-only ("fake") versions, so that torch.compile can trace a
# network through them; eager calls go to the library directly (an operator call costs ~10 µs more).
_FORWARD_SCHEMA = (
    "(Tensor rows, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, int groups, float eps, bool act) -> Tensor[]"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor rows, Tensor anchor, Tensor a, Tensor c0, Tensor gamma, Tensor rstd, Tensor offset, "
    "Tensor weight, Tensor bias, Tensor? scale, bool has_shift, int groups, bool act) -> Tensor[]"
)


@torch.library.custom_op("cascade::group_norm_act_forward", mutates_args=(), schema=_FORWARD_SCHEMA)
def _forward_op(rows, weight, bias, scale, shift, groups, eps, act):  # noqa: ANN001, ANN202
    return group_norm_kernels().forward(rows, weight, bias, scale, shift, groups, eps, act)


@_forward_op.register_fake
def _(rows, weight, bias, scale, shift, groups, eps, act):  # noqa: ANN001, ANN202
    per_example = rows.new_empty((rows.shape[0], rows.shape[2]), dtype=torch.float32)  # (B, C)
    return [torch.empty_like(rows), *(torch.empty_like(per_example) for _ in range(6))]


@torch.library.custom_op("cascade::group_norm_act_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _backward_op(grad, rows, anchor, a, c0, gamma, rstd, offset, weight, bias, scale, has_shift, groups, act):  # noqa: ANN001, ANN202
    grads = group_norm_kernels().backward(
        grad, rows, anchor, a, c0, gamma, rstd, offset, weight, bias, scale, has_shift, groups, act
    )
    return [g if g is not None else rows.new_empty(0, dtype=torch.float32) for g in grads]  # an operator returns no None


@_backward_op.register_fake
def _(grad, rows, anchor, a, c0, gamma, rstd, offset, weight, bias, scale, has_shift, groups, act):  # noqa: ANN001, ANN202
    empty = rows.new_empty(0, dtype=torch.float32)
    return [
        torch.empty_like(rows),
        torch.empty_like(weight, dtype=torch.float32),
        torch.empty_like(bias, dtype=torch.float32),
        torch.empty_like(a) if scale is not None else empty,
        torch.empty_like(a) if has_shift else empty,
    ]


class _NativeGroupNormAct(torch.autograd.Function):
    """SiLU(GN(x)·w·(1 + scale) + b·(1 + scale) + shift) (or without SiLU) by the C++ kernels
    (``csrc/group_norm_act.cpp``) on (B, HW, C) rows; returns grads for x, w, b, scale and shift.

    With γ, β the per-(b, c) affine map, d = x − K_c (K_c: channel c's first value, exact in float32) and
    o_c = K_c − μ_g: z = d·a + c0 with a = γ·r, c0 = β + o·a. Forward: one pass for Σ d, Σ d², one for y.
    Backward: one pass for Σ dz, Σ dz·d and dz itself (z recomputed from x, not stored), one for
    dx = k1·dz + k2·d + k0. The per-(b, c) algebra (:func:`_group_statistics`,
    :func:`_input_gradient_coefficients`, and AdaGN's γ, β and their gradients) runs in C++ too, in double:
    one call each way instead of ~40 small PyTorch ops. Saves x itself.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        scale: Tensor | None,
        shift: Tensor | None,
        groups: int,
        eps: float,
        act: bool,
    ) -> Tensor:
        rows = _rows(x)  # (B, N, C)
        forward = _forward_op if torch.compiler.is_compiling() else group_norm_kernels().forward
        y, *saved = forward(rows, weight, bias, scale, shift, groups, eps, act)  # y: (B, N, C)
        ctx.save_for_backward(rows, *saved, weight, bias, scale)
        ctx.groups, ctx.act, ctx.shape, ctx.has_shift = groups, act, x.shape, shift is not None
        return _maps(y, x.shape)  # (B, C, H, W) channels-last

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        rows, *saved, weight, bias, scale = ctx.saved_tensors
        grad_rows = _rows(grad_y.contiguous(memory_format=torch.channels_last)).to(rows.dtype)  # (B, N, C)
        backward = _backward_op if torch.compiler.is_compiling() else group_norm_kernels().backward
        grad_x, grad_weight, grad_bias, grad_scale, grad_shift = backward(
            grad_rows, rows, *saved, weight, bias, scale, ctx.has_shift, ctx.groups, ctx.act
        )
        return (
            _maps(grad_x, ctx.shape),
            grad_weight,
            grad_bias,
            grad_scale if scale is not None else None,
            grad_shift if ctx.has_shift else None,
            None,
            None,
            None,
        )


def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
    """(B, N, C) × (B, N, C) → (B, C) float32: Σ_n a·b per example and channel.

    Taken as the diagonal of the batched GEMM aᵀb (float32 accumulation, one rounding of the result):
    it reads both operands once and writes no (B, N, C) temporary, which at the widths where this
    kernel runs outweighs its C× extra multiply-adds (it timed faster than multiply-then-sum).
    """
    return torch.bmm(a.transpose(1, 2), b).diagonal(dim1=1, dim2=2).float()


class _ChannelsLastGroupNormAct(torch.autograd.Function):
    """The same function in PyTorch ops on (B, HW, C) rows, where the C++ kernels are unavailable (under
    ``torch.compile``: not loaded before tracing) and for fp16. About twenty memory passes against their four.

    d = x − K_c with K_c channel c's mean rounded to x's dtype (any shift is exact here); the output and
    the backward are those of :class:`_NativeGroupNormAct`, with z saved instead of recomputed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, groups: int, eps: float, act: bool) -> Tensor:
        rows = _rows(x)  # (B, N, C)
        n = rows.shape[1]
        shift_c = (rows.sum(1).float() / n).to(x.dtype)  # (B, C) K_c, rounded: the centring needs no exactness
        d = rows - shift_c[:, None]  # (B, N, C) centred per channel
        mean_d = d.sum(1).float() / n  # (B, C) m_c
        sq_d = _dot_rows(d, d) / n  # (B, C) E[d²]
        rstd, offset = _group_statistics(shift_c.float(), mean_d, sq_d, groups, eps)
        a = gamma * rstd  # (B, C)
        z = torch.addcmul((beta + offset * a)[:, None].to(x.dtype), d, a[:, None].to(x.dtype))  # (B, N, C) z = d·a + β + o·a
        ctx.save_for_backward(d, z if act else None, gamma, rstd, offset)
        ctx.groups, ctx.act, ctx.shape = groups, act, x.shape
        return _maps(F.silu(z) if act else z, x.shape)  # (B, C, H, W) channels-last

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        d, z, gamma, rstd, offset = ctx.saved_tensors
        grad_rows = _rows(grad_y.contiguous(memory_format=torch.channels_last))  # (B, N, C)
        dz = torch.ops.aten.silu_backward(grad_rows, z) if ctx.act else grad_rows  # (B, N, C)
        sum_dz = dz.sum(1).float()  # (B, C) Σ dz
        grad_gamma, k1, k2, k0 = _input_gradient_coefficients(
            gamma, rstd, offset, sum_dz, _dot_rows(dz, d), ctx.groups, d.shape[1]
        )
        grad_x = torch.addcmul(k0[:, None].to(d.dtype), d, k2[:, None].to(d.dtype))  # (B, N, C) k2·d + k0
        grad_x.addcmul_(dz, k1[:, None].to(d.dtype))  # + k1·dz
        return _maps(grad_x, ctx.shape), grad_gamma, sum_dz, None, None, None
