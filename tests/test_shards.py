"""Sharded sampling: the same images for 1 process and 2 torchrun ranks, resumption after SIGKILL, ADM's file format.

A base stage with random weights (the tiny preset, shrunk further, trained 2 steps) is sampled
with 1 solver step; images are compared bit for bit and final files by SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.pipeline.shards import class_labels, to_uint8
from cascade.utils.npz import ArraySpec, iter_rows, read_array, read_header, write_npz
from cascade.utils.rng import derive_seed
from tests.helpers import ROOT, TORCHRUN_2, run_python, subprocess_env, train

SHRINK = ["stage.net.model_channels=32", "stage.net.channel_mult=[1,2]", "stage.net.attention_resolutions=[]"]
NUM, SHARD = 6, 2


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards_runs")
    result = train(root, "base", *SHRINK)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "base" / "checkpoints" / "last.pt"


def _command(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "scripts" / "sample_shards.py"),
        "--base-ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--num-samples",
        str(NUM),
        "--shard-size",
        str(SHARD),
        "--base-steps",
        "1",
        "--base-batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--classes",
        "random",
        "--seed",
        "3",
        *extra,
    ]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adm_read(path: Path, key: str) -> np.ndarray:
    """Read ``key`` the way ADM's evaluator streams it: the zip member, a 1.0/2.0 .npy header, raw rows."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        assert version in ((1, 0), (2, 0))
        shape, fortran, dtype = (
            np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
        )
        assert not fortran
        return np.frombuffer(f.read(), dtype=dtype).reshape(shape)


def test_class_labels_are_a_function_of_seed_and_index() -> None:
    whole = class_labels(range(20), num_classes=7, seed=5, mode="random")
    assert torch.equal(class_labels(range(10, 20), num_classes=7, seed=5, mode="random"), whole[10:])
    assert whole.tolist() == [derive_seed(5, -1, i) % 7 for i in range(20)]
    assert not torch.equal(class_labels(range(20), num_classes=7, seed=6, mode="random"), whole)
    assert class_labels(range(3, 6), num_classes=4, seed=0, mode="round-robin").tolist() == [3, 0, 1]
    assert class_labels(range(3), num_classes=4, seed=0, mode="random", fixed=2).tolist() == [2, 2, 2]


