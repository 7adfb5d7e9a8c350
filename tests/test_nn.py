"""The networks: shapes, conditioning, attention against a naive reference, checkpointing, and
parameter counts of ADM's published configurations (built on the meta device)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cascade.nn import EncoderClassifier, UNet, layers
from cascade.nn.layers import AttentionBlock, AttentionPool2d, ResBlock, timestep_embedding

# A CPU-sized U-Net: two levels (32px and 16px), attention at 16px and in the middle.
TINY = dict(
    resolution=32,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(16,),
    head_channels=32,
    dropout=0.0,
)


def perturb_zero_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomly re-initialise the zero-initialised convs so that every branch contributes."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not m.weight.any():
            m.reset_parameters()
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "kwargs, cond, size",
    [
        (dict(num_classes=10), dict(class_labels=torch.tensor([0, 9])), (32, 32)),
        (dict(out_channels=6, num_classes=10), dict(class_labels=torch.tensor([10, 3])), (32, 32)),  # null class
        (
            dict(lowres_channels=3, aug_level_embedding=True, num_classes=10),
            dict(class_labels=torch.tensor([1, 2]), lowres=torch.randn(2, 3, 32, 32), aug_level=torch.tensor([0.0, 250.0])),
            (32, 32),
        ),
        (dict(channel_mult=(1, 1, 2), num_res_blocks=(2, 1, 1)), {}, (32, 32)),  # per-level blocks
        (dict(use_scale_shift_norm=False, resblock_updown=False), {}, (32, 32)),  # plain add, conv resampling
        (dict(head_channels=None, num_heads=2), {}, (32, 32)),
        (dict(attention_resolutions=(), middle_attention=False), {}, (48, 80)),  # fully conv, non-square, larger
        (dict(channel_mult=(1, 2, 2)), {}, (64, 40)),  # attention level at a non-nominal size
    ],
)
def test_unet_output_shape(kwargs: dict, cond: dict, size: tuple[int, int]) -> None:
    net = UNet(**{**TINY, **kwargs})
    out_channels = kwargs.get("out_channels", 3)
    lowres = cond.get("lowres")
    if lowres is not None:
        cond["lowres"] = torch.nn.functional.interpolate(lowres, size=size)
    x = torch.randn(2, 3, *size)
    out = net(x, torch.tensor([0, 999]), **cond)
    assert out.shape == (2, out_channels, *size)


def test_resblock_up_down_shapes() -> None:
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    assert ResBlock(32, 16, out_channels=64, down=True)(x, emb).shape == (2, 64, 4, 4)
    assert ResBlock(32, 16, up=True, use_scale_shift_norm=False)(x, emb).shape == (2, 32, 16, 16)


def test_upsample_conv_is_conv_of_the_nearest_upsampled_map() -> None:
    """The transposed-convolution form of nearest ×2 + 3×3 conv is the same function of the same weight: value and
    gradients (input, weight, bias) in float64 to rounding, NCHW and NHWC, odd and even sizes; ResBlock(up) uses it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).double()
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        fast, slow = layers.upsample_conv(x, conv), conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert fast.shape == (2, 12, 10, 12) and fast.is_contiguous(memory_format=fmt)
        assert torch.allclose(fast, slow, atol=1e-12)
        probe = torch.randn_like(slow)
        grads = [torch.autograd.grad((y * probe).sum(), (x, conv.weight, conv.bias)) for y in (fast, slow)]
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-11)
    with pytest.raises(ValueError, match="3×3"):
        layers.upsample_conv(x, nn.Conv2d(8, 8, 1).double())
    block = ResBlock(32, 64, up=True).double()
    perturb_zero_init(block)
    x, emb = torch.randn(2, 32, 4, 4, dtype=torch.float64), torch.randn(2, 64, dtype=torch.float64)
    scale, shift = block.emb_proj(emb).chunk(2, dim=1)
    h = block.in_conv(torch.nn.functional.interpolate(block.in_norm(x, act=True), scale_factor=2.0, mode="nearest"))
    h = block.out_conv(block.out_norm(h, scale, shift, act=True))
    assert torch.allclose(block(x, emb), torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest") + h, atol=1e-12)


def test_timestep_embedding() -> None:
    t = torch.tensor([0, 1, 500])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (3, 7) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :3], torch.ones(3)) and torch.equal(emb[0, 3:], torch.zeros(4))  # cos 0, sin 0, pad
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(1.0))) and torch.allclose(emb[1, 3], torch.sin(torch.tensor(1.0)))
    assert torch.allclose(timestep_embedding(t.float(), 7), emb)


