"""Shared test helpers: the real hydra configs, shrunk, and the training command they feed."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STAGES = sorted(p.stem for p in (CONFIGS / "stage").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONFIGS / "preset").glob("*.yaml"))
# Small enough for a 2-step smoke run of any stage on CPU in seconds.
SMOKE = [
    "preset=tiny",
    "trainer.max_steps=2",
    "trainer.batch_size=4",
    "trainer.log_every=1",
    "trainer.ckpt_every=2",
    "trainer.sample_every=2",
    "trainer.num_workers=0",
    "trainer.progress=false",
    "data.train.size=64",
    "data.val.size=8",
    "device=cpu",
]
STAGE_SMOKE = {
    "base": ["preview.steps=2", "preview.per_class=2", "preview.max_classes=3"],
    "classifier": ["preview.images=8", "preview.batch_size=8"],
    "sr256": ["preview.steps=2", "preview.images=2"],
    "sr1024": ["preview.steps=2", "preview.images=1"],
}


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """The environment for a child Python: ``tests`` importable (configs name test classes), ``threads`` OpenMP threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def run_python(args: list[str], cwd: Path | None = None, *, threads: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python args…`` (a script or ``-m torch.distributed.run …``) with ``subprocess_env``, output captured."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=subprocess_env(threads), timeout=timeout
    )


def run_script(script: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python scripts/<script> args…`` in ``cwd``, output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def _train_args(root: Path, stage: str, *extra: str) -> list[str]:
    return [
        str(ROOT / "scripts" / "train_stage.py"),
        f"stage={stage}",
        f"run_dir={root / stage}",
        *SMOKE,
        *STAGE_SMOKE[stage],
        *extra,
    ]


def train(root: Path, stage: str, *extra: str) -> subprocess.CompletedProcess:
    """The smoke training of ``stage`` into ``root/stage`` (resumes if a checkpoint is there)."""
    return subprocess.run(
        [sys.executable, *_train_args(root, stage, *extra)], capture_output=True, text=True, cwd=root, timeout=600
    )


def train_all(root: Path, stages: list[str], timeout: int = 900) -> dict[str, subprocess.CompletedProcess]:
    """The smoke training of every stage at once, one OpenMP thread each: a 2-step run is mostly single-threaded
    start-up (imports, config, the report), so on 2 cores running them side by side halves the wall time."""
    procs = {
        stage: subprocess.Popen(
            [sys.executable, *_train_args(root, stage)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
            env=subprocess_env(1),
        )
        for stage in stages
    }
    done = {}
    for stage, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        done[stage] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@dataclass
class Ran:
    """What a script run in this process (the ``run_main`` fixture) returned and printed."""

    returncode: int
    stdout: str
    stderr: str