def test_npz_writer_is_streamed_deterministic_and_read_back_in_blocks(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int64)

    def spec():
        return {
            "arr_0": ArraySpec(images.shape, np.dtype(np.uint8), [images[:3], images[3:7], images[7:]]),
            "arr_1": ArraySpec((10,), np.dtype(np.int64), [labels]),
        }

    a, b = write_npz(tmp_path / "a.npz", spec()), write_npz(tmp_path / "b.npz", spec())
    assert _sha(a) == _sha(b)  # fixed timestamps: the same arrays give the same bytes
    loaded = np.load(a)
    assert np.array_equal(loaded["arr_0"], images) and np.array_equal(loaded["arr_1"], labels)
    assert read_header(a, "arr_0") == ((10, 4, 4, 3), np.dtype(np.uint8))
    blocks = dict(iter_rows(a, "arr_0", 4, blocks=[2, 0]))
    assert sorted(blocks) == [0, 8] and np.array_equal(blocks[8], images[8:]) and np.array_equal(blocks[0], images[:4])
    assert np.array_equal(read_array(a, "arr_1"), labels)
    with pytest.raises(ValueError, match="rows"):
        write_npz(tmp_path / "c.npz", {"arr_0": ArraySpec((5, 4, 4, 3), np.dtype(np.uint8), [images[:3]])})
    assert not (tmp_path / "c.npz").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_two_ranks_one_process_and_a_killed_run_give_the_same_file(tiny_base: Path, tmp_path: Path) -> None:
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    result = run_python(
        _command(tiny_base, one, "--format", "both"), tmp_path, threads=2
    )  # two threads: the thread count is free too
    assert result.returncode == 0, result.stderr[-3000:]
    final = one / f"samples_{NUM}x64x64x3.npz"
    record = __import__("json").loads((one / "manifest.json").read_text())
    assert record["settings"]["stages"][0]["steps"] == 1 and record["setting_sources"]["base"]["steps"] == "--base-steps"
    assert record["setting_sources"]["base"]["sampler"] == "configs/cascade.yaml"

    result = run_python([*TORCHRUN_2, *_command(tiny_base, two)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _sha(two / final.name) == _sha(final)  # bit-identical images, labels and bytes

    # ADM's evaluator reads arr_0 as uint8 (N, H, W, 3) rows straight from the zip member; arr_1 holds the labels.
    images, labels = _adm_read(final, "arr_0"), _adm_read(final, "arr_1")
    assert images.dtype == np.uint8 and images.shape == (NUM, 64, 64, 3)
    assert labels.tolist() == class_labels(range(NUM), num_classes=10, seed=3, mode="random").tolist()
    assert images.std() > 0 and not np.array_equal(images[0], images[1])
    png = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(one / "png" / "64px" / "000004.png"))
    assert np.array_equal(png, images[4])

    # Killed with SIGKILL after its first shard, then run again with the same command.
    process = subprocess.Popen(
        [sys.executable, *_command(tiny_base, killed)],
        cwd=tmp_path,
        env=subprocess_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = killed / "shards" / "shard_000000.npz"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / final.name).exists()
    left = sorted(p.name for p in (killed / "shards").glob("shard_*.npz"))
    assert 1 <= len(left) < NUM // SHARD
    result = run_python(_command(tiny_base, killed), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = __import__("json").loads((killed / "manifest.json").read_text())
    assert manifest["last_run"]["images_sampled"] == NUM - SHARD * len(left)  # only the missing shards
    assert manifest["complete"] and manifest["done"] == [[0, NUM - 1]]
    assert _sha(killed / final.name) == _sha(final)

    # The same command once more: nothing to do. Another setting against this folder: one error line.
    again = run_python(_command(tiny_base, killed), tmp_path)
    assert again.returncode == 0 and _sha(killed / final.name) == _sha(final)
    changed = run_python(_command(tiny_base, killed, "--base-steps", "2"), tmp_path)
    assert changed.returncode == 2 and changed.stderr.startswith("error: ") and changed.stderr.count("\n") == 1
    assert "steps was 1, now 2" in changed.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--class", "99"], "out of range"),
        (["--sr1024-ckpt", "x.pt"], "do not start the config's chain"),
    ],
)
def test_bad_options_are_one_error_line(tiny_base: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    result = run_python(_command(tiny_base, tmp_path / "out", *extra), tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_missing_checkpoint_is_one_error_line(tmp_path: Path) -> None:
    result = run_python(_command(tmp_path / "none.pt", tmp_path / "out"), tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "does not exist" in result.stderr


def test_stage_settings_take_the_cascade_sample_path_with_tuned_files(tmp_path: Path) -> None:
    """config ← <ckpt>.tuned.json ← flags, as cascade_sample.py: a tuned aug level and step count change what shards use."""
    from cascade.evaluation.tuned import tuned_path, write_tuned
    from cascade.pipeline.shard_command import resolve, shard_settings

    base, sr256 = tmp_path / "base.pt", tmp_path / "sr256.pt"
    argv = ["--out", str(tmp_path / "o"), "--base-ckpt", str(base), "--sr256-ckpt", str(sr256)]
    _, resolved = resolve(argv)
    settings, sources = shard_settings(resolved, ["base", "sr256"])
    assert settings[1].aug_level is None and settings[0].steps == 25 and settings[1].batch_size == 4  # configs/cascade.yaml
    write_tuned(sr256, {"aug_level": 77}, chosen_by="test", step=2, report="r.json")
    write_tuned(base, {"steps": 3}, chosen_by="test", step=2, report="r.json")
    _, resolved = resolve(argv)
    settings, sources = shard_settings(resolved, ["base", "sr256"])
    assert settings[1].aug_level == 77 and sources["sr256"]["aug_level"].startswith(str(tuned_path(sr256)))
    assert settings[0].steps == 3 and sources["base"]["steps"].startswith(str(tuned_path(base)))
    _, resolved = resolve([*argv, "--sr256-aug-level", "5"])  # a flag still wins
    settings, sources = shard_settings(resolved, ["base", "sr256"])
    assert settings[1].aug_level == 5 and sources["sr256"]["aug_level"] == "--sr256-aug-level"
    _, resolved = resolve(argv[:4])  # no upsampler checkpoint given: the base alone, not the config's chain
    assert list(resolved.config.upsamplers) == []


def test_pixels_are_truncated_as_adm_image_sample_does() -> None:
    """ADM's image_sample.py: ((x + 1) * 127.5).clamp(0, 255).to(uint8) — truncation; out-of-range values clamp."""
    levels = torch.arange(256, dtype=torch.float64)
    x = ((levels + 0.75) / 127.5 - 1).float()  # three quarters of a level above each level: rounding would go up
    images = torch.cat([x, torch.tensor([-1.5, -1.0, 1.0, 1.5])]).reshape(1, 1, 1, -1).expand(1, 3, 1, -1)  # (1, 3, 1, 260)
    pixels = to_uint8(images)  # (1, 1, 260, 3)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 1, 260, 3)
    assert pixels[0, 0, :256, 0].tolist() == list(range(255)) + [255] and pixels[0, 0, 256:, 1].tolist() == [0, 0, 255, 255]
