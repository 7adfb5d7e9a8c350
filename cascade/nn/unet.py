"""The ADM U-Net (Dhariwal & Nichol 2021, appendix A; Nichol & Dhariwal 2021, "Improved DDPM")
with cascade conditioning (Ho et al. 2021, "Cascaded Diffusion Models"; Saharia et al. 2022,
"Imagen").

Layout: input conv → per level ``num_res_blocks`` ResBlocks (+ attention) and a down-sampling
ResBlock between levels → middle ResBlock–Attention–ResBlock → decoder with one more block
per level than the encoder, consuming the encoder's skip connections, and an up-sampling
ResBlock at the end of every level but the last → GroupNorm–SiLU–zero conv.

``patch_size`` p > 1 runs all of it on non-overlapping p×p patches: the input (x_t and any
low-res conditioning) is pixel-unshuffled to C·p² channels at H/p × W/p and the output
pixel-shuffled back (the patching of Hoogeboom et al. 2023, "simple diffusion", and of DiT), so
width is spent where the image's layout is decided rather than on full-resolution convolutions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.nn.layers import (
    AttentionBlock,
    AttentionOrder,
    Downsample,
    EmbedSequential,
    GroupNorm32,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    batch_vector,
    zero_init,
)

__all__ = ["UNet", "UNetEncoder", "EncoderOptions", "per_level", "attention_levels"]


def per_level(num_res_blocks: int | Sequence[int], num_levels: int) -> list[int]:
    """Blocks per level: an int for every level, or one count per level (Imagen "Efficient U-Net")."""
    if isinstance(num_res_blocks, int):
        return [num_res_blocks] * num_levels
    counts = [int(n) for n in num_res_blocks]
    if len(counts) != num_levels:
        raise ValueError(f"num_res_blocks has {len(counts)} entries but channel_mult has {num_levels} levels")
    return counts


def attention_levels(resolution: int, attention_resolutions: Sequence[int], num_levels: int) -> list[bool]:
    """Level i has attention iff its nominal resolution ``resolution // 2**i`` is listed (ADM)."""
    return [resolution // 2**i in set(attention_resolutions) for i in range(num_levels)]


@dataclass(frozen=True)
class EncoderOptions:
    """The layer settings the U-Net and the noisy classifier share (their constructors' keywords of these names).

    ADM's flag names, where they differ, in brackets.
    """

    model_channels: int  # base width [num_channels / classifier_width]
    channel_mult: Sequence[float]  # width multiplier per level; level widths int(model_channels · mult) (512px ADM: 0.5)
    num_res_blocks: int | Sequence[int]  # ResBlocks per encoder level [num_res_blocks / classifier_depth]
    attention_resolutions: Sequence[int]  # nominal resolutions with self-attention
    num_heads: int  # attention heads, unless head_channels is set
    head_channels: int | None  # channels per head; overrides num_heads [num_head_channels]
    attention_order: AttentionOrder  # q/k/v channel layout: "new" or "legacy" [use_new_attention_order]
    dropout: float  # ResBlock dropout
    use_scale_shift_norm: bool  # adaptive group norm
    resblock_updown: bool  # BigGAN up/down ResBlocks instead of plain conv resampling
    grad_checkpointing: bool  # recompute blocks in the backward pass [use_checkpoint]
    middle_attention: bool  # attention in the middle block
    norm_groups: int  # group-norm groups (ADM: 32)

    @classmethod
    def pick(cls, keywords: Mapping[str, Any]) -> EncoderOptions:
        """The options among a network constructor's keywords (its ``locals()``)."""
        return cls(**{f.name: keywords[f.name] for f in fields(cls)})

    def width(self, level: int) -> int:
        """Channels of ``level``: int(model_channels · channel_mult[level]) (ADM)."""
        channels = int(self.model_channels * self.channel_mult[level])
        if channels < 1 or channels != self.model_channels * self.channel_mult[level]:
            raise ValueError(
                f"model_channels {self.model_channels} × channel_mult {self.channel_mult[level]} is not a whole channel count"
            )
        return channels

    def resblock(self, emb_channels: int) -> partial[ResBlock]:
        return partial(
            ResBlock,
            emb_channels=emb_channels,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            norm_groups=self.norm_groups,
        )

    def attention(self) -> partial[AttentionBlock]:
        return partial(
            AttentionBlock,
            num_heads=self.num_heads,
            head_channels=self.head_channels,
            norm_groups=self.norm_groups,
            order=self.attention_order,
        )


class UNetEncoder(nn.Module):
    """The encoder half of the ADM U-Net: input conv, down levels and the middle block.

    Shared by :class:`UNet` and the noisy classifier. ``forward`` returns the middle block's
    output and the skip activations (input conv, every encoder block) in order.
    """

    def __init__(
        self,
        options: EncoderOptions,
        *,
        resolution: int,  # nominal training resolution; fixes where attention goes
        in_channels: int,  # input conv channels (image + any concatenated conditioning)
        emb_channels: int,  # width of the conditioning embedding
    ) -> None:
        super().__init__()
        o = options
        levels = len(o.channel_mult)
        blocks = per_level(o.num_res_blocks, levels)
        attention = attention_levels(resolution, o.attention_resolutions, levels)
        res, attn = o.resblock(emb_channels), o.attention()

        ch = o.width(0)
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.skip_channels: list[int] = [ch]
        self.blocks = nn.ModuleList()
        for level in range(levels):
            for _ in range(blocks[level]):
                layers: list[nn.Module] = [res(ch, out_channels=o.width(level))]
                ch = o.width(level)
                if attention[level]:
                    layers.append(attn(ch))
                self.blocks.append(EmbedSequential(*layers, grad_checkpointing=o.grad_checkpointing))
                self.skip_channels.append(ch)
            if level != levels - 1:
                down = res(ch, down=True) if o.resblock_updown else Downsample(ch)
                self.blocks.append(EmbedSequential(down, grad_checkpointing=o.grad_checkpointing))
                self.skip_channels.append(ch)
        middle = [res(ch), attn(ch), res(ch)] if o.middle_attention else [res(ch), res(ch)]
        self.middle = EmbedSequential(*middle, grad_checkpointing=o.grad_checkpointing)
        self.out_channels = ch
        self.downsampling = 2 ** (levels - 1)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x: (B, in_channels, H, W); emb: (B, E) SiLU of the conditioning embedding (see :class:`ResBlock`)."""
        if x.shape[-2] % self.downsampling or x.shape[-1] % self.downsampling:
            raise ValueError(f"spatial size {tuple(x.shape[-2:])} must be divisible by {self.downsampling}")
        h = self.input_conv(x)  # (B, C_0, H, W)
        skips = [h]
        for block in self.blocks:
            h = block(h, emb)  # (B, C_level, H_level, W_level)
            skips.append(h)
        return self.middle(h, emb), skips  # (B, C_mid, H / 2^(L-1), W / 2^(L-1))


class UNet(nn.Module):
    """Class- and cascade-conditional ADM U-Net, fully convolutional.

    The conditioning embedding is emb = MLP(sinusoid(t)) [+ class_embedding(y)]
    [+ MLP'(sinusoid(aug_level))] (ADM adds the class embedding to the time embedding; CDM /
    Imagen embed the noise-augmentation level like t). With ``null_class`` (the default), row
    ``num_classes`` of the class table is the null class for classifier-free guidance (Ho &
    Salimans 2022); a network trained without label dropout (ADM's releases) has no such row. Upsamplers get the
    low-res image, already resized to x_t's size, concatenated on channels (CDM §3).
    The layer structure is fixed by ``resolution``; any input whose sides are divisible by
    2**(len(channel_mult) - 1) is accepted (Imagen trains the 1024px stage on 256px crops).
    """

    def __init__(
        self,
        *,
        resolution: int = 64,  # nominal training resolution; decides the attention levels
        in_channels: int = 3,  # channels of x_t
        out_channels: int = 3,  # 6 with learned variance (Improved DDPM)
        lowres_channels: int = 0,  # channels of the concatenated low-res conditioning; 0 = none
        model_channels: int = 192,  # base width
        channel_mult: Sequence[float] = (1, 2, 3, 4),  # width multiplier per level (fractions allowed: ADM 512px 0.5)
        num_res_blocks: int | Sequence[int] = 3,  # ResBlocks per level (encoder; decoder has one more)
        attention_resolutions: Sequence[int] = (32, 16, 8),  # resolutions with self-attention
        num_heads: int = 4,  # attention heads, unless head_channels is set
        head_channels: int | None = 64,  # channels per attention head; overrides num_heads
        attention_order: AttentionOrder = "new",  # q/k/v layout of the attention blocks (ADM: "new" or "legacy")
        dropout: float = 0.1,  # ResBlock dropout
        num_classes: int | None = None,  # class-conditional with this many classes
        null_class: bool = True,  # one more class-table row, num_classes, for "no label" (classifier-free guidance)
        aug_level_embedding: bool = False,  # embed the noise-augmentation level (CDM / Imagen)
        use_scale_shift_norm: bool = True,  # adaptive group norm conditioning (ADM)
        resblock_updown: bool = True,  # BigGAN-style up/down ResBlocks (ADM)
        grad_checkpointing: bool = False,  # recompute res/attention blocks in backward
        middle_attention: bool = True,  # attention in the middle block; False for attention-free SR
        norm_groups: int = 32,  # group-norm groups (ADM: 32); fewer keep more channels per group in narrow nets
        patch_size: int = 1,  # > 1: the network runs on non-overlapping p×p patches (pixel-unshuffled input)
    ) -> None:
        super().__init__()
        options = EncoderOptions.pick(locals())
        if patch_size < 1 or resolution % patch_size:
            raise ValueError(f"patch_size must be a positive divisor of resolution {resolution}, got {patch_size}")
        self.patch_size = patch_size
        self.lowres_channels = lowres_channels
        self.num_classes = num_classes
        self.null_class = null_class and num_classes is not None
        emb_channels = 4 * model_channels
        self.time_embed = TimestepEmbedding(model_channels, emb_channels)
        self.class_embed = nn.Embedding(num_classes + int(null_class), emb_channels) if num_classes is not None else None
        self.aug_embed = TimestepEmbedding(model_channels, emb_channels) if aug_level_embedding else None
        p2 = patch_size * patch_size
        self.encoder = UNetEncoder(
            options,
            resolution=resolution // patch_size,
            in_channels=(in_channels + lowres_channels) * p2,
            emb_channels=emb_channels,
        )

        levels = len(channel_mult)
        blocks = per_level(num_res_blocks, levels)
        attention = attention_levels(resolution // patch_size, attention_resolutions, levels)
        res, attn = options.resblock(emb_channels), options.attention()
        skips = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        self.decoder = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(blocks[level] + 1):
                c_out = options.width(level)
                layers: list[nn.Module] = [res(ch + skips.pop(), out_channels=c_out)]
                ch = c_out
                if attention[level]:
                    layers.append(attn(ch))
                if level > 0 and i == blocks[level]:
                    layers.append(res(ch, up=True) if resblock_updown else Upsample(ch))
                self.decoder.append(EmbedSequential(*layers, grad_checkpointing=grad_checkpointing))
        self.out = nn.Sequential(
            GroupNorm32(ch, norm_groups), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels * p2, 3, padding=1))
        )

    def embed(self, t: Tensor, batch: int, class_labels: Tensor | None, aug_level: Tensor | None) -> Tensor:
        """The (B, 4·model_channels) conditioning embedding; checks which conditioning is given."""
        _expect("class_labels", class_labels, self.class_embed is not None)
        _expect("aug_level", aug_level, self.aug_embed is not None)
        emb = self.time_embed(batch_vector(t, batch))  # (B, E)
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)  # (B, E)
        if self.aug_embed is not None:
            emb = emb + self.aug_embed(batch_vector(aug_level, batch))  # (B, E)
        return emb

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        class_labels: Tensor | None = None,
        lowres: Tensor | None = None,
        aug_level: Tensor | None = None,
    ) -> Tensor:
        """Predict from x_t (B, in_channels, H, W) at timesteps t (B,).

        Args:
            class_labels: (B,) long in [0, num_classes]; ``num_classes`` is the null class (if ``null_class``).
            lowres: (B, lowres_channels, H, W) low-res conditioning resized to x_t's size.
            aug_level: (B,) noise-augmentation level of ``lowres``, in timestep units.
        Returns:
            (B, out_channels, H, W).
        """
        emb = F.silu(self.embed(t, x_t.shape[0], class_labels, aug_level))  # (B, E): every block's projection input
        _expect("lowres", lowres, self.lowres_channels > 0)
        if lowres is not None:
            if lowres.shape[1] != self.lowres_channels or lowres.shape[-2:] != x_t.shape[-2:]:
                expected = (x_t.shape[0], self.lowres_channels, *x_t.shape[-2:])
                raise ValueError(f"lowres must have shape {expected}, got {tuple(lowres.shape)}")
            x_t = torch.cat([x_t, lowres.to(x_t.dtype)], dim=1)  # (B, in + lowres, H, W)
        p = self.patch_size
        if p > 1:
            if x_t.shape[-2] % p or x_t.shape[-1] % p:
                raise ValueError(f"spatial size {tuple(x_t.shape[-2:])} must be divisible by patch_size {p}")
            x_t = F.pixel_unshuffle(x_t, p)  # (B, C·p², H / p, W / p)
        h, skips = self.encoder(x_t, emb)  # (B, C_mid, H / (p·2^(L-1)), W / (p·2^(L-1)))
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # (B, C_level, H_level, W_level)
        out = self.out(h)  # (B, out_channels·p², H / p, W / p)
        return F.pixel_shuffle(out, p) if p > 1 else out  # (B, out_channels, H, W)


def _expect(name: str, value: Tensor | None, required: bool) -> None:
    """Raise a clear ValueError when a conditioning input is missing or unexpected."""
    if required and value is None:
        raise ValueError(f"this network is conditioned on {name}; pass {name}=...")
    if not required and value is not None:
        raise ValueError(f"this network is not conditioned on {name}, but {name} was given")
