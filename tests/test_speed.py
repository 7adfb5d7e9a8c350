"""Speed options keep the numbers: the bf16 GroupNorm fast path, guidance gradients under inference mode,
torch.compile in the trainer (checkpoints hold the plain module's keys), and the benchmark's diffusers twin."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from cascade.checkpoint import load_checkpoint
from cascade.data import ShapesDataset
from cascade.guidance import classifier_log_prob, log_prob_gradient
from cascade.nn import EncoderClassifier
from cascade.nn.layers import GroupNorm32
from tests.helpers import ROOT, SMOKE, STAGE_SMOKE, compose_train


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_bf16_matches_float32_reference(channels_last: bool) -> None:
    """Whatever path a bf16 input takes, output and gradients are the float32 computation up to bf16 rounding."""
    torch.manual_seed(0)
    norm = GroupNorm32(64)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(4, 64, 8, 8) * 3 + 5).bfloat16()  # an offset mean: statistics in bf16 would lose it
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(4, 64, 8, 8).bfloat16()

    x_fast = x.clone().requires_grad_(True)
    out = norm(x_fast)
    out.backward(grad_out)
    fast_w, fast_b = norm.weight.grad.clone(), norm.bias.grad.clone()
    norm.zero_grad()
    x_ref = x.float().requires_grad_(True)
    ref = F.group_norm(x_ref, 32, norm.weight, norm.bias, norm.eps)
    ref.backward(grad_out.float())

    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()  # within half a bf16 ulp (8 mantissa bits)
    torch.testing.assert_close(x_fast.grad.float(), x_ref.grad, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(fast_w, norm.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_b, norm.bias.grad, rtol=1e-4, atol=1e-4)


def test_guidance_gradient_under_inference_mode_equals_plain() -> None:
    torch.manual_seed(0)
    clf = EncoderClassifier(resolution=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                            head_channels=32, num_classes=5)
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 990]), torch.tensor([0, 4, 2])
    plain = log_prob_gradient(classifier_log_prob(clf), x, t, y)
    with torch.inference_mode():
        xi, ti, yi = x.clone(), t.clone(), y.clone()  # inference tensors, as a sampler's are
        inside = log_prob_gradient(classifier_log_prob(clf), xi, ti, yi)
    torch.testing.assert_close(inside, plain)
    # One backward for the batch is each example's own gradient: example 1 alone gives row 1.
    alone = log_prob_gradient(classifier_log_prob(clf), x[1:2], t[1:2], y[1:2])
    torch.testing.assert_close(plain[1:2], alone, rtol=1e-4, atol=1e-6)


def test_trainer_compile_trains_the_same_and_saves_plain_keys(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile=true (dynamo with the eager backend here: the wiring, not inductor's codegen) gives the eager
    run's weights, and the checkpoint's state dicts load strictly into a freshly built network."""
    real_compile = torch.compile
    compiled = []

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    overrides = [*SMOKE, *STAGE_SMOKE["base"], "stage=base", "trainer.max_steps=1", "trainer.bf16=false"]
    payloads = []
    for flag in ("false", "true"):
        cfg = compose_train([*overrides, f"trainer.compile={flag}", f"run_dir={tmp_path / flag}"])
        torch.manual_seed(cfg.seed)
        stage, trainer = instantiate(cfg.stage), instantiate(cfg.trainer)
        dataset = ShapesDataset(resolution=stage.resolution, size=cfg.data.train.size)
        trainer.fit(stage, dataset, run_dir=cfg.run_dir, config={}, seed=cfg.seed, device=torch.device("cpu"))
        payloads.append(load_checkpoint(tmp_path / flag / "checkpoints" / "last.pt"))
    assert len(compiled) == 1
    plain, comp = payloads
    fresh = instantiate(compose_train(overrides).stage).build(num_classes=10)
    for key in ("model", "ema"):
        assert not any("_orig_mod" in k for k in comp[key])
        fresh.load_state_dict(comp[key], strict=True)
        for name, value in plain[key].items():
            torch.testing.assert_close(comp[key][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "default"])
@pytest.mark.parametrize("stage_name", ["base", "sr256", "sr1024"])
def test_diffusers_twin_matches_parameter_count(stage_name: str, preset: str) -> None:
    pytest.importorskip("diffusers")
    from cascade.benchmark import diffusers_twin, unet_kwargs

    stage = instantiate(compose_train([f"stage={stage_name}", f"preset={preset}"]).stage)
    with torch.device("meta"):
        ours = stage.build(num_classes=10)
        twin, config = diffusers_twin(unet_kwargs(stage.net, stage.net_kwargs(10)), sum(p.numel() for p in ours.parameters()))
    # UNet2DModel has one extra-embedding slot, taken by the class: the upsamplers' aug-level MLP has no twin
    mirrored = sum(p.numel() for name, p in ours.named_parameters() if "aug_embed." not in name)
    ratio = sum(p.numel() for p in twin.parameters()) / mirrored
    assert abs(ratio - 1) < 0.1, (ratio, config)
    if isinstance(stage.net.keywords.get("num_res_blocks"), int):  # same structure: the counts agree to 1%
        assert abs(ratio - 1) < 0.01, (ratio, config)


def test_diffusers_twin_trains_through_the_stage_loss() -> None:
    pytest.importorskip("diffusers")
    from cascade.benchmark import diffusers_twin, unet_kwargs

    stage = instantiate(compose_train(["stage=sr256", "preset=tiny"]).stage)
    params = sum(p.numel() for p in stage.build(num_classes=10).parameters())
    twin, _ = diffusers_twin(unet_kwargs(stage.net, stage.net_kwargs(10)), params)
    loss = stage.loss(twin, torch.rand(2, 3, 256, 256) * 2 - 1, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert loss.shape == (2,) and all(p.grad is not None for p in twin.parameters() if p.requires_grad)


@pytest.mark.parametrize("args, message", [(["--stages", "nope"], "unknown stage"), (["--rounds", "0"], "must be >= 1"),
                                           (["--preset", "huge"], "unknown preset")])
def test_benchmark_bad_input_is_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")
