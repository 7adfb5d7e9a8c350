"""Evaluation at scale (issue 19 item 4): evaluate_stage.py under torchrun gives one process's figures; CAS from a samples .npz.

A base stage with random weights (the tiny preset, shrunk, trained 2 steps) is evaluated with 1
solver step. Features come from timm's ``test_convnext`` (64-d pre-logits), trained 2 steps as the
reference judge and shared by both runs through ``reference.ckpt``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, TORCHRUN_2, run_python, train

SHRINK = ["stage.net.model_channels=32", "stage.net.channel_mult=[1,2]", "stage.net.attention_resolutions=[]"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_scale_runs")
    result = train(root, "base", *SHRINK)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "base" / "checkpoints" / "last.pt"


def _evaluate(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "scripts" / "evaluate_stage.py"),
        f"ckpt={ckpt}",
        f"out_dir={out}",
        "preset=tiny",
        "device=cpu",
        "progress=false",
        "features=classifier",
        "reference.arch=test_convnext",
        "reference.steps=2",
        "reference.batch_size=8",
        "reference.eval_images=8",
        "shape_judge.steps=2",
        "shape_judge.batch_size=8",
        "steps=1",
        "num_samples=20",
        "num_real=24",
        "batch_size=8",  # 3 batches: rank 0 samples batches 0 and 2, rank 1 batch 1
        "feature_batch_size=8",
        "classifier_scales=[0.0]",
        "cfg_scales=[1.0,2.0]",
        "is_splits=4",
        "pr_num=16",  # precision/recall on the first 16 images of each set: a cut inside rank 0's last batch
        "cas.enabled=false",
        *extra,
    ]


@pytest.mark.slow
def test_guidance_sweep_on_two_ranks_equals_one_process(tiny_base: Path, tmp_path: Path) -> None:
    one = run_python(_evaluate(tiny_base, tmp_path / "one"), tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    judge, shape = (tmp_path / "one" / f"reference_{kind}test_convnext.pt" for kind in ("", "shape_"))
    shared = (f"reference.ckpt={judge}", f"shape_judge.ckpt={shape}")
    two = run_python([*TORCHRUN_2, *_evaluate(tiny_base, tmp_path / "two", *shared)], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["guidance"] and len(a["guidance"]) == 2
    assert a["reference"]["held_out"] == b["reference"]["held_out"]  # the same judge
    for key in ("num_samples", "num_real", "pr_num", "seeding"):
        assert a[key] == b[key]
    for ra, rb in zip(a["guidance"], b["guidance"]):
        # counts and k-NN coverage: exact; IS: float64 sums in another order; FID: a function of float64 sums
        # (covariance by Σxxᵀ − nμμᵀ, then eigendecompositions), which amplifies their last-bit differences.
        exact = ("classifier_scale", "cfg_scale", "precision", "recall", "requested_class_accuracy", "per_class_accuracy")
        for key in (*exact, "shape_accuracy", "per_class_shape_accuracy"):
            assert ra[key] == rb[key], key
        assert math.isclose(ra["is"], rb["is"], rel_tol=0, abs_tol=1e-12)
        assert math.isclose(ra["is_std"], rb["is_std"], rel_tol=0, abs_tol=1e-12)
        assert math.isclose(ra["fid"], rb["fid"], rel_tol=1e-7), (ra["fid"], rb["fid"])
        assert ra["fid"] > 0
    for png in ("samples_cls0_cfg2.png", "guidance_accuracy.png", "fid_vs_accuracy.png"):
        assert (tmp_path / "two" / png).is_file()


def _walk(a, b, path: str = ""):
    """(path, a, b) for every leaf of two JSON reports."""
    if isinstance(a, dict):
        for key in a:
            yield from _walk(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _walk(x, y, f"{path}[{i}]")
    else:
        yield path, a, b


@pytest.mark.slow
def test_upsampler_and_classifier_evaluation_on_two_ranks_equal_one_process(smoke_runs: Path, tmp_path: Path) -> None:
    """The aug-level sweep on real low-res inputs and the noisy classifier's accuracy by t, 1 process vs 2 gloo ranks."""
    common = ["device=cpu", "preset=tiny", "progress=false"]
    classifier = smoke_runs / "classifier" / "checkpoints" / "last.pt"
    reports = []
    for name, launch in (("c1", []), ("c2", TORCHRUN_2)):
        args = [str(ROOT / "scripts" / "evaluate_stage.py"), f"ckpt={classifier}", f"out_dir={tmp_path / name}", *common]
        result = run_python([*launch, *args, "eval_images=24", "eval_buckets=3"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert reports[0]["accuracy_by_t"] == reports[1]["accuracy_by_t"] and reports[1]["world_size"] == 2  # counts: exact

    sr256 = smoke_runs / "sr256" / "checkpoints" / "last.pt"
    sweep = ["aug_levels=[7,30]", "num_images=6", "sr_crop=128", "sr_batch_size=2", "sr_steps=1", "write_tuned=false", "pr_k=2"]
    sweep += ["reference.arch=test_convnext", "reference.steps=2", "reference.batch_size=8", "reference.eval_images=8"]
    reports = []
    for name, launch, extra in (
        ("u1", [], []),
        ("u2", TORCHRUN_2, [f"reference.ckpt={tmp_path / 'u1'}/reference_test_convnext_crop64.pt"]),
    ):
        args = [str(ROOT / "scripts" / "evaluate_stage.py"), f"ckpt={sr256}", f"out_dir={tmp_path / name}", *common, *sweep]
        result = run_python([*launch, *args, *extra], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    a, b = reports
    assert b["world_size"] == 2 and not (Path(str(sr256).replace(".pt", ".tuned.json"))).exists()
    for path, x, y in _walk({k: a[k] for k in ("levels", "bicubic", "realistic_bound", "chosen_aug_level")}, b):
        if path.endswith(".fid"):  # a function of float64 sums added in another order (see the guidance test); its
            # rounding scales with the covariances' traces, not with the FID: the bound's FID (~2) needs an absolute tolerance
            assert math.isclose(x, y, rel_tol=1e-7, abs_tol=1e-5), (path, x, y)
        else:  # PSNR / SSIM / consistency / sharpness means, precision / recall
            assert x == y or math.isclose(x, y, rel_tol=1e-12), (path, x, y)
    assert (tmp_path / "u2" / "sr_samples.png").is_file() and (tmp_path / "u2" / "sr_sweep.png").is_file()


# --- CAS of a samples file ----------------------------------------------------------------------------------------


def _samples_npz(path: Path, ckpt: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of the checkpoint's data set (as ADM's uint8 (N, H, W, 3)) with labels: a stand-in for sample_shards' file."""
    from cascade.data import ShapesDataset
    from cascade.utils.npz import ArraySpec, write_npz

    data = ShapesDataset(size=n, split="train", seed=5, resolution=64)
    images = torch.stack([data[i][0] for i in range(n)])  # (n, 3, 64, 64)
    labels = torch.tensor([data[i][1] for i in range(n)])
    pixels = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8)  # (n, 3, 64, 64)
    hwc = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    write_npz(
        path,
        {
            "arr_0": ArraySpec(hwc.shape, np.dtype(np.uint8), [hwc]),
            "arr_1": ArraySpec((n,), np.dtype(np.int64), [labels.numpy()]),
        },
    )
    return pixels, labels


@pytest.mark.slow
def test_cas_from_a_samples_file_is_the_cas_of_its_images(tiny_base: Path, tmp_path: Path) -> None:
    """cas_from_npz trains on the file's images and labels and tests on the checkpoint's held-out data, as the in-memory CAS."""
    from cascade.evaluation.cas import cas_from_npz
    from cascade.evaluation.evaluate import classification_accuracy_score
    from cascade.evaluation.held_out import held_out_data
    from cascade.evaluation.run import CasSettings
    from cascade.training.checkpoint import load_checkpoint

    npz = tmp_path / "samples_24x64x64x3.npz"
    pixels, labels = _samples_npz(npz, tiny_base, 24)
    cas = CasSettings(arch="test_convnext", steps=3, batch_size=8, real_baseline=False, eval_images=8)
    report = cas_from_npz(npz, tiny_base, cas, bf16=False, seed=1, progress=False)
    assert report["train_images"] == 24 and report["test_images"] == 8 and report["resolution"] == 64
    _, val, _ = held_out_data(load_checkpoint(tiny_base)["config"]["data"], 64, "base")
    direct = classification_accuracy_score(
        pixels,
        labels,
        num_classes=10,
        train_data=val,
        val_data=val,
        arch="test_convnext",
        steps=3,
        batch_size=8,
        lr=cas.lr,
        eval_images=8,
        real_baseline=False,
        device=torch.device("cpu"),
        bf16=False,
        seed=1,
        progress=False,
    )
    assert (report["top1"], report["top5"]) == (direct["top1"], direct["top5"])
    assert 0 <= report["top1"] <= report["top5"] <= 1


@pytest.mark.slow
def test_cas_script_bad_input_is_one_error_line(tiny_base: Path, tmp_path: Path, run_main) -> None:
    from cascade.utils.npz import ArraySpec, write_npz

    unlabelled = tmp_path / "u.npz"
    hwc = np.zeros((4, 64, 64, 3), np.uint8)
    write_npz(unlabelled, {"arr_0": ArraySpec(hwc.shape, np.dtype(np.uint8), [hwc])})
    wrong = tmp_path / "w.npz"
    write_npz(
        wrong,
        {
            "arr_0": ArraySpec(hwc.shape, np.dtype(np.uint8), [hwc]),
            "arr_1": ArraySpec((4,), np.dtype(np.int64), [np.array([0, 1, 2, 99])]),
        },
    )
    for path, message in ((unlabelled, "has no labels (arr_1)"), (wrong, "knows 10 classes")):
        result = run_main("cas_score.py", str(path), "--ckpt", str(tiny_base), cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr


@pytest.mark.slow
def test_cas_script_takes_real_images_from_a_folder_when_the_checkpoint_has_no_data(
    tiny_base: Path, tmp_path: Path, run_main
) -> None:
    """A checkpoint converted from guided-diffusion carries no data config: --data-root names the real images."""
    from PIL import Image

    from cascade.training.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(tiny_base)
    payload["config"] = {k: v for k, v in payload["config"].items() if k != "data"}
    bare = save_checkpoint(payload, tmp_path / "converted.pt")
    npz = tmp_path / "samples_20x64x64x3.npz"
    _samples_npz(npz, tiny_base, 20)
    result = run_main("cas_score.py", str(npz), "--ckpt", str(bare), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "pass --data-root FOLDER" in result.stderr
    rng = np.random.default_rng(0)
    for name in payload["class_names"]:  # class folders named like the checkpoint's classes
        (tmp_path / "real" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "real" / name / f"{i}.png")
    args = ["--data-root", str(tmp_path / "real"), "--arch", "test_convnext", "--steps", "2", "--batch-size", "8"]
    result = run_main("cas_score.py", str(npz), "--ckpt", str(bare), *args, "--eval-images", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / (npz.name + ".cas.json")).read_text())
    assert report["train_images"] == 20 and report["test_images"] == 4 and "real" in report["held_out"]


def test_metrics_read_real_images_without_the_random_flip() -> None:
    """A flip drawn from torch's global RNG made FID's real features differ between runs and ranks."""
    from cascade.evaluation.held_out import without_augmentation

    data = {
        "train": {"_target_": "cascade.data.ShapesDataset", "size": 8, "flip": True},
        "val": {"_target_": "cascade.data.ImageFolderDataset", "root": "x"},  # flips by default, key absent
        "other": None,
    }
    clean = without_augmentation(data)
    assert clean["train"] == {**data["train"], "flip": False} and clean["val"] == {**data["val"], "flip": False}
    assert clean["other"] is None and data["train"]["flip"] is True  # the input is not modified
