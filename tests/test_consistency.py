"""Consistency enforcement of the upsamplers (cascade.diffusion.consistency): the projection against dense linear algebra."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from cascade.diffusion.consistency import project_onto_observation
from cascade.evaluation.metrics import psnr
from cascade.pipeline.job import settings_from_argv
from stages.upsampler import downsample, upsample
from tests.helpers import CONFIGS
from tests.test_upsampler import images, perturbed, small_stage

DOWN4 = partial(downsample, factor=4)


def dense_matrix(operator, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix (m, n) of a linear ``operator`` on one example of ``shape``, from its images of the unit basis."""
    n = torch.Size(shape).numel()
    basis = torch.eye(n, dtype=torch.float32).view(n, *shape)  # (n, *shape)
    return operator(basis).reshape(n, -1).T.double()  # column j: A e_j


def test_projection_matches_the_closed_form_of_a_dense_operator():
    """x* = x + Aᵀ(AAᵀ)⁻¹(y − Ax), with A the 4× antialiased downsample of 16px images written out as a 48 × 768 matrix."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1  # any observation, not only a downsample of x
    a = dense_matrix(DOWN4, (3, 16, 16))  # (48, 768)
    xs, ys = x.reshape(2, -1).double().T, y.reshape(2, -1).double().T  # (768, 2), (48, 2)
    expected = xs + a.T @ torch.linalg.solve(a @ a.T, ys - a @ xs)  # (768, 2)
    got = project_onto_observation(x, y, DOWN4, rtol=1e-7)
    assert torch.allclose(got.reshape(2, -1).double().T, expected, atol=2e-5)
    assert torch.allclose(DOWN4(got), y, atol=2e-5)


def test_projection_keeps_what_the_operator_cannot_see_and_is_idempotent():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    null = project_onto_observation(torch.randn(2, 3, 32, 32, generator=g), torch.zeros_like(y), DOWN4, rtol=1e-7)
    assert DOWN4(null).abs().max() < 1e-4  # a vector of A's null space
    projected = project_onto_observation(x, y, DOWN4, rtol=1e-7)
    assert torch.allclose(project_onto_observation(x + null, y, DOWN4, rtol=1e-7), projected + null, atol=1e-4)
    assert torch.allclose(project_onto_observation(projected, y, DOWN4, rtol=1e-7), projected, atol=1e-5)


def test_projection_onto_the_truths_own_observation_moves_towards_the_truth_by_pythagoras():
    """With y = A(truth) the truth is in the target set: ‖x − truth‖² = ‖x* − truth‖² + ‖x* − x‖² (orthogonal projection)."""
    truth = images(3, 64, seed=2)
    x = truth + 0.2 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(3))
    projected = project_onto_observation(x, DOWN4(truth), DOWN4, rtol=1e-7)
    before, after, moved = ((x - truth) ** 2).sum(), ((projected - truth) ** 2).sum(), ((projected - x) ** 2).sum()
    assert after < before and torch.isclose(before, after + moved, rtol=1e-4)


def test_projection_refuses_an_observation_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"maps x to shape \(1, 3, 4, 4\), but y has shape \(1, 3, 8, 8\)"):
        project_onto_observation(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8), DOWN4)


def test_an_upsampler_projects_its_samples_onto_the_input_when_asked():
    stage = small_stage(lowres_upsample="bicubic")
    net = perturbed(stage.build(4))
    lowres = downsample(images(2, 16, seed=4), 4) * 0.8  # (2, 3, 4, 4)
    labels = torch.tensor([0, 3])

    def run(**kwargs) -> torch.Tensor:
        return stage.sample(net, lowres, labels, steps=3, generator=torch.Generator().manual_seed(0), progress=False, **kwargs)

    plain, default = run(enforce_consistency=False), run()
    assert not stage.enforce_consistency and torch.equal(plain, default)  # off unless the stage or the call says so
    projected = run(enforce_consistency=True)
    assert torch.allclose(projected, stage.make_consistent(plain, lowres)) and projected.abs().max() <= 1
    # The untrained network's samples saturate, so the clamp after the projection binds; on outputs near their input,
    # as a trained model's are, it does not, and the projection's consistency is exact.
    inside = upsample(lowres, 4) + 0.05 * plain  # (2, 3, 16, 16)
    assert psnr(downsample(stage.make_consistent(inside, lowres), 4), lowres) > 60 > psnr(downsample(inside, 4), lowres)
    stage.enforce_consistency = True  # the stage's default, as the tiny presets set it
    assert torch.equal(run(), projected) and torch.equal(run(enforce_consistency=False), plain)


def test_the_sampling_flag_turns_consistency_on_or_off_per_upsampler():
    resolved = settings_from_argv(["--class", "1", "--sr256-consistency", "off"], CONFIGS / "cascade.yaml")
    assert resolved.config.upsamplers["sr256"].settings.enforce_consistency is False
    assert resolved.config.upsamplers["sr1024"].settings.enforce_consistency is None  # the checkpoint's default
    assert resolved.source("sr256", "enforce_consistency") == "--sr256-consistency"
