"""Data parallelism and gradient accumulation: the same global batch gives the same weights.

* The sampler's global batch of a step is the same examples in the same order for any
  number of ranks, split into disjoint blocks.
* Accumulating micro-batch gradients gives exactly the gradient of the batch mean.
* End to end: ``torchrun --nproc_per_node 2`` (gloo, CPU) of the real training script,
  stopped after one step and resumed for a second, ends on the weights of a one-process
  run of the same global batch (accumulating two micro-batches), and each rank read
  different examples.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data import ShapesDataset
from cascade.data.order import StepBatchSampler
from cascade.nn import UNet
from cascade.training.checkpoint import load_checkpoint
from cascade.training.trainer import accumulate_gradients, micro_batch_seed
from tests.helpers import ROOT, SMOKE, STAGE_SMOKE, TORCHRUN_2, run_python


class RecordingShapes(ShapesDataset):
    """The built-in data set, logging every index it serves to ``log_dir/rank<RANK>.txt`` (one per line)."""

    def __init__(self, *, log_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log_dir = Path(log_dir)

    def __getitem__(self, index: int):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
            f.write(f"{index}\n")
        return super().__getitem__(index)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sampler_splits_the_same_global_batch_into_disjoint_blocks(world_size: int) -> None:
    per_rank, steps = 8 // world_size, 9  # 20 items, global batch 8: two batches per epoch, so steps cross epochs
    single = iter(StepBatchSampler(20, 8, seed=5, start_step=1))
    ranks = [iter(StepBatchSampler(20, per_rank, seed=5, start_step=1, rank=r, world_size=world_size)) for r in range(world_size)]
    for _ in range(steps):
        parts = [next(it) for it in ranks]
        assert sum(parts, []) == next(single)  # rank r holds the r-th block of the global batch
        seen = [i for part in parts for i, _ in part]
        assert len(set(seen)) == len(seen) == 8  # disjoint


class _RegressionStage:
    """A stage without randomness: per-example MSE of the network's output at t = 500 against the image."""

    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        out = net(images, torch.full((images.shape[0],), 500), class_labels=labels)  # (B, 3, H, W)
        return F.mse_loss(out, images, reduction="none").mean(dim=(1, 2, 3))  # (B,)


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    net = UNet(
        resolution=16,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=32,
        dropout=0.0,
        num_classes=4,
    )
    for m in net.modules():  # the zero-initialised output convs would make most gradients vanish
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not m.weight.any():
            m.reset_parameters()
    return net


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_accumulated_gradient_is_the_batch_mean_gradient(micro: int) -> None:
    net = _tiny_unet()
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    stage = _RegressionStage()

    full = stage.loss(net, images, labels, torch.Generator())
    expected = torch.autograd.grad(full.mean(), list(net.parameters()))

    net.zero_grad(set_to_none=True)
    mean = accumulate_gradients(
        stage, net, images, labels, micro_batch_size=micro, generator=torch.Generator(), seed=0, step=0, first_chunk=0
    )
    assert mean == pytest.approx(full.mean().item(), rel=1e-6)
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_micro_batch_randomness_is_keyed_by_seed_step_and_chunk() -> None:
    """The noise a micro-batch draws depends on (seed, step, global chunk) only, and the global generator is left as it was."""

    class NoiseStage:
        def __init__(self) -> None:
            self.draws: list[Tensor] = []

        def loss(self, net, images, labels, generator):
            self.draws.append(torch.randn(images.shape[0], generator=generator))
            self.draws.append(torch.rand(images.shape[0]))  # what dropout would draw: torch's global generator
            return (net(images) * 0).sum(dim=1)  # (B,), a graph to run backward on

    net = nn.Linear(3, 1)
    images, labels = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    before = torch.get_rng_state()
    a, b = NoiseStage(), NoiseStage()
    accumulate_gradients(a, net, images, labels, micro_batch_size=2, generator=torch.Generator(), seed=3, step=7, first_chunk=0)
    # Rank 1 of two, holding chunk 1 of the same step: its draws are the second micro-batch's above.
    accumulate_gradients(
        b, net, images[2:], labels[2:], micro_batch_size=2, generator=torch.Generator(), seed=3, step=7, first_chunk=1
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.draws[2:], b.draws))
    assert not torch.equal(a.draws[0], a.draws[2])  # chunks differ
    assert len({micro_batch_seed(s, t, c) for s in range(3) for t in range(3) for c in range(3)}) == 27


def _train_command(run_dir: Path, log_dir: Path, max_steps: int) -> list[str]:
    return [
        str(ROOT / "scripts" / "train_stage.py"),
        "stage=base",
        f"run_dir={run_dir}",
        *SMOKE,
        *STAGE_SMOKE["base"],
        f"trainer.max_steps={max_steps}",
        "trainer.micro_batch_size=2",
        "trainer.bf16=false",
        "data.train._target_=tests.test_distributed.RecordingShapes",
        f"+data.train.log_dir={log_dir}",
    ]


def _run(args: list[str], cwd: Path) -> None:
    result = run_python(args, cwd)  # one thread each: two ranks on a shared CPU
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_rank_torchrun_matches_one_process_and_resumes(tmp_path: Path) -> None:
    """Global batch 4: one process accumulates two micro-batches of 2; two ranks each hold one (SMOKE: 2 steps)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_train_command(one / "run", one / "log", 2), tmp_path)
    _run([*TORCHRUN_2, *_train_command(two / "run", two / "log", 1)], tmp_path)  # stop after step 1 ...
    _run([*TORCHRUN_2, *_train_command(two / "run", two / "log", 2)], tmp_path)  # ... and resume under torchrun

    a, b = (load_checkpoint(d / "run" / "checkpoints" / "last.pt") for d in (one, two))
    assert a["step"] == b["step"] == 2
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")

    single = [int(i) for i in (one / "log" / "rank0.txt").read_text().split()]
    ranks = [[int(i) for i in (two / "log" / f"rank{r}.txt").read_text().split()] for r in range(2)]
    assert len(single) == 8 and all(len(r) == 4 for r in ranks)  # 2 steps × global batch 4
    assert not set(ranks[0]) & set(ranks[1])  # each rank saw different examples ...
    for step in range(2):  # ... and together exactly the one-process run's global batch of every step
        assert ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2] == single[4 * step : 4 * step + 4]
