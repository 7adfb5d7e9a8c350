"""Building blocks of the ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis", appendix A) and its noisy classifier.

Every block works on (B, C, H, W) feature maps; the ones that are conditioned take SiLU of the
(B, emb_channels) time/class/augmentation embedding as a second argument (applied once per network). Channel counts
must be multiples of the group-norm group count (32 by default). Every norm goes through
:func:`~cascade.nn.group_norm.group_norm_act` (GN, ADM's scale-shift and SiLU in one call).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cascade.nn.group_norm import group_norm_act

__all__ = [
    "timestep_embedding",
    "zero_init",
    "GroupNorm32",
    "TimestepEmbedding",
    "ResBlock",
    "Downsample",
    "Upsample",
    "AttentionBlock",
    "AttentionPool2d",
    "EmbedSequential",
    "AttentionOrder",
    "attention_num_heads",
    "batch_vector",
    "upsample_conv",
]

AttentionOrder = Literal["new", "legacy"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    The positional encoding of Vaswani et al. 2017 ("Attention is all you need", §3.5) applied
    to the diffusion timestep as in DDPM/ADM: frequencies ω_i = max_period^(−i/half), features
    [cos(t ω), sin(t ω)], zero-padded when ``dim`` is odd.

    Args:
        t: (B,) timesteps, int or float.
        dim: embedding width.
    Returns:
        (B, dim) float32 embedding.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)  # (half,)
    freqs = torch.exp(-math.log(max_period) * i / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def batch_vector(t: Tensor, batch: int) -> Tensor:
    """A (B,) tensor from a (B,) or 0-d tensor (timesteps, augmentation levels)."""
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected shape ({batch},) or a scalar, got {tuple(t.shape)}")
    return t


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (ADM ``zero_module``): residual branches start as identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """Group normalisation computed in float32 whatever the input dtype (ADM), 32 groups by default.

    ``forward(x, scale, shift, act)`` also applies ADM's adaptive scale-shift and SiLU in the same
    call (:func:`~cascade.nn.group_norm.group_norm_act`): statistics and coefficients are float32,
    the output has the input's dtype and memory format. NCHW bf16 input on CPU goes straight to
    PyTorch's mixed-precision kernel; channels-last input on CPU takes the fused channels-last
    kernel (PyTorch's own is much slower there in bf16); everything else casts to float32.
    """

    def __init__(self, channels: int, groups: int = 32) -> None:
        if channels % groups:
            raise ValueError(f"{channels} channels cannot be split into {groups} normalisation groups")
        super().__init__(num_groups=groups, num_channels=channels)

    def forward(self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None, act: bool = False) -> Tensor:
        """GN(x)·(1 + scale) + shift, then SiLU if ``act``; ``scale``, ``shift``: (B, C) or None."""
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, act)  # (B, C, H, W)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding followed by a 2-layer SiLU MLP (DDPM/ADM ``time_embed``)."""

    def __init__(self, channels: int, emb_channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.channels).to(self.mlp[0].weight.dtype)  # (B, channels)
        return self.mlp(emb)  # (B, emb_channels)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 convolution (``use_conv``) or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # (B, C, H/2, W/2)


def _phase_taps(w: Tensor, dim: int) -> Tensor:
    """Along ``dim`` (size 3), the 4 taps of a 3-tap filter applied after nearest ×2 upsampling, as a stride-2
    transposed filter: output 2i reads inputs i−1, i (taps w0 and w1 + w2), output 2i + 1 reads i, i + 1 (w0 + w1, w2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim=dim)


def upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(nearest_upsample_2x(x))`` for a 3×3, stride-1, padding-1 ``conv``, at the low resolution.

    Every output pixel of a 3×3 convolution of a nearest-upsampled map sees only 2×2 distinct input pixels, so
    the pair is one stride-2 transposed convolution of x with a 4×4 kernel of summed taps (4 multiply-adds per
    output and input channel instead of 9; the sub-pixel view of Shi et al. 2016, "Real-time single image and
    video super-resolution using an efficient sub-pixel convolutional neural network"). The same function of the
    same 3×3 weight, up to float rounding (the summed taps are rounded once); no 2H×2W intermediate map.
    """
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1):
        raise ValueError("upsample_conv needs a 3×3 convolution with stride 1 and padding 1")
    if conv.groups != 1:
        raise ValueError("upsample_conv needs an ungrouped convolution")
    kernel = _phase_taps(_phase_taps(conv.weight, 2), 3).transpose(0, 1)  # (C_in, C_out, 4, 4)
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)  # (B, C_out, 2H, 2W)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then an optional 3×3 convolution (one transposed
    convolution at the low resolution: :func:`upsample_conv`)."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.conv, nn.Conv2d):
            return upsample_conv(x, self.conv)  # (B, C, 2H, 2W)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding (ADM appendix A; BigGAN-style up/down).

    h = conv(SiLU(GN(x))); then with ``use_scale_shift_norm`` the "adaptive group norm"
    GN(h)·(1 + scale) + shift, with (scale, shift) a linear projection of SiLU(emb) — otherwise
    h + proj(emb) before GN; then SiLU, dropout and a zero-initialised conv, so a fresh block is
    the identity (or its skip projection). With ``up``/``down`` the resample is applied to h
    after the first norm+activation and to the skip path (Brock et al. 2019, as in ADM).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        *,
        out_channels: int | None = None,  # defaults to ``channels``
        dropout: float = 0.0,  # dropout before the last conv
        use_scale_shift_norm: bool = True,  # adaptive group norm instead of adding the embedding
        up: bool = False,  # nearest-neighbour ×2 inside the block
        down: bool = False,  # average-pool ÷2 inside the block
        norm_groups: int = 32,  # group-norm groups
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both up- and down-sample")
        out_channels = out_channels or channels
        self.use_scale_shift_norm, self.up = use_scale_shift_norm, up
        self.in_norm = GroupNorm32(channels, norm_groups)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        if up:
            self.resample: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        else:
            self.resample = nn.Identity()
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = GroupNorm32(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C_in, H, W); emb: (B, emb_channels) SiLU of the conditioning embedding. ADM's per-block
        projection starts with that SiLU; the networks apply it once for all their blocks."""
        h = self.in_norm(x, act=True)  # (B, C_in, H, W) SiLU(GN(x))
        if self.up:
            h = upsample_conv(h, self.in_conv)  # (B, C_out, 2H, 2W) in_conv(upsample(h)), at the low resolution
        else:
            h = self.in_conv(self.resample(h))  # (B, C_out, H', W')
        x = self.resample(x)  # (B, C_in, H', W')
        e = self.emb_proj(emb)  # (B, 2·C_out or C_out); emb is already SiLU(embedding)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)  # (B, C_out) each
            h = self.out_norm(h, scale, shift, act=True)  # SiLU(GN(h)·(1 + scale) + shift)
        else:
            h = self.out_norm(h + e.to(h.dtype)[:, :, None, None], act=True)
        h = self.out_conv(self.dropout(h))  # (B, C_out, H', W')
        return self.skip(x) + h


def attention_num_heads(channels: int, num_heads: int, head_channels: int | None) -> int:
    """Heads for ``channels``: ``channels // head_channels`` when set (overrides ``num_heads``; ADM)."""
    if head_channels is None:
        heads = num_heads
    else:
        if channels % head_channels:
            raise ValueError(f"{channels} channels are not divisible by head_channels={head_channels}")
        heads = channels // head_channels
    if heads < 1 or channels % heads:
        raise ValueError(f"{channels} channels cannot be split into {heads} heads")
    return heads


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions with a residual connection (DDPM/ADM).

    x + proj(MHA(qkv(GN(x)))) with softmax(QKᵀ/√d)V computed by
    ``torch.nn.functional.scaled_dot_product_attention``; ``proj`` is zero-initialised.
    The head count is ``channels // head_channels`` when ``head_channels`` is set, else
    ``num_heads`` (ADM ``num_head_channels`` semantics).

    ``order`` is how the 3C channels of ``qkv`` split into queries, keys and values (ADM
    ``unet.py``): ``"new"`` = [Q of all heads, K of all heads, V of all heads]
    (``QKVAttention``, ADM's ``use_new_attention_order``); ``"legacy"`` = per head [q, k, v]
    (``QKVAttentionLegacy``, the default of ADM's code and the layout of most of its released weights).
    The two are the same function of differently arranged weights.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        head_channels: int | None = None,
        norm_groups: int = 32,
        order: AttentionOrder = "new",
    ) -> None:
        super().__init__()
        if order not in ("new", "legacy"):
            raise ValueError(f"unknown attention order {order!r}; use 'new' or 'legacy'")
        self.num_heads = attention_num_heads(channels, num_heads, head_channels)
        self.order = order
        self.norm = GroupNorm32(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, *spatial), any memory format; the output has x's shape."""
        b, c, *spatial = x.shape
        heads, d = self.num_heads, c // self.num_heads
        # Token-major from here: the 1×1 convolutions are linear maps over tokens, so q, k, v come out with stride 1
        # on d, as every fused SDPA kernel (flash, memory-efficient; CUDA and CPU) requires; channel-major q, k, v
        # (stride T on d) leave only the math kernel. Channels-last maps are token-major already (no copy).
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # (B, T, C)
        qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)  # (B, T, 3C)
        if self.order == "new":
            q, k, v = qkv.reshape(b, -1, 3, heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, T, d) each
        else:
            q, k, v = qkv.reshape(b, -1, heads, 3, d).permute(3, 0, 2, 1, 4)  # (B, heads, T, d) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        h = F.linear(h.transpose(1, 2).reshape(b, -1, c), self.proj.weight[..., 0], self.proj.bias)  # (B, T, C)
        return x + h.transpose(1, 2).reshape(b, c, *spatial)  # (B, C, *spatial)


