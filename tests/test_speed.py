"""Speed options keep the numbers: the bf16 GroupNorm fast path, guidance gradients under inference mode,
torch.compile in the trainer (checkpoints hold the plain module's keys), and the benchmark's diffusers twin."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from cascade.data import ShapesDataset
from cascade.diffusion.guidance import classifier_log_prob, log_prob_gradient
from cascade.nn import EncoderClassifier
from cascade.nn.layers import GroupNorm32
from cascade.training.checkpoint import load_checkpoint
from tests.helpers import ROOT, SMOKE, STAGE_SMOKE, compose_train


def test_group_norm_bf16_nchw_is_float32_up_to_one_rounding() -> None:
    """NCHW bf16 takes PyTorch's mixed-precision kernel: the float32 computation rounded once to bf16."""
    torch.manual_seed(0)
    norm = GroupNorm32(64)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(4, 64, 8, 8) * 3 + 5).bfloat16()  # an offset mean: statistics in bf16 would lose it
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


def _adagn_reference(x, weight, bias, scale, shift, act):
    """SiLU(GN(x)·(1 + scale) + shift) in float64: the closed form every path is held to."""
    h = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-5)
    if scale is not None:
        h = h * (1 + scale.double()[:, :, None, None]) + shift.double()[:, :, None, None]
    return F.silu(h) if act else h


