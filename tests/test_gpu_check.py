"""The prepared GPU check (scripts/gpu_check.py) in its CPU mode: it runs through the real configs, trainer and
checkpoints, records why each CUDA-only part was skipped, and its resume check can fail."""

from __future__ import annotations

import json

import pytest
import torch

from cascade.tools import gpu_check
from cascade.tools.benchmark import cpu_features, describe_cpu
from cascade.utils.device import native_bf16
from tests.helpers import ROOT, run_script


def _check_tiny(stage: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> gpu_check.GpuCheck:
    """The CPU mode on one stage (smallest ladder), with every section and skip reason checked."""
    monkeypatch.setitem(gpu_check.LADDERS["tiny"], stage, (2,))
    report = gpu_check.run_gpu_check("tiny", torch.device("cpu"), budget_s=900, stages=(stage,), log=lambda line: None)
    (resume,) = [c for c in report.correctness if c["check"].startswith("2-step train + resume")]
    assert resume["stage"] == stage
    assert resume["passed"] and resume["differing_tensors"] == []
    (train,) = report.training
    assert train["stage"] == stage and train["batch"] == 2 and train["images_per_s"] > 0 and train["train_gflop_per_image"] > 0
    assert train["mfu"] is None  # no GPU peak on a CPU
    skipped = {s["what"]: s["reason"] for s in report.skipped}
    assert "CPU mode" in skipped["DDP over NCCL"]
    (sdpa,) = [c for c in report.correctness if c["check"].startswith("attention on a fused SDPA backend")]
    assert sdpa["stage"] == stage and isinstance(sdpa["passed"], bool)
    assert "needs all four stages" in skipped["sampling"]
    assert "tiny mode" in skipped[f"{stage}: torch.compile training"]
    json_path, md_path = gpu_check.write(report, tmp_path)
    assert json.loads(json_path.read_text())["training"][0]["batch"] == 2
    text = md_path.read_text()
    assert (
        f"| {stage} | eager | 2 |" in text
        and "## Skipped" in text
        and f"2-step train + resume bit-identical | {stage} | yes" in text
    )
    return report


def test_tiny_mode_trains_resumes_bit_identically_and_records_skips(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _check_tiny("classifier", tmp_path, monkeypatch)
    assert report.switches == [] and any(s["what"] == "switches" for s in report.skipped)


@pytest.mark.slow
def test_tiny_mode_base_with_switches(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _check_tiny("base", tmp_path, monkeypatch)
    assert [s["switch"] for s in report.switches] == [
        "bf16 autocast, NCHW, fused AdamW (the default)",
        "channels-last",
        "gradient checkpointing per block",
        "fp32 (TF32 on CUDA) instead of bf16",
        "AdamW without fused",
    ]


def test_unet_attention_runs_on_a_fused_sdpa_backend() -> None:
    """The check the GPU script makes, on the CPU's flash kernel: a math fallback raises instead of running."""
    from cascade.nn import UNet

    stage = gpu_check.instantiate(gpu_check.compose_config("base", "tiny").stage)
    net = stage.build(num_classes=10)
    result = gpu_check.sdpa_check(stage, net, torch.device("cpu"), 2)
    assert any(isinstance(m, UNet) for m in net.modules())  # a self-conditioned base wraps its U-Net
    assert result["passed"], result["error"]


def test_budget_guard_skips_what_does_not_fit() -> None:
    report = gpu_check.run_gpu_check("tiny", torch.device("cpu"), budget_s=1, stages=("base",), log=lambda line: None)
    assert report.correctness == [] and report.training == [] and report.switches == []
    assert any(s["what"] == "base: 2-step train + resume" and s["reason"].startswith("time budget") for s in report.skipped)


def test_resume_comparison_sees_a_single_bit() -> None:
    state = {
        "model": {"w": torch.ones(3)},
        "ema": {"w": torch.ones(3)},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(2.0)}}},
    }
    other = {
        "model": {"w": torch.ones(3)},
        "ema": {"w": torch.ones(3)},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(2.0)}}},
    }
    assert gpu_check._state_differences(state, other) == []
    other["optimizer"]["state"][0]["exp_avg"][1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    other["ema"]["w"][0] = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    assert gpu_check._state_differences(state, other) == ["ema.w", "optimizer.0.exp_avg"]


@pytest.mark.slow
def test_tiny_sampling_runs_the_whole_cascade() -> None:
    rows = gpu_check.sampling_check("tiny", torch.device("cpu"), "tiny")
    assert [r["what"] for r in rows] == [
        "base 64px + classifier guidance (scale 1)",
        "cascade 1 image: base",
        "cascade 1 image: sr256",
        "cascade 1 image: sr1024",
        "cascade 1 image: total",
    ]
    assert [r["output_px"] for r in rows[1:]] == [64, 64, 256, 256]
    assert rows[-1]["wall_s"] == pytest.approx(sum(r["wall_s"] for r in rows[1:4]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cpu"], "needs one; pass --tiny"),
        (["--tiny", "--stages", "sr512"], "unknown stage(s) sr512"),
        (["--tiny", "--budget-s", "0"], "--budget-s must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], message: str, tmp_path) -> None:
    done = run_script("gpu_check.py", *args, "--out", str(tmp_path), cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and message in done.stderr and "Traceback" not in done.stderr


def test_cpu_features_agree_with_torch() -> None:
    features = cpu_features()
    assert native_bf16(torch.device("cpu")) == (features["amx"] or features["avx512_bf16"])
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert features["avx512"] and features["avx2"]
    line = describe_cpu(features)
    for key, label in (("amx", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512", "AVX-512"), ("avx2", "AVX2")):
        assert (f"no {label}" in line) != features[key]


def test_hard_time_limit_cuts_a_section_and_keeps_the_report() -> None:
    """The script's alarm raises TimeUp inside whatever runs; here the first section's log line does."""

    def alarm(line: str) -> None:
        raise gpu_check.TimeUp

    report = gpu_check.run_gpu_check("tiny", torch.device("cpu"), budget_s=600, stages=("classifier",), log=alarm)
    assert report.correctness == [] and report.skipped[-1]["what"] == "the rest of the check"
    assert report.skipped[-1]["reason"].startswith("hard time limit")
