"""Reliability (issue #8): exact resume after SIGKILL, preemption, verified checkpoints, bad data, non-finite steps, bad input.

Most tests drive ``Trainer.fit`` in-process with a one-layer stage (milliseconds a step);
the end-to-end ones run ``scripts/train_stage.py`` in a subprocess and kill it for real.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cascade.data import ImageFolderDataset
from cascade.data.order import SeededItems, StepBatchSampler
from cascade.training.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    load_latest,
    payload_digest,
    prune_checkpoints,
    remove_temporaries,
    save_checkpoint,
)
from cascade.training.faults import TrainingDiverged
from cascade.training.trainer import ReportContext, Trainer, lr_factor
from tests.helpers import ROOT, run_script

# --- a one-layer stage for in-process runs -----------------------------------------------------------


class Noise(Dataset):
    """16 fixed random 4×4 images of 2 classes, plus a flip drawn from torch's global RNG (like the real data sets)."""

    class_names = ["a", "b"]

    def __init__(self) -> None:
        self.images = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # (N, 3, 4, 4)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        return (image.flip(-1) if torch.rand(()) < 0.5 else image), index % 2


class TinyStage:
    """Denoise with one 1×1 convolution; ``poison`` maps 1-based step → "loss" or "grad" to inject a NaN there."""

    name, resolution = "tiny", 4

    def __init__(self, poison: dict[int, str] | None = None) -> None:
        self.poison, self.calls = poison or {}, 0

    def build(self, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5))  # dropout: global RNG must resume too

    def loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        noise = torch.randn(images.shape, generator=generator)  # (B, 3, 4, 4)
        loss = (net(images + noise) - images).pow(2).mean((1, 2, 3))  # (B,)
        weight = net[0].weight  # (3, 3, 1, 1)
        kind = self.poison.get(self.calls)
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":  # finite value, non-finite gradient: d/dw sqrt(|0·w|) = 0·∞
            loss = loss + (weight * 0).abs().sum().sqrt()
        return loss


def report(net: nn.Module, context: ReportContext) -> dict[str, float]:
    torch.rand(100)  # a report drawing from the global RNG must not shift training
    return {}


def fit(run_dir: Path, *, steps: int, stage: TinyStage | None = None, dataset: Dataset | None = None, **trainer: object) -> dict:
    options = dict(
        max_steps=steps,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        ckpt_every=2,
        sample_every=3,
        log_every=1,
        num_workers=0,
        progress=False,
        bf16=False,
    )
    torch.manual_seed(0)  # what train_stage.py does before building: initial weights
    return Trainer(**{**options, **trainer}).fit(
        stage or TinyStage(), dataset or Noise(), run_dir=run_dir, config={}, seed=3, reporter=report
    )


