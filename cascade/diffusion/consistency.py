"""Projection of an image onto the images a linear degradation maps to a given observation.

For a linear operator A (an upsampler's antialiased downsample) and an observation y (its low-res
input), the image nearest to x among those with A x = y is

    x* = x + Aᵀ (A Aᵀ)⁻¹ (y − A x).

It changes only the part of x that A sees (the component in the range of Aᵀ) and keeps the rest
(the null space of A: the detail the observation cannot show) exactly. This is the consistency
enforcing module of Bahat & Michaeli 2020 ("Explorable Super Resolution", §4, eq. 3) and the
range-null space decomposition of Wang et al. 2023 (DDNM, eq. 6–7, with A⁺ = Aᵀ(AAᵀ)⁻¹). When y is
the true image's own observation, the projection can only move x towards the truth (the truth
lies in the same affine set, and an orthogonal projection onto a set shortens every distance to
its points).

(A Aᵀ)⁻¹ is applied by conjugate gradients on the observation's grid (A Aᵀ is symmetric positive
definite for an operator of full row rank, e.g. a downsample with a positive prefilter); Aᵀ comes
from autograd's vector-Jacobian product, so any linear operator works without its adjoint written out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vjp

__all__ = ["project_onto_observation"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-example inner products of (B, …) tensors, shaped (B, 1, …, 1) to broadcast."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.ndim - 1)))


def project_onto_observation(
    x: Tensor,
    y: Tensor,
    operator: Callable[[Tensor], Tensor],
    *,
    rtol: float = 1e-4,
    max_iters: int = 100,
) -> Tensor:
    """The image nearest to ``x`` (B, …) whose ``operator`` image is ``y`` (B, …): x + Aᵀ (A Aᵀ)⁻¹ (y − A x).

    ``operator`` must be linear and act on each example alone (e.g. ``partial(downsample, factor=4)``).
    Conjugate gradients solve (A Aᵀ) λ = y − A x for every example until its residual is below
    ``rtol`` of the first (``max_iters`` at most). Computed in float32 whatever the inputs' dtype or
    autocast; returns float32 (B, …) like ``x``.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        observed, adjoint_fn = vjp(operator, x)  # A x (B, …); Aᵀ as a function (A is linear: its Jacobian everywhere)
        if observed.shape != y.shape:
            raise ValueError(f"the operator maps x to shape {tuple(observed.shape)}, but y has shape {tuple(y.shape)}")

        def adjoint(v: Tensor) -> Tensor:
            return adjoint_fn(v)[0]  # Aᵀ v, shaped like x

        residual = y - observed  # (B, …) r = y − A x − A Aᵀ λ, with λ = 0
        lam = torch.zeros_like(residual)
        direction = residual.clone()
        rr = _dot(residual, residual)  # (B, 1, …)
        target = rr * rtol**2
        for _ in range(max_iters):
            if bool((rr <= target).all()):
                break
            a_direction = operator(adjoint(direction))  # A Aᵀ p
            step = rr / _dot(direction, a_direction).clamp_min(torch.finfo(rr.dtype).tiny)
            step = torch.where(rr > target, step, torch.zeros_like(step))  # converged examples stay put
            lam = lam + step * direction
            residual = residual - step * a_direction
            rr_next = _dot(residual, residual)
            direction = residual + (rr_next / rr.clamp_min(torch.finfo(rr.dtype).tiny)) * direction
            rr = rr_next
        return x + adjoint(lam)
