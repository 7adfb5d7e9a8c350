"""The one-command demo: train tiny versions of all four stages on the built-in data, then sample a class to 1024px.

    python scripts/demo.py [--class "blue star with concentric rings"] [--device auto]

Runs, and prints, the very commands a user would type:
``scripts/train_stage.py stage=<base|classifier|sr256|sr1024> preset=tiny`` (into runs/<stage>),
then ``scripts/cascade_sample.py``, its base steered by autoguidance (Karras et al. 2024): the base run's
checkpoint at two thirds of its training is the weaker guide (:func:`guide_checkpoint`); the tiny noisy
classifier is trained and reported on, but its guidance is off in the picture (at this budget it hurts:
README, Quickstart; ``cascade_sample.py --guidance-scale 1`` shows it). A stage already trained to its last step is reused, not
retrained, so running the demo again only samples. README (Quickstart) gives its measured duration.

First it prints, on one line, what the training runs will choose on this machine and why
(:func:`cascade.utils.device.choose_compute` on the tiny preset's trainer settings): bf16 autocast only
where the hardware has it natively and it trains faster than float32, the memory format by the CPU kind and
what is built here. Nothing else depends on the machine: a slower one trains the same stages for the same
steps and draws the same pictures, later.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cascade.nn.native import group_norm_kernels
from cascade.utils.cli import OneLineParser
from cascade.utils.device import choose_compute, resolve_device

SCRIPTS = Path(__file__).resolve().parent
CONFIGS = SCRIPTS.parent / "configs"
STAGES = ("base", "classifier", "sr256", "sr1024")
GUIDE_SCALE = 2.0  # autoguidance w of the base (README, Quickstart: what it measured)


def run(command: list[str]) -> None:
    """Run one step of the demo, showing its command; stop the demo with its exit code if it fails."""
    shown = ["python", os.path.relpath(command[1]), *command[2:]]  # as the user would type it from here
    print(f"\n$ {shlex.join(shown)}", flush=True)
    code = subprocess.call(command)
    if code:
        print(
            f"error: the step above failed (exit code {code}); fix what it says and run the demo again: finished stages are kept",
            file=sys.stderr,
        )
        sys.exit(code)


def tiny_base_trainer() -> DictConfig:
    """The trainer settings of ``train_stage.py stage=base preset=tiny``."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=["stage=base", "preset=tiny"]).trainer


def guide_checkpoint(trainer: DictConfig) -> str:
    """The base's autoguidance guide: its numbered checkpoint nearest below two thirds of training.

    An earlier checkpoint of the same run is the weaker model autoguidance extrapolates away from; the
    run keeps it (``keep_ckpts`` numbered checkpoints every ``ckpt_every`` steps reach back that far).
    """
    step = (2 * trainer.max_steps // 3) // trainer.ckpt_every * trainer.ckpt_every
    if step < 1 or (trainer.max_steps - step) // trainer.ckpt_every >= trainer.keep_ckpts:
        raise ValueError(f"the tiny base keeps no checkpoint at step {step} to guide it with; raise trainer.keep_ckpts")
    return f"runs/base/checkpoints/step_{step:07d}.pt"


def machine_line(device_name: str, trainer: DictConfig) -> str:
    """One line: the device, and the precision and memory format every tiny stage will train in there, with the reason."""
    device = resolve_device(device_name)
    choice = choose_compute(
        device,
        bf16=trainer.bf16,
        channels_last=trainer.channels_last,
        norm_kernel=lambda: group_norm_kernels() is not None,
    )
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return (
        f"demo on {device}{threads}: {choice.line()}. The same stages, steps and pictures on every machine; "
        "a slower one only takes longer"
    )


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--class", dest="class_", default="blue star with concentric rings", help="class index or name")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default="outputs/demo", help="where the pictures go")
    args = parser.parse_args()

    start = time.perf_counter()
    trainer = tiny_base_trainer()
    try:
        print(machine_line(args.device, trainer), flush=True)
    except ValueError as error:  # an unknown or absent device: one line, as the training steps would say it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for stage in STAGES:
        run([sys.executable, str(SCRIPTS / "train_stage.py"), f"stage={stage}", "preset=tiny", f"device={args.device}"])
    # 10 solver steps at 1024px: a full-size step of the tiny sr1024 is the costliest part of the demo on a CPU.
    # The base sampled with autoguidance by its own earlier checkpoint and without classifier guidance: the tiny
    # classifier's guidance pushes samples off the data, autoguidance improves both FID and shapes (README, Quickstart).
    run(
        [
            sys.executable,
            str(SCRIPTS / "cascade_sample.py"),
            "--class",
            args.class_,
            "--num",
            "1",
            "--sr1024-steps",
            "10",
            "--guidance-scale",
            "0",
            "--guide-ckpt",
            guide_checkpoint(trainer),
            "--guide-scale",
            str(GUIDE_SCALE),
            "--device",
            args.device,
            "--out",
            args.out,
        ]
    )
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\ndemo finished in {minutes:.1f} min. Pictures: {args.out}/000_strip.png (64 → 256 → 1024 side by side), "
        f"{args.out}/000_1024px.png; the base's samples beside held-out images, one row per class: "
        "runs/base/samples/latest.png; training curves and previews: runs/<stage>/loss.png, runs/<stage>/samples/"
    )


if __name__ == "__main__":
    main()