def assert_same_state(a: Path, b: Path, context: str = "") -> None:
    """Model, EMA and optimizer state of two checkpoints are bit-identical."""
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x["step"] == y["step"], context
    for key in ["model", "ema"]:
        assert x[key].keys() == y[key].keys(), context
        for name in x[key]:
            assert torch.equal(x[key][name], y[key][name]), f"{key}.{name} differs; {context}"
    assert x["optimizer"]["param_groups"] == y["optimizer"]["param_groups"], context
    for p, state in x["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, y["optimizer"]["state"][p][name]), f"optimizer {p}.{name} differs; {context}"
    assert x["lr_scheduler"] == y["lr_scheduler"], context


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# --- exact resume ------------------------------------------------------------------------------------


def test_resume_in_process_is_bit_identical_whatever_the_stop_step(tmp_path):
    fit(tmp_path / "whole", steps=7)
    for stop in [1, 2, 5]:  # before the first checkpoint, at one, between two
        run = tmp_path / f"split{stop}"
        fit(run, steps=stop, ckpt_every=100)  # ends with a checkpoint at `stop`
        fit(run, steps=7)
        assert_same_state(tmp_path / "whole" / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
        assert [r["loss"] for r in metrics(run) if "loss" in r] == [r["loss"] for r in metrics(tmp_path / "whole") if "loss" in r]


def test_items_are_a_pure_function_of_seed_epoch_and_index():
    seeded = SeededItems(Noise(), seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = [seeded[(i, e)][0] for e in range(3) for i in range(16)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    again = [seeded[(i, e)][0] for e in range(3) for i in range(16)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    flips = [not torch.equal(seeded[(0, e)][0], Noise().images[0]) for e in range(40)]
    assert 0 < sum(flips) < 40  # the flip still varies from epoch to epoch

    # Same batches with and without a loader worker process.
    sampler = StepBatchSampler(16, 4, seed=1, start_step=3)
    batches = [next(iter(DataLoader(seeded, batch_sampler=sampler, num_workers=w)))[0] for w in (0, 1)]
    assert torch.equal(*batches)
    # The sampler resumed at step s yields the batches an uninterrupted one yields from s on.
    whole, resumed = iter(StepBatchSampler(16, 4, seed=1)), iter(StepBatchSampler(16, 4, seed=1, start_step=6))
    assert [next(whole) for _ in range(10)][6:] == [next(resumed) for _ in range(4)]


# --- preemption --------------------------------------------------------------------------------------


class Preempted(TinyStage):
    def __init__(self, at: int, signum: int) -> None:
        super().__init__()
        self.at, self.signum = at, signum

    def loss(self, *args: object, **kwargs: object) -> torch.Tensor:
        loss = super().loss(*args, **kwargs)
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)  # arrives mid-step, as a scheduler's signal would
        return loss


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_returns(tmp_path, signum, capsys):
    previous = signal.getsignal(signum)
    result = fit(tmp_path, steps=50, stage=Preempted(at=3, signum=signum), ckpt_every=100)
    assert result["stopped_by"] == signal.Signals(signum).name and result["step"] == 3
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
    assert signal.getsignal(signum) is previous  # handlers restored
    assert "saving a checkpoint after this step" in capsys.readouterr().err


# --- verified checkpoints ----------------------------------------------------------------------------


def test_digest_catches_a_flipped_bit_that_torch_load_accepts(tmp_path):
    values = torch.arange(1000, dtype=torch.float32)
    path = save_checkpoint({"config": {}, "model": {"w": values}, "step": 1}, tmp_path / "c.pt")
    raw = bytearray(path.read_bytes())
    at = raw.find(values.numpy().tobytes()) + 2001
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))
    tampered = torch.load(path, weights_only=True)  # the container does not notice …
    assert not torch.equal(tampered["model"]["w"], values)
    with pytest.raises(CheckpointError, match="sha256"):  # … the digest does
        load_checkpoint(path)


def test_digest_is_canonical_and_refuses_foreign_objects():
    a = {"x": torch.ones(2, dtype=torch.bfloat16), "n": [1, 2.5, None, True, "s"], "s": torch.tensor(3)}
    assert payload_digest(a) == payload_digest({**a, "sha256": "ignored"})
    assert payload_digest(a) != payload_digest({**a, "n": [1, 2.5, None, False, "s"]})
    assert payload_digest(a) != payload_digest({**a, "x": torch.ones(1, 2, dtype=torch.bfloat16)})  # shape counts
    with pytest.raises(TypeError, match="Path"):
        payload_digest({"p": Path(".")})


def test_truncated_last_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    fit(run, steps=6)  # checkpoints 2, 4, 6 and last.pt (6)
    ckpts = run / "checkpoints"
    last = (ckpts / "last.pt").read_bytes()
    (ckpts / "last.pt").write_bytes(last[: len(last) // 2])  # truncated
    (ckpts / "step_0000006.pt").write_bytes(b"garbage")
    (ckpts / ".last.pt.abc123.tmp").write_bytes(b"left by a kill mid-write")
    fit(run, steps=7)
    err = capsys.readouterr()
    assert "last.pt cannot be read" in err.err and "step_0000006.pt cannot be read" in err.err
    assert err.err.count("falling back to step_0000004.pt (step 4)") == 2 and "at step 4" in err.out
    assert not (ckpts / ".last.pt.abc123.tmp").exists()
    assert max(r["step"] for r in metrics(run)) == 7 and [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 8))
    fit(tmp_path / "whole", steps=7)
    assert_same_state(tmp_path / "whole" / "checkpoints" / "last.pt", ckpts / "last.pt")


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"\x00" * 100)
    (tmp_path / "step_0000002.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_latest(tmp_path)
    assert load_latest(tmp_path / "empty") is None


def test_keep_n_pruning_and_temporaries(tmp_path):
    for step in [1, 2, 3, 10]:
        save_checkpoint({"config": {}, "step": step}, tmp_path / f"step_{step:07d}.pt")
    (tmp_path / ".step_0000011.pt.x1.tmp").write_bytes(b"")
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_0000003.pt", "step_0000010.pt"]
    assert [p.name for p in remove_temporaries(tmp_path)] == [".step_0000011.pt.x1.tmp"]


# --- bad data ----------------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (24, 20), color=(80 * i, 100 + 50 * c, 30)).save(root / name / f"{i}.jpg")
    good = io.BytesIO()
    Image.new("RGB", (24, 24), color=(1, 2, 3)).save(good, format="JPEG")
    (root / "cat" / "1a_truncated.jpg").write_bytes(good.getvalue()[:200])
    (root / "dog" / "1a_garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    Image.new("RGB", (10, 30), color=(9, 9, 9)).save(root / "dog" / "2a_small.png")


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    make_tree(tmp_path)
    data = ImageFolderDataset(root=str(tmp_path), resolution=16, flip=False)
    paths = [Path(p).name for p, _ in data._folder.samples]
    bad = paths.index("1a_truncated.jpg")
    items = [data[i] for i in range(len(data))]
    assert data.fault_counts() == {"skipped_unreadable": 2, "skipped_small": 0, "upscaled_small": 1}
    assert torch.equal(items[bad][0], items[bad + 1][0]) and items[bad][1] == items[bad + 1][1]  # the next readable one
    assert capsys.readouterr().err.count("skipping unreadable image") == 2  # once per file
    [data[bad] for _ in range(3)]
    assert capsys.readouterr().err == ""

    strict = ImageFolderDataset(root=str(tmp_path), resolution=16, flip=False, small_images="skip")
    for batch in DataLoader(strict, batch_size=len(strict), num_workers=1):  # counted in a worker process
        assert batch[0].shape == (len(strict), 3, 16, 16)
    assert strict.fault_counts() == {"skipped_unreadable": 2, "skipped_small": 1, "upscaled_small": 0}


def test_trainer_logs_the_skip_count(tmp_path):
    make_tree(tmp_path / "data")
    data = ImageFolderDataset(root=str(tmp_path / "data"), resolution=4)
    fit(tmp_path / "run", steps=4, dataset=data)  # 9 files, batch 4: every file met by step 4
    assert metrics(tmp_path / "run")[-1]["skipped_unreadable"] == 2


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no class folders"),
        ({"a.png": 1, "cat/b.png": 1}, "lie directly in"),
        ({"train/cat/a.png": 1, "train/dog/b.png": 1}, "single folder 'train' whose images are all in sub-folders"),
        ({"cat/a.png": 1, "dog/notes.txt": 1}, "no images"),
    ],
)
def test_empty_or_mislabelled_folder_is_one_clear_error(tmp_path, layout, message):
    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            Image.new("RGB", (8, 8)).save(tmp_path / rel)
        else:
            (tmp_path / rel).write_text("x")
    with pytest.raises(ValueError, match=message) as info:
        ImageFolderDataset(root=str(tmp_path), resolution=8)
    assert "\n" not in str(info.value)


# --- numerical faults --------------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_counted(tmp_path, capsys):
    stage = TinyStage(poison={2: "loss", 3: "grad", 5: "loss"})
    fit(tmp_path, steps=6, stage=stage, max_nonfinite_steps=3)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 6 and state["trainer"]["nonfinite"] == {"total": 3, "in_a_row": 0}
    assert all(int(s["step"]) == 3 for s in state["optimizer"]["state"].values())  # 6 steps, 3 applied
    assert all(torch.isfinite(v).all() for v in [*state["model"].values(), *state["ema"].values()])
    rows = metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in rows if "nonfinite_steps" in r] == [0, 1, 2, 2, 3, 3]
    assert [r["step"] for r in rows if "loss" in r] == [1, 4, 6]  # windows of only skipped steps log no loss
    assert "step 3: non-finite loss" in capsys.readouterr().out


def test_too_many_non_finite_steps_in_a_row_stop_the_run_and_keep_the_checkpoint(tmp_path):
    stage = TinyStage(poison={k: "loss" for k in range(4, 100)})
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row up to step 6.*last.pt \(step 4\)"):
        fit(tmp_path, steps=20, stage=stage, max_nonfinite_steps=3, ckpt_every=2)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


# --- end to end: the real script, killed for real ----------------------------------------------------

# The tiny preset shrunk further: a 0.1M-parameter U-Net at 16px, dropout on (the global RNG must resume too).
E2E = [
    "stage=base",
    "preset=tiny",
    "device=cpu",
    "trainer.progress=false",
    "trainer.max_steps=10",
    "trainer.batch_size=4",
    "trainer.ckpt_every=3",
    "trainer.log_every=1",
    "trainer.sample_every=1000",
    "trainer.num_workers=1",
    "data.train.size=64",
    "data.val.size=4",
    "stage.resolution=16",
    "stage.net.model_channels=8",
    "stage.net.channel_mult=[1,2]",
    "stage.net.attention_resolutions=[8]",
    "stage.net.head_channels=8",
    "+stage.net.norm_groups=4",
    "stage.net.dropout=0.1",
    "preview.steps=1",
    "preview.per_class=1",
    "preview.max_classes=1",
]


def start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train_stage.py"), *E2E, f"run_dir={run_dir}"],
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> int:
    """Poll metrics.jsonl until it reaches ``step`` (or the process ends); returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = max((r["step"] for r in metrics(run_dir)), default=0)
        if seen >= step or proc.poll() is not None:
            return seen
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"no step {step} within {timeout} s")


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_sigterm_then_resume_is_bit_identical(tmp_path):
    whole = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_stage.py"), *E2E, f"run_dir={tmp_path / 'whole'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]

    run = tmp_path / "run"
    kill_at = random.Random().randint(1, 5)
    proc = start(run)
    seen = wait_for_step(proc, run, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"kill at step {seen} (aimed at {kill_at})"

    proc = start(run)  # resumes, then is preempted
    wait_for_step(proc, run, max(seen, 1) + 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out, out
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")["step"]

    proc = start(run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert f"at step {stopped}" in out or stopped == 10, out
    context = f"killed at step {seen}, SIGTERM at step {stopped}"
    assert_same_state(tmp_path / "whole" / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt", context)
    losses = lambda d: [(r["step"], r["loss"]) for r in metrics(d) if "loss" in r]  # noqa: E731
    assert losses(run) == losses(tmp_path / "whole"), context


# --- bad input to scripts ----------------------------------------------------------------------------


def one_line_exit_2(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("max_steps", "trainer.max_steps and trainer.batch_size must be >= 1"),
        ("no_root", "missing config value data.train.root"),
        ("empty_root", "no class folders"),
        ("other_stage", "belongs to stage 'classifier', not 'base'"),
        ("all_corrupt", "no intact checkpoint"),
    ],
)
def test_train_stage_bad_input_is_one_line_and_exit_code_2(tmp_path, case, message):
    run = tmp_path / "run"
    args = {
        "max_steps": ["trainer.max_steps=0"],
        "no_root": ["data=imagefolder"],
        "empty_root": ["data=imagefolder", f"data.root={tmp_path / 'data'}"],
    }.get(case, [])
    (tmp_path / "data").mkdir()
    if case == "other_stage":
        save_checkpoint({"stage": "classifier", "config": {}, "step": 5}, run / "checkpoints" / "last.pt")
    if case == "all_corrupt":
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    if case in ("other_stage", "all_corrupt"):  # these fail after the network is built: keep it small
        args = ["preset=tiny", "trainer.num_workers=0"]
    result = run_script("train_stage.py", "stage=base", "device=cpu", f"run_dir={run}", *args, cwd=tmp_path)
    one_line_exit_2(result, message)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "steps must be >= 1"),
        (["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
        (["--aug-level", "100000"], "aug_level must be in 0.."),
        (["--ckpt", "BASE"], "not an upsampler"),
        (["--ckpt", "CORRUPT"], "cannot be read"),
    ],
)
def test_super_resolve_bad_input_is_one_line_and_exit_code_2(smoke_runs, tmp_path, run_main, args, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    where = {"BASE": str(smoke_runs / "base" / "checkpoints" / "last.pt"), "CORRUPT": str(tmp_path / "corrupt.pt")}
    args = [where.get(a, a) for a in args]
    ckpt = [] if "--ckpt" in args else ["--ckpt", str(smoke_runs / "sr256" / "checkpoints" / "last.pt")]
    result = run_main("super_resolve.py", "--device", "cpu", "--input", "in.png", *ckpt, *args, cwd=tmp_path)
    one_line_exit_2(result, message)


# --- learning-rate schedule --------------------------------------------------------------------------


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decays_after_warmup_to_near_zero_at_the_last_step(tmp_path, decay):
    factors = [lr_factor(k, warmup_steps=3, max_steps=12, decay=decay) for k in range(12)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warm-up
    assert all(a > b > 0 for a, b in zip(factors[2:], factors[3:]))  # then strictly down, never 0 while training
    assert factors[-1] < 0.1
    if decay == "cosine":  # half-way through the decay: half the peak
        assert lr_factor(3 + 4, warmup_steps=3, max_steps=12, decay=decay) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * 5 / 10))
        )
    fit(tmp_path / "whole", steps=12, warmup_steps=3, lr_decay=decay)
    logged = [r["lr"] for r in metrics(tmp_path / "whole") if "lr" in r]  # after each step: the rate of the next update
    assert logged[:-1] == pytest.approx([1e-2 * f for f in factors[1:]])


def test_unknown_lr_decay_is_refused():
    with pytest.raises(ValueError, match="lr_decay must be none, cosine or linear"):
        Trainer(lr_decay="exponential")