def _use_kernel(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route channels-last bf16 norms to ``kernel``: "native" (the C++ kernels, which must build here) or "torch"
    (the PyTorch-ops fallback, without its size cut-off)."""
    from cascade.nn import group_norm
    from cascade.nn.native import group_norm_kernels

    if kernel == "native":
        assert group_norm_kernels() is not None, "the C++ GroupNorm kernel did not build (see the warning above)"
    else:
        monkeypatch.setattr(group_norm, "group_norm_kernels", lambda: None)
        monkeypatch.setattr(group_norm, "MIN_ELEMENTS", 0)  # the size cut-off is about speed; test the kernel on small maps


@pytest.mark.parametrize("layout", ["nchw", "channels-last native", "channels-last torch"])
@pytest.mark.parametrize("adaptive, act", [(False, False), (False, True), (True, True)])
def test_fused_group_norm_matches_float64_in_value_and_gradient(
    layout: str, adaptive: bool, act: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GN (+ scale-shift) (+ SiLU) in bf16, channels-last (our C++ kernel or its PyTorch-ops fallback) or NCHW
    (PyTorch's): output and the gradients of x, w, b, scale and shift are the float64 computation up to bf16
    rounding (errors relative to the norm)."""
    from cascade.nn import group_norm
    from cascade.nn.group_norm import channels_last_kernel, group_norm_act

    channels_last = layout != "nchw"
    if channels_last:
        _use_kernel(layout.split()[-1], monkeypatch)
    torch.manual_seed(0)
    b, c = 4, 96  # 3 channels per group
    weight, bias = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
    scale = (0.3 * torch.randn(b, c)).requires_grad_(True) if adaptive else None
    shift = (0.3 * torch.randn(b, c)).requires_grad_(True) if adaptive else None
    # Offset means, different per channel, and a spread that differs per example.
    x = (torch.randn(b, c, 8, 8) * torch.rand(b, 1, 1, 1) * 3 + 5 + torch.randn(1, c, 1, 1)).bfloat16()
    grad_out = torch.randn(b, c, 8, 8).bfloat16()
    if channels_last:
        x, grad_out = x.contiguous(memory_format=torch.channels_last), grad_out.contiguous(memory_format=torch.channels_last)
    expected = {
        "nchw": None,
        "channels-last native": group_norm._NativeGroupNormAct,
        "channels-last torch": group_norm._ChannelsLastGroupNormAct,
    }[layout]
    assert channels_last_kernel(x) is expected
    params = [p for p in (weight, bias, scale, shift) if p is not None]

    x_fast = x.clone().requires_grad_(True)
    out = group_norm_act(x_fast, 32, weight, bias, 1e-5, scale, shift, act)
    grads = torch.autograd.grad(out, [x_fast, *params], grad_out)
    x_ref = x.double().requires_grad_(True)
    ref = _adagn_reference(x_ref, weight, bias, scale, shift, act)
    ref_grads = torch.autograd.grad(ref, [x_ref, *params], grad_out.double())

    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert (out.double() - ref).norm() / ref.norm() < 2**-7
    assert ((out.double() - ref).abs() <= 2**-6 * (ref.abs() + 1)).all()
    for got, want in zip(grads, ref_grads):
        assert (got.double() - want).norm() / want.norm() < 2**-7
    if layout == "channels-last native":  # float32 inside, one rounding out: within bf16's unit roundoff of the truth
        assert (out.double() - ref).norm() / ref.norm() < 2**-8
        for got, want in zip(grads[1:], ref_grads[1:]):  # parameter gradients are float32 sums
            assert (got.double() - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("adaptive, act", [(False, False), (False, True), (True, True)])
def test_fused_group_norm_float32_channels_last_matches_float64(adaptive: bool, act: bool) -> None:
    """Float32 channels-last maps take the C++ kernel (where PyTorch's channels-last GroupNorm is slow): output and
    the gradients of x, w, b, scale and shift are the float64 computation to float32 accuracy (relative to the norm;
    PyTorch's own float32 kernel is held to the same bound, so the kernel is no less exact than what it replaces)."""
    from cascade.nn import group_norm
    from cascade.nn.group_norm import channels_last_kernel, group_norm_act
    from cascade.nn.native import group_norm_kernels

    assert group_norm_kernels() is not None, "the C++ GroupNorm kernel did not build (see the warning above)"
    torch.manual_seed(0)
    b, c = 4, 96  # 3 channels per group
    weight, bias = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
    scale = (0.3 * torch.randn(b, c)).requires_grad_(True) if adaptive else None
    shift = (0.3 * torch.randn(b, c)).requires_grad_(True) if adaptive else None
    x = torch.randn(b, c, 24, 24) * torch.rand(b, 1, 1, 1) * 3 + 5 + torch.randn(1, c, 1, 1)  # 576 rows: 2 blocks each
    grad_out = torch.randn(b, c, 24, 24)
    params = [p for p in (weight, bias, scale, shift) if p is not None]
    x_ref = x.double().requires_grad_(True)
    ref = _adagn_reference(x_ref, weight, bias, scale, shift, act)
    ref_grads = torch.autograd.grad(ref, [x_ref, *params], grad_out.double())
    for memory_format in (torch.channels_last, torch.contiguous_format):  # the C++ kernel, then PyTorch's NCHW one
        x_fast = x.contiguous(memory_format=memory_format).requires_grad_(True)
        expected = group_norm._NativeGroupNormAct if memory_format == torch.channels_last else None
        assert channels_last_kernel(x_fast) is expected
        out = group_norm_act(x_fast, 32, weight, bias, 1e-5, scale, shift, act)
        grads = torch.autograd.grad(out, [x_fast, *params], grad_out.contiguous(memory_format=memory_format))
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=memory_format)
        assert (out.double() - ref).norm() / ref.norm() < 1e-6
        for got, want in zip(grads, ref_grads):
            assert (got.double() - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_channels_last_group_norm_statistics_have_no_cancellation(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mean 10⁴ standard deviations away: E[x²] − E[x]² in float32 would lose the variance entirely (10⁸ ± 10⁴ at
    float32's 2⁻²⁴), while the kernels' per-channel centring keeps it; checked in float32 against float64."""
    from cascade.nn import group_norm

    _use_kernel(kernel, monkeypatch)
    function = group_norm._NativeGroupNormAct if kernel == "native" else group_norm._ChannelsLastGroupNormAct
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 16, 16) + 1e4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    gamma, beta = torch.randn(2, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    grad_out = torch.randn(2, 64, 16, 16)
    if kernel == "native":  # AdaGN's form: γ = 1·(1 + (γ − 1)), β = 0·(1 + scale) + β
        out = function.apply(x, torch.ones(64), torch.zeros(64), gamma - 1, beta, 32, 1e-5, True)
    else:
        out = function.apply(x, gamma, beta, 32, 1e-5, True)
    grads = torch.autograd.grad(out, [x, gamma, beta], grad_out)
    x_ref = x.detach().double().requires_grad_(True)
    ref = F.silu(F.group_norm(x_ref, 32, eps=1e-5) * gamma.double()[:, :, None, None] + beta.double()[:, :, None, None])
    ref_grads = torch.autograd.grad(ref, [x_ref, gamma, beta], grad_out.double())
    assert (out.double() - ref).norm() / ref.norm() < 1e-4
    for got, want in zip(grads, ref_grads):
        assert (got.double() - want).norm() / want.norm() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_group_norm_does_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    """The C++ kernels sum fixed blocks of rows and combine them in a fixed order: 1 and 2 threads agree bit for bit."""
    from cascade.nn.group_norm import group_norm_act
    from cascade.nn.native import group_norm_kernels

    assert group_norm_kernels() is not None
    torch.manual_seed(0)
    x = torch.randn(3, 64, 40, 40).to(dtype).contiguous(memory_format=torch.channels_last)  # 1600 rows: 4 blocks each
    weight, bias, scale, shift = torch.randn(64), torch.randn(64), torch.randn(3, 64), torch.randn(3, 64)
    grad_out = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x_n = x.clone().requires_grad_(True)
            out = group_norm_act(x_n, 32, weight, bias, 1e-5, scale, shift, True)
            out.backward(grad_out)
            results.append((out, x_n.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_native_kernels_fall_back_to_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """``CASCADE_NATIVE_KERNELS=0`` or a failed build (here: the builder raises) leaves the PyTorch-ops kernel, with
    one warning for the failure."""
    from torch.utils import cpp_extension

    from cascade.nn import native

    monkeypatch.setenv("CASCADE_NATIVE_KERNELS", "0")
    assert native.group_norm_kernels.__wrapped__() is None
    monkeypatch.setenv("CASCADE_NATIVE_KERNELS", "1")

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'cascade_group_norm_act'\nmore lines")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.warns(RuntimeWarning, match="could not be built .*Error building extension 'cascade_group_norm_act'"):
        assert native.group_norm_kernels.__wrapped__() is None


def _small_unet() -> nn.Module:
    """A 16px U-Net with every parameter drawn from N(0, 0.1²) (no zero-initialised layers: every path carries signal)."""
    from cascade.nn import UNet

    torch.manual_seed(0)
    net = UNet(
        resolution=16,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=32,
        num_classes=3,
        dropout=0.0,
    )
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    return net


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_unet_channels_last_bf16_is_as_close_to_float32_as_nchw_bf16(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole U-Net with every norm on a channels-last kernel: its bf16 output and gradients are no further from
    the float32 network's than PyTorch's own bf16 (NCHW) path is."""
    from cascade.nn import group_norm

    _use_kernel(kernel, monkeypatch)
    function = group_norm._NativeGroupNormAct if kernel == "native" else group_norm._ChannelsLastGroupNormAct
    kernel_calls = []
    real_apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: kernel_calls.append(1) or real_apply(*args))
    net = _small_unet()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 2])

    def run(fmt: torch.memory_format, bf16: bool) -> torch.Tensor:
        model = copy.deepcopy(net).to(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x.contiguous(memory_format=fmt), t, class_labels=y).float()
        out.square().mean().backward()
        return torch.cat([out.flatten(), *(p.grad.flatten() for p in model.parameters())])  # output, then every gradient

    exact = run(torch.contiguous_format, bf16=False)
    nchw = run(torch.contiguous_format, bf16=True)
    assert not kernel_calls
    channels_last = run(torch.channels_last, bf16=True)
    assert len(kernel_calls) >= 8  # every 4-d norm of the network (the attention block's works on a 3-d view)
    n_out = 2 * 3 * 16 * 16
    for part in (slice(0, n_out), slice(n_out, None)):
        reference_error = (nchw[part] - exact[part]).norm()
        assert (channels_last[part] - exact[part]).norm() <= 1.5 * reference_error


def test_compiled_unet_traces_the_native_group_norm_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile of a channels-last bf16 U-Net runs its norms on the C++ kernels (as PyTorch operators with shape-only
    versions for tracing) once they are loaded: the compiled output equals eager's exactly (aot_eager: the same ops);
    the gradients too, up to the order in which the compiled backward sums them."""
    from cascade.nn.native import group_norm_kernels

    kernels = group_norm_kernels()
    assert kernels is not None
    calls = []
    real_forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *args: calls.append(1) or real_forward(*args))
    net = _small_unet().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t, y = torch.tensor([3, 700]), torch.tensor([0, 2])

    def run(model: nn.Module, params: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, class_labels=y).float()
        out.square().mean().backward()
        return out, torch.cat([p.grad.flatten() for p in params.parameters()])

    eager_net, compiled_net = copy.deepcopy(net), copy.deepcopy(net)
    eager_out, eager_grads = run(eager_net, eager_net)
    eager_calls = len(calls)
    compiled_out, compiled_grads = run(torch.compile(compiled_net, backend="aot_eager"), compiled_net)
    assert eager_calls >= 8 and len(calls) == 2 * eager_calls  # the compiled forward ran the same kernels
    assert torch.equal(compiled_out, eager_out)
    assert (compiled_grads - eager_grads).norm() / eager_grads.norm() < 1e-2


def test_guidance_gradient_under_inference_mode_equals_plain() -> None:
    torch.manual_seed(0)
    clf = EncoderClassifier(
        resolution=16,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=32,
        num_classes=5,
    )
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
    from cascade.tools.benchmark import diffusers_twin, unet_kwargs

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
    from cascade.tools.benchmark import diffusers_twin, unet_kwargs

    stage = instantiate(compose_train(["stage=sr256", "preset=tiny"]).stage)
    params = sum(p.numel() for p in stage.build(num_classes=10).parameters())
    twin, _ = diffusers_twin(unet_kwargs(stage.net, stage.net_kwargs(10)), params)
    loss = stage.loss(twin, torch.rand(2, 3, 256, 256) * 2 - 1, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert loss.shape == (2,) and all(p.grad is not None for p in twin.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "args, message",
    [(["--stages", "nope"], "unknown stage"), (["--rounds", "0"], "must be >= 1"), (["--preset", "huge"], "unknown preset")],
)
def test_benchmark_bad_input_is_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")


def test_compute_choice_follows_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.channels_last=auto: NHWC on a CPU where the C++ GroupNorm kernel is there, NCHW where it is not and in
    float32 on an AVX2-only CPU (measured faster there); bf16 autocast only where native, and with trainer.bf16=auto
    only where it also trains faster; the one printed line says which and why. Sampling stays channels-last wherever
    the kernel is (inference_memory_format)."""
    from cascade.training import checkpoint as checkpoint_module
    from cascade.utils import device as device_module
    from cascade.utils.device import choose_compute

    cpu = torch.device("cpu")
    monkeypatch.setattr(device_module, "cpu_vector_width", lambda: "AVX-512")
    monkeypatch.setattr(device_module, "native_bf16", lambda device: False)
    emulated = choose_compute(cpu, bf16=True, channels_last="auto", norm_kernel=lambda: True)
    assert (emulated.bf16, emulated.channels_last) == (False, True)
    assert emulated.line().startswith("compute: float32, channels-last (") and "bf16 would be emulated" in emulated.line()
    no_kernel = choose_compute(cpu, bf16=True, channels_last="auto", norm_kernel=lambda: False)
    assert not no_kernel.channels_last and "no C++ GroupNorm kernel" in no_kernel.reason
    forced = choose_compute(cpu, bf16=True, channels_last=False, norm_kernel=lambda: pytest.fail("not consulted"))
    assert not forced.channels_last and "set in the config" in forced.reason
    monkeypatch.setattr(device_module, "native_bf16", lambda device: True)
    native = choose_compute(cpu, bf16=True, channels_last="auto", norm_kernel=lambda: True)
    assert (native.bf16, native.channels_last) == (True, True) and "native bf16" in native.reason
    # auto: bf16 where it is native and trains faster: AMX, or AVX512-BF16 on AMD; float32 on Intel without AMX.
    for vendor, amx, expected in (("AuthenticAMD", False, True), ("GenuineIntel", True, True), ("GenuineIntel", False, False)):
        monkeypatch.setattr(device_module, "cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        auto = choose_compute(cpu, bf16="auto", channels_last="auto", norm_kernel=lambda: True)
        assert (auto.bf16, auto.channels_last) == (expected, True), (vendor, amx)
        assert expected or "Intel AVX512-BF16 without AMX: float32 steps are faster" in auto.line()
        assert choose_compute(cpu, bf16=True, channels_last="auto", norm_kernel=lambda: True).bf16  # true: wherever native
    with pytest.raises(ValueError, match="trainer.bf16 must be true, false or auto"):
        choose_compute(cpu, bf16="sometimes", channels_last="auto", norm_kernel=lambda: True)  # type: ignore[arg-type]
    assert not choose_compute(cpu, bf16=False, channels_last="auto", norm_kernel=lambda: True).bf16
    with pytest.raises(ValueError, match="true, false or auto"):
        choose_compute(cpu, bf16=True, channels_last="yes", norm_kernel=lambda: True)  # type: ignore[arg-type]

    monkeypatch.setattr(device_module, "cpu_vector_width", lambda: "AVX2")
    monkeypatch.setattr(device_module, "native_bf16", lambda device: False)
    avx2 = choose_compute(cpu, bf16=True, channels_last="auto", norm_kernel=lambda: pytest.fail("not consulted"))
    assert (avx2.bf16, avx2.channels_last) == (False, False) and "faster on AVX2" in avx2.reason
    assert "AVX2" in avx2.line() and avx2.line().startswith("compute: float32, NCHW (")
    assert choose_compute(cpu, bf16=False, channels_last=True, norm_kernel=lambda: True).channels_last  # the config wins
    monkeypatch.setattr(checkpoint_module, "group_norm_kernels", lambda: object())
    assert checkpoint_module.inference_memory_format(cpu) == torch.channels_last  # sampling: NHWC on AVX2 too
    monkeypatch.setattr(checkpoint_module, "group_norm_kernels", lambda: None)
    assert checkpoint_module.inference_memory_format(cpu) == torch.contiguous_format


def test_reference_judges_train_in_bf16_only_where_it_trains_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation's reference classifiers follow the stages' trainer.bf16=auto rule: bf16 autocast is asked for
    only where bf16_trains_faster says so (float32 on Intel AVX512-BF16 CPUs without AMX), and never when bf16=False."""
    from torch.utils.data import TensorDataset

    from cascade.evaluation import metrics as metrics_module

    asked: list[bool] = []
    real = metrics_module.bf16_autocast
    monkeypatch.setattr(
        metrics_module, "bf16_autocast", lambda device, enabled=True: asked.append(enabled) or real(device, False)
    )
    data = TensorDataset(torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 0, 1]))
    for faster, bf16, expected in ((False, True, False), (True, True, True), (True, False, False)):
        monkeypatch.setattr(metrics_module, "bf16_trains_faster", lambda device, faster=faster: (faster, "test"))
        asked.clear()
        metrics_module.train_reference_classifier(data, num_classes=2, steps=1, batch_size=4, bf16=bf16, progress=False)
        assert asked == [expected], (faster, bf16)


def test_demo_prints_what_the_tiny_stages_will_choose_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/demo.py's first line reads the tiny preset's trainer settings through choose_compute: float32 where bf16
    would be emulated or slower, bf16 autocast where native and faster, and says the work does not depend on the
    machine."""
    import runpy

    from cascade.utils import device as device_module

    demo = runpy.run_path(str(ROOT / "scripts" / "demo.py"))
    trainer = demo["tiny_base_trainer"]()
    monkeypatch.setattr(device_module, "native_bf16", lambda device: False)
    emulated = demo["machine_line"]("cpu", trainer)
    assert emulated.startswith("demo on cpu, ") and "compute: float32" in emulated and "bf16 would be emulated" in emulated
    assert "same stages, steps and pictures on every machine" in emulated and "\n" not in emulated
    monkeypatch.setattr(device_module, "native_bf16", lambda device: True)
    monkeypatch.setattr(device_module, "cpu_vendor", lambda: "AuthenticAMD")
    assert "compute: bf16 autocast" in demo["machine_line"]("cpu", trainer)
    monkeypatch.setattr(device_module, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert "compute: float32" in demo["machine_line"]("cpu", trainer)  # native but slower: Intel without AMX


def test_demo_guides_its_base_with_a_checkpoint_the_tiny_run_keeps() -> None:
    """The demo's autoguidance guide is a numbered checkpoint of the tiny base that its pruning keeps (2/3 of training)."""
    import runpy

    from omegaconf import OmegaConf

    demo = runpy.run_path(str(ROOT / "scripts" / "demo.py"))
    trainer = demo["tiny_base_trainer"]()
    path = demo["guide_checkpoint"](trainer)
    step = int(path.removesuffix(".pt").split("_")[-1])
    kept = range(trainer.max_steps, 0, -trainer.ckpt_every)[: trainer.keep_ckpts]  # the numbered checkpoints left at the end
    assert path.startswith("runs/base/checkpoints/step_") and step in kept and step < trainer.max_steps
    short = OmegaConf.merge(trainer, {"keep_ckpts": 1})
    with pytest.raises(ValueError, match="keeps no checkpoint at step"):
        demo["guide_checkpoint"](short)


def test_demo_bad_device_is_one_line_and_exit_code_2() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--device", "tpu"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr == "error: unknown device 'tpu'; use auto, cpu or cuda\n"