# ----------------------------------------------------------------------------- conditioning


def test_fresh_unet_outputs_zeros() -> None:
    net = UNet(**TINY, num_classes=10)
    out = net(torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), class_labels=torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))


def test_class_and_aug_level_change_output() -> None:
    net = perturb_zero_init(UNet(**TINY, num_classes=10, lowres_channels=3, aug_level_embedding=True)).eval()
    x, lowres, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.tensor([10, 10])
    aug = torch.tensor([0.0, 0.0])
    with torch.no_grad():
        base = net(x, t, class_labels=torch.tensor([1, 1]), lowres=lowres, aug_level=aug)
        other_class = net(x, t, class_labels=torch.tensor([2, 10]), lowres=lowres, aug_level=aug)  # 10 = null
        other_aug = net(x, t, class_labels=torch.tensor([1, 1]), lowres=lowres, aug_level=aug + 300)
        other_lowres = net(x, t, class_labels=torch.tensor([1, 1]), lowres=-lowres, aug_level=aug)
    for out in (other_class, other_aug, other_lowres):
        assert (out - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every example changed


def test_missing_or_unexpected_conditioning_raises() -> None:
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    y, lr, s = torch.tensor([1]), torch.randn(1, 3, 32, 32), torch.tensor([1.0])
    cond = UNet(**TINY, num_classes=10, lowres_channels=3, aug_level_embedding=True)
    plain = UNet(**TINY)
    for kwargs in (dict(lowres=lr, aug_level=s), dict(class_labels=y, aug_level=s), dict(class_labels=y, lowres=lr)):
        with pytest.raises(ValueError, match="is conditioned on"):
            cond(x, t, **kwargs)
    for kwargs in (dict(class_labels=y), dict(lowres=lr), dict(aug_level=s)):
        with pytest.raises(ValueError, match="not conditioned on"):
            plain(x, t, **kwargs)
    with pytest.raises(ValueError, match="lowres must have shape"):
        cond(x, t, class_labels=y, lowres=lr[..., :16, :16], aug_level=s)
    with pytest.raises(ValueError, match="divisible"):
        plain(torch.randn(1, 3, 31, 32), t)
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNet(**{**TINY, "num_res_blocks": (1, 2, 3)})


# ----------------------------------------------------------------------------- attention


def test_attention_levels_follow_resolution() -> None:
    net = UNet(**{**TINY, "resolution": 64, "channel_mult": (1, 2, 2), "attention_resolutions": (16,)})
    has_attn = [any(isinstance(m, AttentionBlock) for m in block) for block in net.encoder.blocks]
    assert has_attn == [False, False, False, False, True]  # 64px block, down, 32px block, down, 16px block
    attention_free = UNet(**{**TINY, "attention_resolutions": (), "middle_attention": False})
    assert not any(isinstance(m, AttentionBlock) for m in attention_free.modules())


def test_attention_block_matches_naive_softmax() -> None:
    torch.manual_seed(0)
    block = perturb_zero_init(AttentionBlock(64, head_channels=16))  # 4 heads
    assert block.num_heads == 4 and AttentionBlock(64, num_heads=2).num_heads == 2
    x = torch.randn(2, 64, 5, 6)
    b, c, t, heads = 2, 64, 30, 4
    d = c // heads
    q, k, v = block.qkv(block.norm(x.reshape(b, c, t))).reshape(b, 3, heads, d, t).unbind(1)  # (B, heads, d, T)
    w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)  # (B, heads, T, T)
    a = torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, c, t)  # (B, C, T)
    expected = (x.reshape(b, c, t) + block.proj(a)).reshape_as(x)
    assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize("order", ["new", "legacy"])
