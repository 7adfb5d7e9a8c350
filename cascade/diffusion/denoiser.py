"""The model-function contract shared by samplers and guidance, and its construction from a network.

A model function is ``model_fn(x_t, t, **cond) -> ModelOutput`` where ``t`` holds training
timesteps (B,) and ``cond`` holds named conditioning (``class_labels``, ``lowres``,
``aug_level``). Samplers only ever see ε and the variance fraction; the network's own
parameterisation (ε, x_0 or v), learned variance and x_0 clipping are resolved here.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from cascade.diffusion.process import Parameterization, at, eps_from_x0, x0_eps_from_prediction
from cascade.diffusion.schedules import NoiseSchedule

__all__ = ["ModelOutput", "ModelFn", "VarianceType", "network_model_fn", "split_learned_variance"]

VarianceType = Literal["learned", "small", "large"]


class ModelOutput(NamedTuple):
    """What a model function predicts at (x_t, t)."""

    eps: Tensor  # (B, C, H, W) predicted noise ε
    var_frac: Tensor | None = None  # (B, C, H, W) v ∈ [0, 1]: log Σ = v log β + (1 − v) log β̃; None ≡ 0


class ModelFn(Protocol):
    def __call__(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> ModelOutput: ...


def split_learned_variance(out: Tensor) -> tuple[Tensor, Tensor]:
    """Split a (B, 2C, H, W) output into the prediction and v = (raw + 1)/2 (Nichol & Dhariwal eq. 15)."""
    prediction, raw = out.chunk(2, dim=1)  # (B, C, H, W) each
    return prediction, (raw + 1.0) / 2.0


def network_model_fn(
    net: nn.Module,
    schedule: NoiseSchedule,
    *,
    parameterization: Parameterization = "eps",
    variance: VarianceType = "small",
    clip_x0: bool = False,
) -> ModelFn:
    """Wrap a network ``net(x_t, t, **cond) -> Tensor`` as a model function.

    Args:
        net: the denoising network; outputs C channels, or 2C when ``variance="learned"``.
        schedule: the process the network was trained on (ᾱ is looked up by training timestep).
        parameterization: what the network predicts: ε, x_0 or v.
        variance: ``learned`` (network's second half of channels), ``small`` (β̃) or ``large`` (β).
        clip_x0: clamp the implied x_0 to [−1, 1] and re-derive ε from it (ADM ``clip_denoised``).
    """

    def model_fn(x_t: Tensor, t: Tensor, **cond: Tensor) -> ModelOutput:
        out = net(x_t, t, **cond).float()  # (B, C or 2C, H, W); float32 even under bf16 autocast
        var_frac: Tensor | None = None
        if variance == "learned":
            out, var_frac = split_learned_variance(out)
        elif variance == "large":
            var_frac = torch.ones_like(out)
        alpha_bar = at(schedule.alphas_cumprod, schedule.positions(t), x_t)  # (B, 1, 1, 1)
        x0, eps = x0_eps_from_prediction(out, parameterization, x_t.float(), alpha_bar.float())
        if clip_x0:
            eps = eps_from_x0(x_t.float(), x0.clamp(-1.0, 1.0), alpha_bar.float())
        return ModelOutput(eps=eps, var_frac=var_frac)

    return model_fn
