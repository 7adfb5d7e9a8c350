"""Guidance as wrappers of a model function; samplers never see it.

- Classifier guidance (Dhariwal & Nichol 2021, Alg. 1 and 2), from any
  ``log_prob_fn(x_t, t, y) -> log p(y | x_t, t)``:
  ``mode="eps"`` (DDIM, ODE solvers): ε ← ε − s √(1−ᾱ_t) ∇_{x_t} log p(y | x_t, t);
  ``mode="mean"`` (ancestral sampling): μ ← μ + s Σ ∇_{x_t} log p(y | x_t, t), realised as the
  equivalent shift of ε (μ is affine in ε) for the step Σ that ``schedule`` gives.
- Classifier-free guidance (Ho & Salimans 2022): ε̃ = ε(x_t, ∅) + w (ε(x_t, y) − ε(x_t, ∅)).
- Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself", eq. 1 with
  the conditional guide D_0): ε̃ = ε_guide(x_t, y) + w (ε(x_t, y) − ε_guide(x_t, y)), the guide being a
  weaker model of the same task (e.g. an earlier checkpoint of the same run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.diffusion.denoiser import ModelFn, ModelOutput
from cascade.diffusion.process import at, model_log_variance
from cascade.diffusion.schedules import NoiseSchedule

__all__ = [
    "LogProbFn",
    "classifier_log_prob",
    "log_prob_gradient",
    "classifier_guidance",
    "classifier_free_guidance",
    "autoguidance",
]

LogProbFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, y) -> log p(y | x_t, t), (B,)


def classifier_log_prob(classifier: nn.Module) -> LogProbFn:
    """log p(y | x_t, t) from a noisy classifier ``classifier(x_t, t) -> logits (B, num_classes)``."""

    def log_prob(x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        logits = classifier(x_t, t).float()  # (B, num_classes)
        return F.log_softmax(logits, dim=-1).gather(1, y.long()[:, None])[:, 0]  # (B,)

    return log_prob


def log_prob_gradient(log_prob_fn: LogProbFn, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """∇_{x_t} log p(y | x_t, t) for every example at once: one forward and one backward for the batch.

    The examples are independent, so the gradient of the batch sum is every example's own
    gradient. Only the input gradient is asked for, so autograd skips the classifier's weight
    gradients. Works inside ``torch.inference_mode`` (the samplers run there): the inputs are
    cloned out of inference mode, the only part of sampling that records a graph.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)  # (B, C, H, W), a normal tensor even if x_t is an inference tensor
        (grad,) = torch.autograd.grad(log_prob_fn(x, t.clone(), y.clone()).sum(), x)
    return grad  # (B, C, H, W)


def classifier_guidance(
    model_fn: ModelFn,
    log_prob_fn: LogProbFn,
    schedule: NoiseSchedule,
    scale: float,
    *,
    mode: Literal["eps", "mean"] = "eps",
    label_key: str = "class_labels",
) -> ModelFn:
    """Steer ``model_fn`` towards the class in ``cond[label_key]`` with the gradient of a classifier.

    Args:
        model_fn: the (conditional or unconditional) model; it receives ``cond`` unchanged.
        log_prob_fn: log p(y | x_t, t), e.g. :func:`classifier_log_prob` of a noisy classifier.
        schedule: for ``mode="eps"`` any schedule holding the sampled timesteps (ᾱ is the same);
            for ``mode="mean"`` the very schedule the ancestral sampler walks (its Σ is used).
        scale: the guidance scale s ≥ 0 (ADM uses 1.0 at 64px).
        mode: ``eps`` for DDIM / DPM-Solver, ``mean`` for the ancestral (DDPM) sampler.
    """
    if scale < 0:
        raise ValueError(f"classifier guidance scale must be >= 0, got {scale}")
    if mode not in ("eps", "mean"):
        raise ValueError(f"unknown classifier guidance mode {mode!r}; use 'eps' or 'mean'")

    def guided(x_t: Tensor, t: Tensor, **cond: Tensor) -> ModelOutput:
        out = model_fn(x_t, t, **cond)
        if scale == 0:
            return out
        if label_key not in cond:
            raise ValueError(f"classifier guidance needs the class in cond[{label_key!r}]")
        grad = log_prob_gradient(log_prob_fn, x_t, t, cond[label_key]).to(out.eps.dtype)  # (B, C, H, W)
        k = schedule.positions(t)
        alpha_bar = at(schedule.alphas_cumprod, k, out.eps)  # (B, 1, 1, 1)
        if mode == "eps":
            eps = out.eps - scale * (1.0 - alpha_bar).sqrt() * grad
        else:
            # μ(ε) = c_0 x̂_0(ε) + c_t x_t has ∂μ/∂ε = −β_k / (√α_k √(1−ᾱ_k)); shift ε so μ moves by sΣ∇.
            beta = at(schedule.betas, k, out.eps)  # (B, 1, 1, 1)
            var = model_log_variance(schedule, k, out.var_frac, out.eps).exp()  # (B, C, H, W)
            eps = out.eps - scale * var * grad * (1.0 - beta).sqrt() * (1.0 - alpha_bar).sqrt() / beta
        return out._replace(eps=eps)

    return guided


