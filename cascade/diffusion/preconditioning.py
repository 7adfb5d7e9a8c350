"""Preconditioning of an upsampler's network around its low-res conditioning (a Gaussian prior skip).

Karras et al. 2022 ("EDM", §5 and App. B.6) write the denoiser as
D(x) = c_skip(σ)·x + c_out(σ)·F(x): the skip is the exact denoiser of data ~ N(0, σ_data²), and
F only has to learn what that Gaussian misses, with a unit-variance target at every noise level.
For super-resolution the prior should not be centred on 0 but on the low-res image: we take
the hi-res image as x_0 ~ N(m, τ² I), centred on the (upsampled) conditioning. In the
variance-preserving process x_t = α x_0 + σ ε (α = √ᾱ_t, σ = √(1−ᾱ_t)) that prior's exact
posterior mean and standard deviation are

    E[x_0 | x_t] = m + c (x_t − α m),   c = α τ² / (α² τ² + σ²),
    std[x_0 | x_t] = c_out = σ τ / √(α² τ² + σ²),

and the network's x̂_0 is E[x_0 | x_t] + c_out · F. At high noise x̂_0 starts at the low-res
image (a zero-initialised F gives bicubic upsampling), at low noise at x_t / α (the noisy image
itself): a briefly trained network is right at both ends, where plain ε-, x_0- or v-prediction
has to learn to copy its input through the U-Net's normalisations first.

The conditioning is noise-augmented (Ho et al. 2021, "Cascaded Diffusion Models", §4.3):
z = √ᾱ_s x_lr + σ_s ε. The prior's centre is the Bayes estimate of x_lr from z for
x_lr ~ N(0, σ_d²), m = √ᾱ_s σ_d² / (ᾱ_s σ_d² + σ_s²) · z, and its spread adds that
estimate's variance, τ² = τ_0² + σ_d² σ_s² / (ᾱ_s σ_d² + σ_s²): the more the conditioning is
corrupted, the less the skip trusts it. τ_0 is the typical size of the detail the low-res
image lacks.

The wrapped network returns v = (α x_t − x̂_0) / σ (Salimans & Ho 2022), so the stage trains
and samples it as a v-prediction network with the usual losses and samplers.

Loss weighting. An error δF of the network is an error c_out δF of x̂_0 and (c_out/σ) δF of v,
so the plain v-loss weighs F's errors by c_out²/σ² = τ² / (α² τ² + σ²): 1 at low noise, but
only τ² (0.0025 at τ = 0.05) once σ ≫ τ — exactly the levels where F has to say which
detail the low-res image implies (an edge's sharp profile, a stripe's phase), since x_t no
longer shows it. EDM's λ(σ) = 1/c_out² (Karras et al. 2022, §5, Table 1) gives F's error unit
weight at every level; ``detail_weighting`` does that by multiplying the v-loss by
(α² τ² + σ²)/τ² (:meth:`LowresPrior.loss_weight`), which leaves the low-noise weight at 1.

A learned detail scale. One τ_0 for every pixel is a poor prior: detail is dense in a texture and
absent from a flat background, and what the low-res image shows of either is the same flat colour.
With a small τ_0 the skip never lets x_t's emerging texture through and F must output ~detail/τ_0
(ten at τ_0 = 0.05 for a stripe of amplitude 0.5); with a large one F must cancel the noise that the
skip passes through every flat area, pixel by pixel, which a briefly trained network does not: it
leaves grain. With ``detail_scale_max`` the network's output carries one more channel, a logit g, and
the prior's spread becomes per pixel, τ_0(x) = τ_max · sigmoid(g + b) with b such that g = 0 (a
zero-initialised output layer) gives ``residual_std``: the posterior formulas above hold pixel by
pixel (they never mix pixels), and "no detail here" is one logit per region instead of a noise map.
This is the heteroscedastic form of the EDM skip; the network is trained through x̂_0 as before.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cascade.diffusion.schedules import NoiseSchedule

__all__ = ["LowresPrior", "gaussian_lowres_estimate"]


def gaussian_lowres_estimate(z: Tensor, alpha_bar_s: Tensor, data_std: float) -> tuple[Tensor, Tensor]:
    """E[x | z] and Var[x | z] for x ~ N(0, σ_d²) seen through z = √ᾱ_s x + √(1−ᾱ_s) ε.

    ``z`` (B, C, H, W); ``alpha_bar_s`` broadcastable to it. Returns the mean (like ``z``) and
    the variance (like ``alpha_bar_s``).
    """
    signal = alpha_bar_s * data_std**2  # ᾱ_s σ_d²
    total = signal + (1.0 - alpha_bar_s)  # Var z
    return alpha_bar_s.sqrt() * data_std**2 / total * z, data_std**2 * (1.0 - alpha_bar_s) / total


def _posterior_x0(x_t: Tensor, alpha_bar: Tensor, mean: Tensor, tau2: Tensor, f: Tensor) -> Tensor:
    """m + c (x_t − α m) + c_out F for x_0 ~ N(m, τ²) seen through x_t (see the module docstring)."""
    alpha, sigma2 = alpha_bar.sqrt(), 1.0 - alpha_bar
    spread = alpha_bar * tau2 + sigma2  # α² τ² + σ²: Var x_t under the prior
    c_skip = alpha * tau2 / spread
    c_out = (sigma2 * tau2 / spread).sqrt()
    return mean + c_skip * (x_t - alpha * mean) + c_out * f


class LowresPrior(nn.Module):
    """A network ``net(x_t, t, lowres=, aug_level=, ...)`` preconditioned around its low-res input; predicts v.

    ``net``'s first ``channels`` outputs are F (see the module docstring); with ``detail_scale_max``
    the next one is the detail-scale logit (:meth:`detail_variance`); any further channels (a
    learned variance) pass through unchanged. ``schedule`` is the stage's
    training process (t → ᾱ_t), ``aug_schedule`` the conditioning augmentation's (s → ᾱ_s).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        schedule: NoiseSchedule,
        aug_schedule: NoiseSchedule,
        residual_std: float = 0.1,  # τ_0: std of the hi-res detail around the clean low-res image, [−1, 1] units (built-in data: 0.10 at 256px)
        data_std: float = 0.5,  # σ_d: std of images in [−1, 1] (EDM's σ_data)
        channels: int = 3,  # image channels (the rest of the output passes through)
        detail_weighting: bool = False,  # training: weigh F's error alike at every noise level (loss_weight)
        detail_scale_max: float | None = None,  # learned per-pixel τ_0 in (0, this) from one more output channel
    ) -> None:
        super().__init__()
        if residual_std <= 0 or data_std <= 0:
            raise ValueError(f"residual_std and data_std must be > 0, got {residual_std} and {data_std}")
        if detail_scale_max is not None and detail_scale_max <= residual_std:
            raise ValueError(
                f"detail_scale_max={detail_scale_max} must exceed residual_std={residual_std} (the scale an "
                "untrained network starts at); raise it or leave it unset for one fixed τ_0"
            )
        if detail_scale_max is not None and detail_weighting:
            raise ValueError(
                "detail_weighting weighs the loss by the prior's fixed τ_0, which detail_scale_max makes per pixel "
                "and learned; use one of the two"
            )
        self.net, self.channels = net, channels
        self.residual_std, self.data_std = residual_std, data_std
        self.detail_weighting, self.detail_scale_max = detail_weighting, detail_scale_max
        self.schedule, self.aug_schedule = schedule, aug_schedule
        # Rebuilt from the config, so not part of the state dict.
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone().float(), persistent=False)
        self.register_buffer("aug_alphas_cumprod", aug_schedule.alphas_cumprod.clone().float(), persistent=False)

    @staticmethod
    def extra_output_channels(detail_scale_max: float | None = None, **_: object) -> int:
        """Output channels the wrapped network needs besides F (and a learned variance): 1 for the detail-scale logit.

        Takes the constructor's keywords, so a stage can size its network from a configured partial.
        """
        return 0 if detail_scale_max is None else 1

    def __getattr__(self, name: str):  # the wrapped network's attributes (num_classes, resolution, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)

    def prior(self, lowres: Tensor, aug_level: Tensor) -> tuple[Tensor, Tensor]:
        """Centre m (B, C, H, W) and variance τ² (B, 1, 1, 1) of the Gaussian prior of x_0, from the conditioning."""
        ab_s = self.aug_alphas_cumprod[self.aug_schedule.positions(aug_level)].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        mean, var = gaussian_lowres_estimate(lowres.float(), ab_s, self.data_std)
        return mean, self.residual_std**2 + var

    def prior_variance(self, aug_level: Tensor) -> Tensor:
        """τ² (B,) of the prior at the conditioning levels ``aug_level`` (B,) (what :meth:`prior` returns, alone)."""
        ab_s = self.aug_alphas_cumprod[self.aug_schedule.positions(aug_level)]  # (B,)
        _, var = gaussian_lowres_estimate(torch.zeros_like(ab_s), ab_s, self.data_std)  # the estimate's variance needs no z
        return self.residual_std**2 + var

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ_t (B, 1, 1, 1) of the training timesteps ``t`` (B,)."""
        return self.alphas_cumprod[self.schedule.positions(t)].view(-1, 1, 1, 1)

    def loss_weight(self, t: Tensor, aug_level: Tensor) -> Tensor:
        """Per-example factor (B,) of the v-loss: (α² τ² + σ²)/τ² with ``detail_weighting``, else 1.

        With it, the weighted v-loss is ‖F − F*‖² at every noise level (module docstring, "Loss
        weighting"). ``t`` (B,): training timesteps; ``aug_level`` (B,): the conditioning's levels.
        """
        if not self.detail_weighting:
            return torch.ones(t.shape, device=t.device)
        tau2 = self.prior_variance(aug_level)  # (B,)
        alpha_bar = self.alpha_bar(t).flatten()  # (B,)
        return (alpha_bar * tau2 + 1.0 - alpha_bar) / tau2

    def denoise(self, x_t: Tensor, t: Tensor, mean: Tensor, tau2: Tensor, f: Tensor) -> Tensor:
        """x̂_0 = m + c (x_t − α m) + c_out F; all (B, C, H, W) but t (B,) and τ² (B, 1, 1, 1)."""
        return _posterior_x0(x_t, self.alpha_bar(t), mean, tau2, f)

    def detail_variance(self, logit: Tensor) -> Tensor:
        """τ_0(x)² (B, 1, H, W) from the detail-scale logit g (B, 1, H, W): (τ_max · sigmoid(g + b))², g = 0 → ``residual_std``²."""
        tau_max = float(self.detail_scale_max)  # type: ignore[arg-type]
        offset = -math.log(tau_max / self.residual_std - 1.0)  # sigmoid(offset) = τ_0 / τ_max
        return (tau_max * torch.sigmoid(logit + offset)) ** 2

    def forward(self, x_t: Tensor, t: Tensor, *, lowres: Tensor, aug_level: Tensor, **cond: Tensor) -> Tensor:
        out = self.net(x_t, t, lowres=lowres, aug_level=aug_level, **cond).float()  # (B, C [+ logit] + extra, H, W)
        f, extra = out[:, : self.channels], out[:, self.channels :]
        mean, tau2 = self.prior(lowres, aug_level)  # (B, C, H, W), (B, 1, 1, 1)
        if self.detail_scale_max is not None:
            logit, extra = extra[:, :1], extra[:, 1:]  # (B, 1, H, W), the rest (a learned variance) passes through
            tau2 = tau2 - self.residual_std**2 + self.detail_variance(logit)  # (B, 1, H, W): τ_0(x)² + the aug term
        alpha_bar = self.alpha_bar(t)  # (B, 1, 1, 1)
        x0 = _posterior_x0(x_t.float(), alpha_bar, mean, tau2, f)  # (B, C, H, W)
        v = (alpha_bar.sqrt() * x_t.float() - x0) / (1.0 - alpha_bar).sqrt()  # (B, C, H, W)
        return torch.cat([v, extra], dim=1)
