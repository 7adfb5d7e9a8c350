"""The orchestrator and scripts/cascade_sample.py: chain validation, the CLI end to end, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade.diffusion.schedules import linear_schedule
from cascade.pipeline.orchestrator import (
    IMAGE_SEED_STRIDE,
    Cascade,
    ChainError,
    StageSettings,
    check_chain,
    image_seed,
    stage_seed,
)
from cascade.training.checkpoint import load_checkpoint, open_stage
from cascade.utils.device import bf16_autocast
from tests.helpers import run_script

CPU = torch.device("cpu")


def ckpt(runs: Path, stage: str) -> Path:
    return runs / stage / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def loaded(smoke_runs):
    """Every smoke stage rebuilt from its checkpoint (fresh objects per test: tests mutate them)."""
    return lambda stage: open_stage(ckpt(smoke_runs, stage), CPU)


# --- chain validation -------------------------------------------------------------------------------


def test_a_matching_chain_passes(loaded):
    check_chain(loaded("base"), loaded("classifier"), [loaded("sr256"), loaded("sr1024")])
    check_chain(loaded("base"), None, [])


def test_wrong_kind_of_checkpoint_in_a_slot_is_named(loaded):
    with pytest.raises(ChainError, match="is a 'classifier' checkpoint, not a base stage"):
        check_chain(loaded("classifier"), None, [])
    with pytest.raises(ChainError, match="is a 'sr256' checkpoint, not a noisy classifier"):
        check_chain(loaded("base"), loaded("sr256"), [])
    with pytest.raises(ChainError, match="is a 'base' checkpoint, not an upsampler"):
        check_chain(loaded("base"), None, [loaded("base")])


def test_resolution_mismatch_is_named(loaded):
    with pytest.raises(ChainError, match="sr1024 upsamples 256px images but base makes 64px ones"):
        check_chain(loaded("base"), None, [loaded("sr1024")])
    with pytest.raises(ChainError, match="sr256 upsamples 64px images but sr1024 makes 1024px ones"):
        check_chain(loaded("base"), None, [loaded("sr256"), loaded("sr1024"), loaded("sr256")])


def test_class_set_mismatch_is_named(loaded):
    other = loaded("sr256")
    other.payload["class_names"] = [f"class {i}" for i in range(10)]
    with pytest.raises(ChainError, match=r"sr256 was trained on 10 classes that differ .* class 0 is 'class 0'"):
        check_chain(loaded("base"), None, [other])
    unconditional = loaded("sr256")
    unconditional.payload["class_names"] = ["a", "b"]
    unconditional.stage.class_conditional = False  # a class-free upsampler may come from any data set
    check_chain(loaded("base"), None, [unconditional])
    clf = loaded("classifier")
    clf.payload["class_names"] = clf.payload["class_names"][:5]
    with pytest.raises(ChainError, match="the classifier's 5 classes differ from the base's 10"):
        check_chain(loaded("base"), clf, [])


def test_classifier_on_another_schedule_or_resolution_is_named(loaded):
    clf = loaded("classifier")
    clf.stage.schedule = linear_schedule(1000)
    clf.stage.resolution = 32
    with pytest.raises(ChainError) as error:
        check_chain(loaded("base"), clf, [])
    message = str(error.value)
    assert "another noise schedule" in message and "sees 32px images but the base makes 64px" in message
    assert message.count("\n") == 0  # every problem, on one line


def test_settings_that_cannot_run_are_refused(loaded):
    cascade = Cascade(loaded("base"), [loaded("sr256")], None)
    good = [StageSettings(steps=2), StageSettings(steps=2)]
    cascade.check(good)
    for bad, match in [
        ([StageSettings(steps=0), StageSettings()], "steps must be >= 1"),
        ([StageSettings(cfg_scale=-1), StageSettings()], "guidance scales must be >= 0"),
        ([StageSettings(classifier_scale=1), StageSettings()], "needs a noisy classifier"),
        ([StageSettings(), StageSettings(aug_level=10_000)], "aug level must be in 0..500"),
        ([StageSettings(), StageSettings(sampler="euler")], "unknown sampler"),
        ([StageSettings(guide_scale=2), StageSettings()], "needs a guide network"),
    ]:
        with pytest.raises(ValueError, match=match):
            cascade.check(bad)


def test_the_guide_must_be_a_checkpoint_of_the_same_generator(loaded):
    check_chain(loaded("base"), None, [], guide=loaded("base"))
    with pytest.raises(ChainError, match="the guide .* is a 'sr256' checkpoint .* autoguidance needs an earlier checkpoint"):
        check_chain(loaded("base"), None, [], guide=loaded("sr256"))
    other = loaded("base")
    other.stage.schedule = linear_schedule(1000)
    with pytest.raises(ChainError, match="the guide .* another noise schedule"):
        check_chain(loaded("base"), None, [], guide=other)
    guided = Cascade(loaded("base"), [], None, guide=loaded("base"))
    with pytest.raises(ValueError, match="autoguidance scale must be >= 0"):
        guided.check([StageSettings(guide_scale=-1)])


def test_autoguidance_by_the_model_itself_changes_nothing_and_a_weaker_guide_does(loaded):
    # ε̃ = ε_guide + w (ε − ε_guide) is ε exactly when the guide is the model (Karras et al. 2024, eq. 1), whatever w.
    labels = torch.tensor([0, 5])
    plain = Cascade(loaded("base"), [], None).sample(labels, [StageSettings(steps=3)], seed=2, progress=False)[0]
    guided = StageSettings(steps=3, guide_scale=2.5)
    itself = Cascade(loaded("base"), [], None, guide=loaded("base")).sample(labels, [guided], seed=2, progress=False)[0]
    assert torch.equal(plain, itself)
    weaker = loaded("base")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in weaker.net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))  # another model of the same stage
    steered = Cascade(loaded("base"), [], None, guide=weaker).sample(labels, [guided], seed=2, progress=False)[0]
    assert (steered - plain).abs().max() > 1e-3


def test_stage_outputs_do_not_depend_on_later_stages_or_batching(loaded):
    """Each image draws from its own generators: the images are the same with or without the upsampler and whatever
    the batch sizes of either stage. Bit-identical for the same batch size; across batch sizes oneDNN may pick other
    convolution algorithms (another summation order), so there they agree to float32 rounding, far below the O(1)
    difference that another noise draw makes."""
    labels = torch.tensor([0, 1, 2])
    short = Cascade(loaded("base"), [], None).sample(labels, [StageSettings(steps=2)], seed=3, progress=False)
    cascade = Cascade(loaded("base"), [loaded("sr256")], None)
    runs = [
        cascade.sample(
            labels,
            [StageSettings(steps=2, batch_size=b0), StageSettings(steps=2, batch_size=b1, aug_level=10)],
            seed=3,
            progress=False,
        )
        for b0, b1 in [(3, 3), (1, 2), (2, 1)]
    ]
    assert torch.equal(short[0], runs[0][0])
    again = cascade.sample(
        labels, [StageSettings(steps=2, batch_size=3), StageSettings(steps=2, batch_size=3, aug_level=10)], seed=3, progress=False
    )
    assert torch.equal(runs[0][0], again[0]) and torch.equal(runs[0][1], again[1])
    for other in runs[1:]:
        for stage in (0, 1):
            assert (runs[0][stage] - other[stage]).abs().max() <= 1e-4, (stage, (runs[0][stage] - other[stage]).abs().max())
    assert runs[0][1].shape == (3, 3, 256, 256) and runs[0][1].abs().max() <= 1
    assert not torch.equal(runs[0][0][0], runs[0][0][1])  # every image its own noise


def test_an_image_range_sampled_on_its_own_equals_that_range_of_a_larger_run(loaded):
    """Sharded sampling: images first_index … of a run are a function of (seed, stage, global index) alone. The range
    starts on a sub-batch boundary, so its images are computed in the same batches (bit-identity across batch
    compositions is not promised: oneDNN picks convolution algorithms per batch shape; see the batching test)."""
    labels = torch.tensor([0, 1, 2, 3])
    settings = [StageSettings(steps=2, batch_size=2), StageSettings(steps=2, batch_size=2, aug_level=10)]
    cascade = Cascade(loaded("base"), [loaded("sr256")], None)
    whole = cascade.sample(labels, settings, seed=5, progress=False)
    part = cascade.sample(labels[2:], settings, seed=5, first_index=2, progress=False)
    assert torch.equal(whole[0][2:], part[0]) and torch.equal(whole[1][2:], part[1])


def test_image_zero_is_what_the_per_batch_generators_gave(loaded):
    """A one-image run (the demo's) samples exactly as before per-image seeds: batch 0 of stage j had one
    ``torch.Generator`` seeded with (seed·1000003 + j·10007 + 0) mod 2^63 for x_T, the augmentation noise and the sampler."""
    base, sr = loaded("base"), loaded("sr256")
    label = torch.tensor([2])
    settings = [StageSettings(sampler="ddpm", steps=3), StageSettings(sampler="ddpm", steps=2, aug_level=10)]
    new = Cascade(base, [sr], None).sample(label, settings, seed=7, progress=False)
    old_generator = lambda j: torch.Generator().manual_seed((7 * 1_000_003 + j * 10_007 + 0) % 2**63)  # noqa: E731
    with bf16_autocast(CPU, True):
        old_base = base.stage.sample(base.net, label, sampler="ddpm", steps=3, generator=old_generator(0), progress=False)
        old_base = old_base.float().cpu()
        old_sr = (
            sr.stage.sample(
                sr.net, old_base, label, aug_level=10, sampler="ddpm", steps=2, generator=old_generator(1), progress=False
            )
            .float()
            .cpu()
        )
    assert torch.equal(new[0], old_base) and torch.equal(new[1], old_sr)


def test_image_seeds_do_not_repeat_across_stages():
    """Seeds i·K apart within a stage never collide (K odd); across stages j, j' they would only for index gaps
    Δi ≡ 10007·Δj·K⁻¹ (mod 2^63), none of which is below 10^9 for Δj up to 16."""
    inverse = pow(IMAGE_SEED_STRIDE, -1, 2**63)
    for dj in range(1, 17):
        gap = (10_007 * dj * inverse) % 2**63
        assert min(gap, 2**63 - gap) > 10**9
    assert image_seed(4, 1, 0) == stage_seed(4, 1, 0)


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(smoke_runs, tmp_path_factory) -> Path:
    """A folder whose runs/ holds the smoke checkpoints, so cascade_sample.py finds them at their default paths."""
    root = tmp_path_factory.mktemp("cascade_cli")
    (root / "runs").symlink_to(smoke_runs, target_is_directory=True)
    return root


def sample(cwd: Path, *args: str):
    return run_script("cascade_sample.py", "--device", "cpu", "--base-steps", "2", "--sr256-steps", "2", *args, cwd=cwd)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_cli_runs_all_three_stages_and_records_everything(workdir):
    result = sample(workdir, "--class", "red disc with stripes", "--num", "1", "--sr1024-steps", "1", "--out", "full")
    assert result.returncode == 0, result.stderr[-2000:]
    out = workdir / "full"
    for name, size in [("000_64px.png", 64), ("000_256px.png", 256), ("000_1024px.png", 1024)]:
        assert Image.open(out / name).size == (size, size)
    assert Image.open(out / "000_strip.png").size == (3 * 512, 512)
    record = json.loads((out / "cascade.json").read_text())
    assert record["class"] == {"index": 0, "name": "red disc with stripes"} and record["seed"] == 0
    assert [s["name"] for s in record["stages"]] == ["base", "sr256", "sr1024"]
    assert [s["steps"] for s in record["stages"]] == [2, 2, 1]
    assert record["stages"][0]["classifier_scale"] == 1.0 and record["classifier"]["stage"] == "classifier"
    sr256_level = load_checkpoint(workdir / "runs" / "sr256" / "checkpoints" / "last.pt")["config"]["stage"]["sample_aug_level"]
    assert record["stages"][1]["aug_level"] == sr256_level and len(record["stages"][2]["sha256"]) == 64
    assert record["stages"][1]["aug_level_source"] == "the checkpoint's sample_aug_level"
    assert "sr1024 1024px" in result.stderr  # one progress bar per stage


@pytest.mark.slow
def test_same_command_twice_and_replay_give_identical_images(workdir):
    args = ["--class", "3", "--num", "2", "--seed", "7", "--stop-at", "256", "--guidance-scale", "2"]
    first, second = sample(workdir, *args, "--out", "a"), sample(workdir, *args, "--out", "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    replay = run_script("cascade_sample.py", "--replay", "a/cascade.json", "--out", "c", cwd=workdir)
    assert replay.returncode == 0, replay.stderr[-2000:]
    for name in ["000_64px.png", "001_64px.png", "000_256px.png", "001_256px.png"]:
        assert np.array_equal(pixels(workdir / "a" / name), pixels(workdir / "b" / name))
        assert np.array_equal(pixels(workdir / "a" / name), pixels(workdir / "c" / name))
    assert not (workdir / "a" / "000_1024px.png").exists()
    other_seed = sample(workdir, *args[:-4], "--seed", "8", "--stop-at", "64", "--out", "d")
    assert other_seed.returncode == 0
    assert not np.array_equal(pixels(workdir / "a" / "000_64px.png"), pixels(workdir / "d" / "000_64px.png"))


@pytest.mark.slow
def test_autoguidance_from_the_command_line_is_recorded_and_replayed(workdir):
    guide = "runs/base/checkpoints/last.pt"
    args = ["--class", "5", "--num", "1", "--stop-at", "64", "--guide-ckpt", guide, "--guide-scale", "2", "--out", "g"]
    result = sample(workdir, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"autoguidance w=2 by {guide}" in result.stdout
    record = json.loads((workdir / "g" / "cascade.json").read_text())
    assert record["stages"][0]["guide_scale"] == 2.0
    assert record["guide"]["path"] == guide and len(record["guide"]["sha256"]) == 64
    replay = run_script("cascade_sample.py", "--replay", "g/cascade.json", "--out", "g2", cwd=workdir)
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert np.array_equal(pixels(workdir / "g" / "000_64px.png"), pixels(workdir / "g2" / "000_64px.png"))
    assert json.loads((workdir / "g2" / "cascade.json").read_text())["guide"] == record["guide"]


@pytest.mark.slow
def test_cascade_stops_early_when_later_stages_are_absent(smoke_runs, tmp_path):
    (tmp_path / "runs").mkdir()
    for stage in ["base", "classifier"]:
        (tmp_path / "runs" / stage).symlink_to(smoke_runs / stage, target_is_directory=True)
    result = sample(tmp_path, "--class", "1", "--num", "1", "--out", "o")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no sr256 checkpoint at runs/sr256/checkpoints/last.pt: the cascade stops at 64px" in result.stdout
    assert (tmp_path / "o" / "000_64px.png").is_file() and not (tmp_path / "o" / "000_256px.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class", "golden retriever"], "unknown class 'golden retriever'"),
        (["--class", "10"], "class index 10 is out of range: valid indices are 0..9"),
        (["--class", "-1"], "out of range"),
        (["--class", "1", "--base-steps", "0"], "steps must be >= 1"),
        (["--class", "1", "--guidance-scale", "-1"], "guidance scales must be >= 0"),
        (["--class", "1", "--sr256-aug-level", "999"], "aug level must be in 0..500"),
        (["--class", "1", "--sr256-ckpt", "nope.pt"], "sr256 checkpoint nope.pt does not exist"),
        (["--class", "1", "--base-ckpt", "runs/classifier/checkpoints/last.pt"], "not a base stage"),
        (
            ["--class", "1", "--sr256-ckpt", "runs/sr1024/checkpoints/last.pt"],
            "sr1024 upsamples 256px images but base makes 64px",
        ),
        (["--num", "1"], "give the class to sample"),
        (["--class", "1", "--guide-scale", "2"], "needs a guide network, but no guide checkpoint was given"),
        (["--class", "1", "--guide-scale", "2", "--guide-ckpt", "nope.pt"], "needs a guide network, but nope.pt does not exist"),
        (
            ["--class", "1", "--guide-scale", "2", "--guide-ckpt", "runs/sr256/checkpoints/last.pt"],
            "autoguidance needs an earlier checkpoint",
        ),
        (["--class", "1", "--sampler-typo"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(workdir, run_main, args, message):
    common = ["--device", "cpu", "--base-steps", "2", "--sr256-steps", "2", "--stop-at", "256"]
    result = run_main("cascade_sample.py", *common, *args, cwd=workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