def _repeat_cond(cond: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
    """Duplicate every per-example conditioning tensor along the batch (for a joint cond/uncond pass)."""
    return {
        key: torch.cat([value, value]) if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch else value
        for key, value in cond.items()
    }


def classifier_free_guidance(model_fn: ModelFn, scale: float, null_label: int, *, label_key: str = "class_labels") -> ModelFn:
    """ε̃ = ε(x_t, ∅) + w (ε(x_t, y) − ε(x_t, ∅)) (Ho & Salimans 2022, eq. 6 with w = 1 + their w).

    The conditional and unconditional passes run as one batch of 2B. ``null_label`` is the
    class index the model was trained with for "no label" (our networks: ``num_classes``).
    w = 1 is the conditional model, w = 0 the unconditional one. The variance comes from the
    conditional pass.
    """
    if scale < 0:
        raise ValueError(f"classifier-free guidance scale must be >= 0, got {scale}")

    def guided(x_t: Tensor, t: Tensor, **cond: Tensor) -> ModelOutput:
        if label_key not in cond:
            raise ValueError(f"classifier-free guidance needs the class in cond[{label_key!r}]")
        batch = x_t.shape[0]
        labels = cond[label_key]
        both = _repeat_cond(cond, batch)
        both[label_key] = torch.cat([labels, torch.full_like(labels, null_label)])
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), **both)
        eps_cond, eps_uncond = out.eps.chunk(2)  # (B, C, H, W) each
        var_frac = None if out.var_frac is None else out.var_frac[:batch]
        return ModelOutput(eps=eps_uncond + scale * (eps_cond - eps_uncond), var_frac=var_frac)

    return guided


def autoguidance(model_fn: ModelFn, guide_fn: ModelFn, scale: float) -> ModelFn:
    """ε̃ = ε_guide + w (ε − ε_guide) (Karras et al. 2024, eq. 1 with a weaker model as D_0), both under the same ``cond``.

    The guide has the same task and conditioning but larger errors (less training or capacity); extrapolating
    away from it removes the errors the two share, where classifier-free guidance would also narrow the
    distribution towards the class. The denoiser is affine in ε at fixed x_t, so mixing ε's is mixing the
    denoisers of the paper. w = 1 is the model alone (the guide is not called); the variance is the model's.
    """
    if scale < 0:
        raise ValueError(f"autoguidance scale must be >= 0, got {scale}")

    def guided(x_t: Tensor, t: Tensor, **cond: Tensor) -> ModelOutput:
        out = model_fn(x_t, t, **cond)
        if scale == 1.0:
            return out
        guide = guide_fn(x_t, t, **cond)
        return out._replace(eps=guide.eps + scale * (out.eps - guide.eps))

    return guided
