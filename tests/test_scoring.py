"""Metrics at scale: streaming and rank-gathered statistics, the Fréchet distance against scipy, IS and precision/recall
against torch-fidelity on the same features, the reference-batch path of score_samples.py, FD_DINOv2's network."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cascade.evaluation.fid import frechet_distance, inception_score, precision_recall
from cascade.evaluation.stats import FeatureStats, ScoreStats
from cascade.utils.npz import ArraySpec, write_npz
from tests.helpers import ROOT, TORCHRUN_2, run_python

scipy_linalg = pytest.importorskip("scipy.linalg")


class RandomFeatures:
    """A small fixed random conv network standing in for Inception: 48-d pooled features and 10-way probabilities."""

    input_size = None

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(16, 48, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ).eval()
        self.head = nn.Linear(48, 10)
        self.description = f"random conv features (seed {seed})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(images)
        return features, self.head(features).softmax(dim=1)


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mixing).relu() + shift  # non-negative, correlated: like pool features


@pytest.mark.slow
def test_frechet_distance_matches_scipy_sqrtm_at_2048_dims() -> None:
    a, b = _features(2500, 2048, 0), _features(2500, 2048, 1, shift=0.05)
    mu1, s1, mu2, s2 = (
        x.numpy() for x in (a.double().mean(0), torch.cov(a.double().T), b.double().mean(0), torch.cov(b.double().T))
    )
    root = scipy_linalg.sqrtm(s1 @ s2).real  # the independent computation ADM's evaluator and EDM2 use
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    ours = frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(expected, rel=1e-6)
    stats = FeatureStats(2048)
    for chunk in a.split(700):
        stats.update(chunk)
    assert frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_torch_fidelity() -> None:
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a, b = _features(600, 256, 7), _features(500, 256, 8, shift=0.1)
    mu1, s1, mu2, s2 = (
        x.numpy() for x in (a.double().mean(0), torch.cov(a.double().T), b.double().mean(0), torch.cov(b.double().T))
    )
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)["frechet_inception_distance"]
    assert frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2))) == pytest.approx(theirs, rel=1e-7)


def test_streaming_statistics_equal_in_memory_ones() -> None:
    x = _features(1001, 64, 2) + 3.0  # a large mean: the float64 sums must not cancel visibly
    stats = FeatureStats(64)
    for chunk in x.split(97):
        stats.update(chunk)
    assert stats.n == 1001
    np.testing.assert_allclose(stats.mu.numpy(), x.double().mean(0).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-11)


def test_inception_score_matches_torch_fidelity_and_the_in_memory_form() -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(500, 1008, generator=torch.Generator().manual_seed(3)) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
    score = ScoreStats(500, 1008, splits=10)
    order = torch.randperm(500, generator=torch.Generator().manual_seed(4))  # any arrival order: splits go by index
    for part in order.split(64):
        score.update(logits[part].double().softmax(dim=1), part)
    mean, std = score.score()
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-6)
    assert inception_score(logits.double().softmax(dim=1), splits=10) == pytest.approx((mean, std), rel=1e-9)


def test_precision_recall_match_torch_fidelity() -> None:
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = _features(400, 32, 5), _features(300, 32, 6, shift=0.1)
    theirs = calculate_precision_recall_full(fake, real, 3)  # torch-fidelity: (generated, real), the same k
    ours = precision_recall(real, fake, k=3)
    assert ours == pytest.approx(theirs, abs=1e-12)


_WORKER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
import torch.distributed as dist
from cascade.evaluation.stats import FeatureStats, ScoreStats, gather_rows
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
x = torch.randn(103, 16, generator=g).double() + 1
p = torch.randn(103, 5, generator=g).softmax(1)
mine = torch.arange(103)[torch.arange(103) % 10 // 5 == rank]  # blocks of 5, round-robin over 2 ranks
stats, score = FeatureStats(16), ScoreStats(103, 5, 10)
for part in mine.split(7):
    stats.update(x[part]); score.update(p[part], part)
stats.all_reduce(); score.all_reduce()
rows = gather_rows(x[mine].float(), mine)
if rank == 0:
    torch.save({"mu": stats.mu, "sigma": stats.sigma, "n": stats.n, "is": score.score(), "rows": rows}, sys.argv[1])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_statistics_gathered_over_two_ranks_equal_one_process(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    result = run_python([*TORCHRUN_2, str(worker), str(tmp_path / "out.pt"), str(ROOT)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(103, 16, generator=g).double() + 1
    p = torch.randn(103, 5, generator=g).softmax(1)
    single, score = FeatureStats(16), ScoreStats(103, 5, 10)
    single.update(x)
    score.update(p, torch.arange(103))
    assert got["n"] == 103
    torch.testing.assert_close(got["mu"], single.mu, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got["sigma"], single.sigma, rtol=1e-12, atol=1e-12)
    assert got["is"] == pytest.approx(score.score(), rel=1e-12)
    assert torch.equal(got["rows"], x.float())


# --- score_samples.py ------------------------------------------------------------------------------------------------


def _images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(base + rng.integers(-40, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def _npz(path: Path, images: np.ndarray, **extra: np.ndarray) -> Path:
    arrays = {"arr_0": ArraySpec(images.shape, np.dtype(np.uint8), [images])}
    arrays |= {k: ArraySpec(v.shape, v.dtype, [v]) for k, v in extra.items()}
    return write_npz(path, arrays)


def _score(args: list[str], extractor: RandomFeatures) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    import score_samples

    return score_samples.run(score_samples.parser().parse_args(args), {"fid": extractor})


def test_reference_batch_with_and_without_precomputed_statistics(tmp_path: Path) -> None:
    extractor = RandomFeatures()
    samples, real = _images(120, 32, 0), _images(150, 32, 1)
    sample_path = _npz(tmp_path / "samples.npz", samples)
    plain = _npz(tmp_path / "ref.npz", real)
    feats = torch.cat(
        [extractor(torch.from_numpy(real[i : i + 50]).permute(0, 3, 1, 2).float() / 127.5 - 1)[0] for i in range(0, 150, 50)]
    ).double()
    mu, sigma = feats.mean(0).numpy(), np.cov(feats.numpy(), rowvar=False)
    with_stats = _npz(tmp_path / "ref_stats.npz", real, mu=mu, sigma=sigma)
    stats_only = write_npz(
        tmp_path / "stats_only.npz",
        {"mu": ArraySpec(mu.shape, mu.dtype, [mu]), "sigma": ArraySpec(sigma.shape, sigma.dtype, [sigma])},
    )
    common = [
        "--num-samples",
        "120",
        "--batch-size",
        "32",
        "--pr-num",
        "100",
        "--no-progress",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    a = _score([str(sample_path), "--ref", str(plain), "--out", str(tmp_path / "a.json"), *common], extractor)
    b = _score([str(sample_path), "--ref", str(with_stats), "--out", str(tmp_path / "b.json"), *common], extractor)
    c = _score([str(sample_path), "--ref", str(stats_only), "--out", str(tmp_path / "c.json"), *common], extractor)
    again = _score([str(sample_path), "--ref", str(plain), "--out", str(tmp_path / "d.json"), *common], extractor)

    sample_feats = extractor(torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 127.5 - 1)[0].double()
    expected = frechet_distance(sample_feats.mean(0), torch.cov(sample_feats.T), torch.from_numpy(mu), torch.from_numpy(sigma))
    assert a["fid"] == pytest.approx(expected, rel=1e-8) and b["fid"] == pytest.approx(expected, rel=1e-8)
    assert c["fid"] == pytest.approx(expected, rel=1e-8)
    assert a["precision"] == b["precision"] and a["recall"] == b["recall"] and a["precision"] is not None
    assert a["pr_num_reference"] == 100 and a["pr_num_samples"] == 120  # ADM: its reference subset against every sample
    assert (a["precision"], a["recall"]) == pytest.approx(precision_recall(feats[:100], sample_feats, 3), abs=1e-12)
    assert c["precision"] is None and "no images" in c["precision_recall_note"]
    assert any("mu/sigma stored in" in n for n in b["notes"])
    assert any("read from the cache" in n for n in again["notes"]) and again["fid"] == a["fid"]
    assert a["sfid"] is None and "mixed_6/conv" in a["sfid_note"]
    assert json.loads((tmp_path / "a.json").read_text())["fid"] == a["fid"]
    assert 1.0 <= a["is"] <= 10.0


def test_bad_input_is_one_error_line(tmp_path: Path, run_main) -> None:
    samples = _npz(tmp_path / "s.npz", _images(20, 32, 0))
    ref64 = _npz(tmp_path / "r64.npz", _images(20, 64, 1))
    floats = write_npz(
        tmp_path / "f.npz", {"arr_0": ArraySpec((4, 8, 8, 3), np.dtype(np.float32), [np.zeros((4, 8, 8, 3), np.float32)])}
    )
    gray = write_npz(tmp_path / "g.npz", {"arr_0": ArraySpec((4, 8, 8), np.dtype(np.uint8), [np.zeros((4, 8, 8), np.uint8)])})
    cases = [
        ((str(tmp_path / "missing.npz"), "--ref", str(ref64)), "do not exist"),
        ((str(samples), "--ref", str(tmp_path / "nothing"), "--num-samples", "20"), "does not exist"),
        ((str(floats), "--ref", str(ref64), "--num-samples", "4"), "expected uint8"),
        ((str(gray), "--ref", str(ref64), "--num-samples", "4"), "expected square RGB"),
        ((str(samples), "--ref", str(ref64), "--num-samples", "20"), "at 64px but the samples are at 32px"),
        ((str(samples), "--ref", str(ref64)), "fewer than the 50000 asked"),
    ]
    for args, message in cases:
        result = run_main("score_samples.py", *args, "--no-progress", "--device", "cpu", cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr


# --- FD_DINOv2's network ---------------------------------------------------------------------------------------------


def test_dinov2_weight_file_loads_into_timm_and_gives_the_same_features(tmp_path: Path) -> None:
    import timm

    from cascade.evaluation.dinov2 import DinoV2Features, dinov2_network

    small = {"depth": 2, "embed_dim": 64, "num_heads": 2}
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, **small).eval()
    state = {**source.state_dict(), "mask_token": torch.zeros(1, 64)}  # the original checkpoint's extra key
    torch.save(state, tmp_path / "dinov2_small.pth")
    net = dinov2_network(tmp_path / "dinov2_small.pth", arch="vit_small_patch14_dinov2", **small)
    images = torch.rand(3, 3, 40, 40) * 2 - 1
    a = DinoV2Features(source, description="source")(images)[0]
    b = DinoV2Features(net, description="loaded")(images)[0]
    assert a.shape == (3, 64) and torch.equal(a, b)

    # The real ViT-L/14 on the meta device: the original DINOv2 checkpoint's keys and 37x37 grid (518px) load strictly.
    with torch.device("meta"):
        original = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0)  # 518px, as released
        target = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    from cascade.evaluation.dinov2 import convert_dinov2_state

    released = {**original.state_dict(), "mask_token": torch.empty(1, 1024, device="meta")}
    assert released["pos_embed"].shape == (1, 1 + 37 * 37, 1024)
    converted = convert_dinov2_state(released, target)
    assert converted["pos_embed"].shape == (1, 1 + 16 * 16, 1024)
    target.load_state_dict(converted, strict=True, assign=True)
    assert sum(p.numel() for p in target.parameters()) > 300_000_000


def test_dinov2_position_grid_resampling_follows_dinov2s_formula() -> None:
    import torch.nn.functional as F

    from cascade.evaluation.dinov2 import _resample_grid

    pos = torch.randn(1, 1 + 37 * 37, 8)  # float32, as DINOv2 interpolates
    out = _resample_grid(pos, 16)
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    assert torch.equal(out[:, :1], pos[:, :1])
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 8), rtol=1e-6, atol=1e-6)
