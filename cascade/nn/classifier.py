"""The noisy classifier p_φ(y | x_t, t) used for classifier guidance (Dhariwal & Nichol 2021, §4).

It is the encoder half of the ADM U-Net (:class:`~cascade.nn.unet.UNetEncoder`, shared code),
conditioned on t through the same time embedding, followed by GroupNorm–SiLU and attention
pooling (:class:`~cascade.nn.layers.AttentionPool2d`) to class logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from cascade.nn.layers import AttentionOrder, AttentionPool2d, GroupNorm32, TimestepEmbedding, attention_num_heads, batch_vector
from cascade.nn.unet import EncoderOptions, UNetEncoder

__all__ = ["EncoderClassifier"]


class EncoderClassifier(nn.Module):
    """ADM's noisy ImageNet classifier: U-Net encoder + attention pooling → (B, num_classes) logits.

    The attention pool's positional embedding fixes the input size to ``resolution``. The pool
    has its own head settings and always ADM's "new" q/k/v order; ``attention_order`` is that of
    the encoder's attention blocks (ADM's released classifiers: "legacy").
    """

    def __init__(
        self,
        *,
        resolution: int = 64,  # input resolution (fixed by the attention pool)
        in_channels: int = 3,  # channels of x_t
        model_channels: int = 128,  # base width ("classifier_width")
        channel_mult: Sequence[float] = (1, 2, 3, 4),  # width multiplier per level
        num_res_blocks: int | Sequence[int] = 4,  # ResBlocks per level ("classifier_depth")
        attention_resolutions: Sequence[int] = (32, 16, 8),  # resolutions with self-attention
        num_heads: int = 1,  # attention heads of the encoder, unless head_channels is set
        head_channels: int | None = 64,  # channels per head of the encoder; overrides num_heads
        attention_order: AttentionOrder = "new",  # q/k/v layout of the encoder's attention blocks
        pool_num_heads: int | None = None,  # attention-pool heads, unless pool_head_channels is set; None: as the encoder
        pool_head_channels: int | None = None,  # channels per attention-pool head (ADM: 64); None: as the encoder
        dropout: float = 0.0,  # ResBlock dropout
        num_classes: int = 1000,  # logits
        use_scale_shift_norm: bool = True,  # adaptive group norm conditioning
        resblock_updown: bool = True,  # BigGAN-style down-sampling ResBlocks
        grad_checkpointing: bool = False,  # recompute res/attention blocks in backward
        middle_attention: bool = True,  # attention in the middle block
        norm_groups: int = 32,  # group-norm groups (ADM: 32)
    ) -> None:
        super().__init__()
        options = EncoderOptions.pick(locals())
        emb_channels = 4 * model_channels
        self.time_embed = TimestepEmbedding(model_channels, emb_channels)
        self.encoder = UNetEncoder(options, resolution=resolution, in_channels=in_channels, emb_channels=emb_channels)
        ch = self.encoder.out_channels
        self.norm = GroupNorm32(ch, norm_groups)
        if pool_num_heads is None and pool_head_channels is None:
            pool_num_heads, pool_head_channels = num_heads, head_channels
        heads = attention_num_heads(ch, pool_num_heads or 1, pool_head_channels)
        self.pool = AttentionPool2d(resolution // self.encoder.downsampling, ch, num_classes, num_heads=heads)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Logits (B, num_classes) of p_φ(y | x_t, t) for x_t (B, in_channels, resolution, resolution), t (B,)."""
        emb = F.silu(self.time_embed(batch_vector(t, x_t.shape[0])))  # (B, E): every block's projection input
        h, _ = self.encoder(x_t, emb)  # (B, C_mid, r, r)
        return self.pool(self.norm(h, act=True))  # (B, num_classes)