class AttentionPool2d(nn.Module):
    """Attention pooling of the ADM classifier (after CLIP, Radford et al. 2021).

    Flattens the (H, W) grid, prepends the mean token, adds a learned positional embedding,
    lets the mean token attend to all tokens (multi-head, SDPA) and projects it to
    ``out_channels``. The positional embedding fixes the input size to ``spatial`` × ``spatial``.
    The q/k/v channels are always in ADM's "new" order ([Q_all, K_all, V_all]), as in ADM's
    classifiers whatever the order of their attention blocks.
    """

    def __init__(self, spatial: int, channels: int, out_channels: int, *, num_heads: int) -> None:
        super().__init__()
        self.spatial = spatial
        self.num_heads = num_heads
        self.pos_emb = nn.Parameter(torch.randn(spatial**2 + 1, channels) / channels**0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if (h, w) != (self.spatial, self.spatial):
            raise ValueError(f"AttentionPool2d expects {self.spatial}×{self.spatial} features, got {h}×{w}")
        tokens = x.flatten(2).transpose(1, 2)  # (B, T, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, T + 1, C)
        tokens = tokens + self.pos_emb.to(tokens.dtype)  # (B, T + 1, C)
        qkv = self.qkv(tokens).reshape(b, -1, 3, self.num_heads, c // self.num_heads)  # (B, T + 1, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, T + 1, d) each
        # Only the mean token's output is kept, so only its query is needed.
        pooled = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, heads, 1, d)
        return self.out(pooled.reshape(b, c))  # (B, out_channels)


class EmbedSequential(nn.Sequential):
    """Applies its layers in order, giving the embedding to the ones that take it (``ResBlock``).

    With ``grad_checkpointing`` each res/attention layer is recomputed in the backward pass
    (``torch.utils.checkpoint``, non-reentrant) while training with gradients enabled.
    """

    def __init__(self, *layers: nn.Module, grad_checkpointing: bool = False) -> None:
        super().__init__(*layers)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self:
            args = (x, emb) if isinstance(layer, ResBlock) else (x,)
            if use_ckpt and isinstance(layer, (ResBlock, AttentionBlock)):
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x