def test_attention_runs_on_the_fused_flash_kernel_in_both_layouts(order: str) -> None:
    """q, k, v reach SDPA with stride 1 on the head dimension, so the fused kernel takes them (restricted to it, a
    math fallback would raise): forward and input gradient equal the naive softmax in ADM's order, NCHW and NHWC."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    block = perturb_zero_init(AttentionBlock(64, head_channels=16, order=order))  # 4 heads of 16
    b, c, t, heads, d = 2, 64, 30, 4, 16
    x = torch.randn(b, c, 5, 6, dtype=torch.float64, requires_grad=True)
    block.double()
    qkv = block.qkv(block.norm(x.reshape(b, c, t)))  # (B, 3C, T)
    split = qkv.reshape(b, 3, heads, d, t).unbind(1) if order == "new" else qkv.reshape(b, heads, 3, d, t).unbind(2)
    q, k, v = split  # (B, heads, d, T) each
    w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)  # (B, heads, T, T)
    expected = (x.reshape(b, c, t) + block.proj(torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, c, t))).reshape_as(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    block.float()
    for fmt in (torch.contiguous_format, torch.channels_last):
        x32 = x.detach().float().contiguous(memory_format=fmt).requires_grad_()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            y = block(x32)
            (grad,) = torch.autograd.grad(y.square().sum(), x32)
        assert y.is_contiguous(memory_format=fmt)
        assert torch.allclose(y.double(), expected, atol=2e-5)
        assert torch.allclose(grad.double(), expected_grad, atol=1e-4 * expected_grad.abs().max().item())


def test_legacy_attention_order_is_new_order_with_permuted_weights() -> None:
    """ADM's legacy layout (per head [q, k, v]) is the new one ([Q_all, K_all, V_all]) with the qkv rows reordered."""
    torch.manual_seed(0)
    legacy = perturb_zero_init(AttentionBlock(64, head_channels=16, order="legacy"))  # 4 heads of 16
    new = AttentionBlock(64, head_channels=16, order="new")
    new.load_state_dict(legacy.state_dict())
    rows = torch.arange(3 * 64).reshape(4, 3, 16).transpose(0, 1).reshape(-1)  # new row r ← legacy row rows[r]
    with torch.no_grad():
        new.qkv.weight.copy_(legacy.qkv.weight[rows])
        new.qkv.bias.copy_(legacy.qkv.bias[rows])
    x = torch.randn(2, 64, 5, 6)
    assert torch.allclose(legacy(x), new(x), atol=1e-6)
    new.load_state_dict(legacy.state_dict())  # the same weights read in the other order: another function
    assert (legacy(x) - new(x)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="attention order"):
        AttentionBlock(64, order="old")


def test_null_class_row_and_fractional_multipliers() -> None:
    with_null = UNet(**TINY, num_classes=10)
    without = UNet(**TINY, num_classes=10, null_class=False)
    assert with_null.class_embed.num_embeddings == 11 and without.class_embed.num_embeddings == 10
    half = UNet(**{**TINY, "model_channels": 64, "channel_mult": (0.5, 1)})  # ADM 512px: first level at half width
    assert half.encoder.input_conv.out_channels == 32 and half.encoder.out_channels == 64
    with pytest.raises(ValueError, match="whole channel count"):
        UNet(**{**TINY, "channel_mult": (0.3, 1)})


