"""Self-conditioning: a denoising network that also sees its own estimate of x_0.

Chen, Zhang & Hinton 2022 ("Analog Bits", §3.2): the network's input gets extra channels
holding an estimate x̂_0 of the clean image, made by the same network. In training, on half of
the steps the estimate is zero; on the other half a first pass (no gradient) with zeros makes
x̂_0 and the second pass, the one trained, sees it. So the network learns both to denoise from
scratch and to refine an estimate; at sampling it always refines.

Chen et al. feed the previous sampler step's x̂_0. That is hidden state a sampler would have to
carry from step to step; here every model call makes its own estimate (two passes per call, the
first with zeros), so a model function stays a pure function of (x_t, t, cond) and every sampler,
guidance and the exact-resume machinery work unchanged. It costs a second pass at sampling and,
in training, half a forward pass per step on average.

The estimate enters through the U-Net's concatenated conditioning input (``lowres``, which a
generator does not otherwise use), so the wrapped network is a plain
:class:`cascade.nn.UNet` built with ``lowres_channels`` equal to the image channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascade.diffusion.process import Parameterization, at, x0_eps_from_prediction
from cascade.diffusion.schedules import NoiseSchedule

__all__ = ["SelfConditioning"]


class SelfConditioning(nn.Module):
    """A network ``net(x_t, t, lowres=, **cond)`` that feeds itself its own x̂_0 through ``lowres``.

    ``forward(x_t, t, *, refine=True, **cond)``: with ``refine`` (sampling, and training on half
    of the steps) a first pass with ``lowres`` = 0 estimates x̂_0 without gradient and the
    returned second pass sees it; without, one pass with ``lowres`` = 0. The output is ``net``'s
    (prediction, plus any learned-variance channels), in the stage's parameterisation.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        schedule: NoiseSchedule,  # the stage's training process (t → ᾱ_t)
        parameterization: Parameterization,  # what ``net`` predicts in its first ``channels`` outputs
        channels: int = 3,  # image channels: the prediction, and the estimate fed back
    ) -> None:
        super().__init__()
        self.net, self.channels = net, channels
        self.parameterization = parameterization
        self.schedule = schedule
        # Rebuilt from the config, so not part of the state dict.
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone().float(), persistent=False)

    def __getattr__(self, name: str):  # the wrapped network's attributes (num_classes, resolution, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)

    @torch.no_grad()
    def estimate(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        """x̂_0 (B, C, H, W) in [−1, 1] from one pass with a zero estimate; no gradient flows through it."""
        out = self.net(x_t, t, lowres=torch.zeros_like(x_t), **cond).float()  # (B, C or 2C, H, W)
        x_t32 = x_t.float()  # (B, C, H, W); the estimate is made in float32 even under bf16 autocast
        alpha_bar = at(self.alphas_cumprod, self.schedule.positions(t), x_t32)  # (B, 1, 1, 1)
        x0, _ = x0_eps_from_prediction(out[:, : self.channels], self.parameterization, x_t32, alpha_bar)
        return x0.clamp(-1.0, 1.0).to(x_t.dtype)  # (B, C, H, W)

    def forward(self, x_t: Tensor, t: Tensor, *, refine: bool = True, **cond: Tensor) -> Tensor:
        estimate = self.estimate(x_t, t, **cond) if refine else torch.zeros_like(x_t)  # (B, C, H, W)
        return self.net(x_t, t, lowres=estimate, **cond)