def test_attention_pool_matches_naive_softmax() -> None:
    torch.manual_seed(0)
    pool = AttentionPool2d(4, 64, 10, num_heads=2)
    x = torch.randn(3, 64, 4, 4)
    tokens = x.flatten(2).transpose(1, 2)  # (B, 16, C)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + pool.pos_emb  # (B, 17, C)
    q, k, v = pool.qkv(tokens).reshape(3, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)  # (B, heads, 17, d)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)  # (B, heads, 17, 17): full attention
    expected = pool.out((w @ v)[:, :, 0].reshape(3, 64))  # first token
    assert torch.allclose(pool(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="expects 4"):
        pool(torch.randn(1, 64, 8, 8))


# ----------------------------------------------------------------------------- checkpointing, dtypes


def test_grad_checkpointing_gives_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs["use_reentrant"])
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counting_checkpoint)
    kwargs = {**TINY, "num_classes": 10, "dropout": 0.1}
    ref = perturb_zero_init(UNet(**kwargs))
    ckpt = UNet(**kwargs, grad_checkpointing=True)
    ckpt.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 900]), torch.tensor([4, 10])
    grads = []
    for net in (ref, ckpt):
        torch.manual_seed(123)  # same dropout masks (checkpoint replays the RNG state)
        net(x, t, class_labels=y).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    for g_ref, g_ckpt in zip(*grads):
        assert torch.allclose(g_ref, g_ckpt, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[0])
    assert len(calls) > 0 and not any(calls)  # the checkpointed model went through non-reentrant checkpoint
    calls.clear()
    with torch.no_grad():
        ckpt(x, t, class_labels=y)
    assert not calls  # no checkpointing without gradients


def test_bf16_autocast_and_bf16_weights() -> None:
    net = perturb_zero_init(UNet(**TINY, num_classes=10))
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, class_labels=y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out = copy.deepcopy(net).to(torch.bfloat16)(x.bfloat16(), t, class_labels=y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- classifier


def test_classifier_logits_and_input_gradient() -> None:
    clf = EncoderClassifier(
        resolution=32,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        head_channels=32,
        num_classes=7,
    )
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits = clf(x, torch.tensor([0, 500]))
    assert logits.shape == (2, 7)
    (grad,) = torch.autograd.grad(logits.log_softmax(-1)[:, 3].sum(), x)  # ∇_x log p(y | x_t, t), for guidance
    assert grad.shape == x.shape and grad.abs().sum() > 0
    with pytest.raises(ValueError):
        clf(torch.randn(1, 3, 64, 64), torch.tensor([0]))


# ----------------------------------------------------------------------------- ADM parameter counts


@pytest.mark.parametrize(
    "build, target",
    [
        # ADM ImageNet-64: learned sigma, 1000 classes.
        (lambda: UNet(num_classes=1000, out_channels=6), 295.9e6),
        # ADM 64→256 upsampler.
        (
            lambda: UNet(
                resolution=256,
                lowres_channels=3,
                out_channels=6,
                channel_mult=(1, 1, 2, 2, 4, 4),
                num_res_blocks=2,
                num_heads=4,
                head_channels=None,
                num_classes=1000,
            ),
            311.8e6,
        ),
        # ADM noisy classifier at 64px.
        (lambda: EncoderClassifier(), 65.4e6),
    ],
)
def test_adm_parameter_counts(build, target: float) -> None:
    with torch.device("meta"):
        model = build()
    assert abs(num_params(model) - target) / target < 0.01, num_params(model)


def test_patched_unet_sees_each_patch_and_returns_full_resolution() -> None:
    # patch_size p: the network is a U-Net on the pixel-unshuffled image (C·p² channels at H/p): its input conv
    # sees every pixel of a patch, attention levels follow the patched resolution, the output is (B, C, H, W).
    torch.manual_seed(0)
    net = UNet(**{**TINY, "attention_resolutions": (8,), "num_classes": 3, "patch_size": 2})
    assert net.encoder.input_conv.in_channels == 12 and net.out[-1].out_channels == 12
    assert isinstance(net.encoder.blocks[-1][-1], AttentionBlock)  # 32 / 2 / 2 = 8: level 1 has attention
    nn.init.normal_(net.out[-1].weight, std=0.1)  # not zero, so the output depends on the input
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.tensor([0, 2])
    out = net(x, t, class_labels=y)
    assert out.shape == (2, 3, 32, 32)
    moved = x.clone()
    moved[:, :, 0, 1] += 1.0  # a pixel inside the first 2×2 patch, not its corner
    assert not torch.equal(net(moved, t, class_labels=y), out)
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        net(torch.randn(1, 3, 33, 33), t[:1], class_labels=y[:1])
    with pytest.raises(ValueError, match="patch_size must be a positive divisor"):
        UNet(resolution=30, patch_size=4)
