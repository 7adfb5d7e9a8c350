"""The super-resolution stages of the cascade: 64→256 (``sr256``) and 256→1024 (``sr1024``).

What is conditioned on what (Ho et al. 2021, "Cascaded Diffusion Models" (CDM), §3–4; Saharia
et al. 2022, "Imagen", §2.4 and App. B):

* **Low-res making**: the low-res image is the hi-res training image downsampled by the
  stage's factor (4) with kornia's antialiased resize (Gaussian prefilter, then bilinear).
* **Blur augmentation** (CDM §4.3): on ``blur_prob`` of the training examples the low-res
  image is Gaussian-blurred with σ drawn uniformly in ``blur_sigma`` (low-res pixels).
  Never at sampling.
* **Noise conditioning augmentation** (CDM §4.3, non-truncated): the (blurred) low-res image
  is corrupted with the forward process of ``aug_schedule``,
  z = √ᾱ_s x_lr + √(1−ᾱ_s) ε, at a level s drawn per example uniformly in {0, …, s_max}
  (``aug_max_level``, a timestep of ``aug_schedule``); the network gets s as ``aug_level``
  (embedded like t). At sampling s is one fixed level (``sample_aug_level`` or the caller's).
* z is resized back up to the output resolution (``lowres_upsample``: bicubic by default)
  and the U-Net concatenates it with x_t on channels (``lowres``).
* **Consistency enforcement** (optional, at sampling; Bahat & Michaeli 2020, §4): with
  ``enforce_consistency`` every output is projected onto the images whose downsample is the
  un-augmented low-res input (:func:`cascade.diffusion.consistency.project_onto_observation`):
  the low frequencies the input shows are kept exactly, the detail it cannot show is the model's.
* **Crop training** (Imagen App. B): with ``crop_size`` the loss sees random ``crop_size``
  crops of the hi-res image, at offsets that are multiples of the factor, with the
  conditioning of exactly the aligned low-res region. The conditioning of a crop is
  computed on a window of the hi-res image a few low-res pixels larger than the crop, so it
  equals (up to float rounding) the crop of the full image's conditioning — what a
  full-image sampler sees — without degrading whole 1024px images. The network must be
  attention-free (fully convolutional) for crop training and full-size sampling to agree.
  With ``crop_windows`` the data pipeline makes only that window of each image
  (:meth:`UpsamplerStage.training_data`; the built-in data set renders nothing else).

Randomness comes only from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import kornia
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from cascade.data.imagefolder import image_to_tensor
from cascade.data.resize import UpsampleMode, central_crop, downsample, upsample  # re-exported: the stage's low-res making
from cascade.data.windows import AlignedWindows
from cascade.diffusion.consistency import project_onto_observation
from cascade.diffusion.denoiser import VarianceType
from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.preconditioning import LowresPrior
from cascade.diffusion.process import q_sample
from cascade.diffusion.samplers import SamplerName
from cascade.diffusion.schedules import NoiseSchedule, Spacing
from cascade.roles import Upsampler
from cascade.utils import rng
from stages.core import DiffusionStage, SamplingOptions, network_classes

__all__ = [
    "UpsampleMode",
    "UpsamplerStage",
    "TrainingInputs",
    "downsample",
    "upsample",
    "gaussian_blur",
    "random_crop_offsets",
    "windowed_crops",
    "load_image",
    "prepare_lowres",
    "super_resolve",
]

# Low-res pixels of context a conditioning crop is computed with, besides the blur kernel's radius: the
# antialiased downsample reaches 1 low-res pixel, bicubic upsampling 2; one more for safety.
CROP_CONTEXT = 4


# --- Resizing, blur, crops: pure functions --------------------------------------------------------


def gaussian_blur(images: Tensor, apply: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian-blur the images (B, C, H, W) flagged in ``apply`` (B,) with their own σ (B,) (kornia, reflected edges)."""
    if not bool(apply.any()):
        return images
    blurred = kornia.filters.gaussian_blur2d(images, kernel_size, torch.stack([sigma, sigma], dim=-1), border_type="reflect")
    return torch.where(apply[:, None, None, None], blurred, images)


def random_crop_offsets(
    batch: int, lowres_size: tuple[int, int], crop: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(B, 2) long (top, left) of uniformly random ``crop``×``crop`` windows inside a low-res image."""
    h, w = lowres_size
    if crop > min(h, w):
        raise ValueError(f"low-res crop {crop} is larger than the low-res image {h}x{w}")
    top = torch.randint(0, h - crop + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, w - crop + 1, (batch,), generator=generator, device=device)
    return torch.stack([top, left], dim=1)


def windowed_crops(
    images: Tensor, offsets: Tensor, crop: int, factor: int, context: int, fn: Callable[[Tensor, int], Tensor]
) -> tuple[Tensor, Tensor]:
    """Aligned hi-res crops and the crops of ``fn`` (hi-res image → conditioning), computed on windows only.

    Low-res window [y, y+c) × [x, x+c) (``offsets`` (B, 2), ``crop`` = c) pairs with the hi-res
    window [f·y, f·(y+c)) × [f·x, f·(x+c)). ``fn(window, b)`` maps a (1, C, f·h, f·w) piece of
    example b to a same-size conditioning; it is evaluated on the crop grown by ``context``
    low-res pixels on every side (clipped at the image border). If ``fn`` reaches no further
    than ``context`` low-res pixels and treats the image border as it treats a window's, the
    result equals the crop of ``fn(full image)`` — at a fraction of the cost for 1024px images.

    Returns the (B, C, f·c, f·c) hi-res crops and the (B, C, f·c, f·c) conditioning crops.
    """
    f = factor
    h, w = images.shape[-2] // f, images.shape[-1] // f  # low-res size
    hi, cond = [], []
    for b, (y, x) in enumerate(offsets.tolist()):
        y0, y1, x0, x1 = max(0, y - context), min(h, y + crop + context), max(0, x - context), min(w, x + crop + context)
        window = fn(images[b : b + 1, :, f * y0 : f * y1, f * x0 : f * x1], b)  # (1, C, f·(y1−y0), f·(x1−x0))
        top, left = f * (y - y0), f * (x - x0)
        cond.append(window[0, :, top : top + f * crop, left : left + f * crop])  # (C, f·c, f·c)
        hi.append(images[b, :, f * y : f * (y + crop), f * x : f * (x + crop)])  # (C, f·c, f·c)
    return torch.stack(hi), torch.stack(cond)


# --- The stage ----------------------------------------------------------------------------------


class TrainingInputs(NamedTuple):
    """What one training batch of an upsampler is made of."""

    images: Tensor  # (B, 3, h, w) hi-res targets (crops when crop training)
    lowres: Tensor  # (B, 3, h, w) augmented low-res conditioning, resized up to the targets' size
    aug_level: Tensor | None  # (B,) long noise-augmentation level s (timesteps of aug_schedule); None without augmentation
    blurred: Tensor  # (B,) bool: blur augmentation applied
    offsets: Tensor | None  # (B, 2) low-res (top, left) of the crops; None without crop training


class UpsamplerStage(DiffusionStage, Upsampler):
    """Super-resolution diffusion stage (any integer factor), with or without noise and blur conditioning augmentation."""

    def __init__(
        self,
        *,
        net: Callable[..., nn.Module],  # U-Net constructor; resolution, classes, channels and conditioning filled in here
        schedule: NoiseSchedule,  # the training noise process of the hi-res image
        objective: DiffusionLoss,  # L_simple or hybrid, and the parameterisation
        aug_schedule: NoiseSchedule | None = None,  # forward process corrupting the low-res conditioning (with augmentation)
        name: str = "sr256",  # stage name: checkpoints and run dirs carry it
        resolution: int = 256,  # output resolution
        lowres_resolution: int = 64,  # input resolution; resolution / lowres_resolution is the factor
        class_conditional: bool = True,  # condition on the class (with a null class for CFG when p_uncond > 0)
        p_uncond: float = 0.1,  # label dropout (CFG); unlabelled super-resolution uses the null class
        fixed_variance: VarianceType = "large",  # Σ at sampling when the variance is not learned
        noise_augmentation: bool = True,  # CDM noise conditioning augmentation; False: ADM's upsamplers (none, no level)
        aug_max_level: int | None = None,  # s_max: training levels s ~ U{0..s_max}, timesteps of aug_schedule (default 500)
        sample_aug_level: int | None = None,  # the fixed s at sampling (≤ s_max; default 50); sweep it for the best result
        enforce_consistency: bool = False,  # sampling default: project outputs onto downsample(output) = the low-res input
        lowres_upsample: UpsampleMode = "bicubic",  # how the conditioning is resized up to the output size
        blur_prob: float = 0.0,  # fraction of training examples whose low-res image is blurred
        blur_sigma: Sequence[float] = (0.4, 0.6),  # σ range of the blur, low-res pixels (CDM)
        blur_kernel_size: int | None = None,  # blur kernel side; None → 2·⌈3σ_max⌉ + 1
        crop_size: int | None = None,  # train on random aligned crops of this hi-res size; None → full images
        crop_windows: bool = False,  # with crop_size: the training data makes only each crop's window (training_data)
        lowres_prior: Callable[..., nn.Module]
        | None = None,  # e.g. cascade.diffusion.preconditioning.LowresPrior (partial): skip around the low-res image
    ) -> None:
        super().__init__(
            net=net,
            schedule=schedule,
            objective=objective,
            name=name,
            resolution=resolution,
            class_conditional=class_conditional,
            p_uncond=p_uncond,
            fixed_variance=fixed_variance,
        )
        if resolution % lowres_resolution or resolution // lowres_resolution < 2:
            raise ValueError(
                f"resolution {resolution} must be an integer multiple (≥ 2) of lowres_resolution {lowres_resolution}"
            )
        self.factor = resolution // lowres_resolution
        if crop_size is not None and (crop_size % self.factor or not 0 < crop_size <= resolution):
            raise ValueError(f"crop_size={crop_size} must be a multiple of {self.factor} in (0, {resolution}]")
        if noise_augmentation:
            if aug_schedule is None:
                raise ValueError("noise_augmentation needs aug_schedule, the forward process that corrupts the low-res input")
            aug_max_level = 500 if aug_max_level is None else aug_max_level
            sample_aug_level = 50 if sample_aug_level is None else sample_aug_level
            if not 0 <= aug_max_level < len(aug_schedule):
                raise ValueError(
                    f"aug_max_level must be a timestep of aug_schedule, 0..{len(aug_schedule) - 1}; got {aug_max_level}"
                )
            if not 0 <= sample_aug_level <= aug_max_level:
                raise ValueError(
                    f"sample_aug_level must be in 0..aug_max_level={aug_max_level} (the trained levels); got {sample_aug_level}"
                )
        else:
            given = [
                k
                for k, v in (
                    ("aug_schedule", aug_schedule),
                    ("aug_max_level", aug_max_level),
                    ("sample_aug_level", sample_aug_level),
                    ("lowres_prior", lowres_prior),
                )
                if v is not None
            ]
            if given:
                raise ValueError(
                    f"noise_augmentation=false: the low-res input is never corrupted, so {', '.join(given)} "
                    "must not be set (remove them, or set noise_augmentation=true)"
                )
        if not 0.0 <= blur_prob <= 1.0:
            raise ValueError(f"blur_prob must be in [0, 1], got {blur_prob}")
        sigma = tuple(float(s) for s in blur_sigma)
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur_sigma must be a range (low, high) with 0 < low <= high, got {list(blur_sigma)}")
        if lowres_prior is not None and objective.parameterization != "v":
            raise ValueError(
                f"lowres_prior makes the network predict v around a low-res prior; set "
                f"objective.parameterization=v (got {objective.parameterization!r})"
            )
        self.lowres_prior = lowres_prior
        if lowres_upsample not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"unknown lowres_upsample {lowres_upsample!r}; use bicubic, bilinear or nearest")
        self.aug_schedule, self.noise_augmentation = aug_schedule, noise_augmentation
        self.lowres_resolution = lowres_resolution
        self.aug_max_level, self.sample_aug_level, self.lowres_upsample = aug_max_level, sample_aug_level, lowres_upsample
        self.blur_prob, self.blur_sigma = blur_prob, sigma
        self.blur_kernel_size = blur_kernel_size or 2 * math.ceil(3 * sigma[1]) + 1
        self.crop_size = crop_size
        if crop_windows and (crop_size is None or self.training_window > resolution):
            raise ValueError(
                "crop_windows needs crop training: set crop_size so that the crop and its conditioning context "
                f"fit the image (crop_size={crop_size}, resolution {resolution})"
            )
        self.crop_windows = crop_windows
        self.enforce_consistency = bool(enforce_consistency)

    @property
    def crop_context(self) -> int:
        """Low-res pixels around a crop that its conditioning is computed with (:func:`windowed_crops`)."""
        return CROP_CONTEXT + self.blur_kernel_size // 2

    @property
    def training_window(self) -> int | None:
        """Hi-res side of the window a crop's training example needs: the crop and its context on every side."""
        return None if self.crop_size is None else self.crop_size + 2 * self.factor * self.crop_context

    def training_data(self, dataset: Dataset) -> Dataset:
        """The training images as this stage takes them: with ``crop_windows``, random aligned windows of
        :attr:`training_window` px (:class:`cascade.data.windows.AlignedWindows`; the built-in data set renders
        just those pixels), otherwise ``dataset`` itself.

        Each window's central crop is trained on (:meth:`training_inputs`), so crop positions are drawn by the
        data pipeline instead of the training generator, and crops within :attr:`crop_context` low-res pixels of
        the image border are not drawn (windows stay inside the image).
        """
        if not self.crop_windows:
            return dataset
        return AlignedWindows(dataset, self.training_window, self.factor)

    def net_kwargs(self, num_classes: int) -> dict[str, object]:
        kwargs = {**super().net_kwargs(num_classes), "lowres_channels": 3, "aug_level_embedding": self.noise_augmentation}
        if self.lowres_prior is not None:  # a configured partial: its keywords say whether it reads a detail-scale channel
            kwargs["out_channels"] += LowresPrior.extra_output_channels(**getattr(self.lowres_prior, "keywords", {}))
        return kwargs

    def precondition(self, net: nn.Module) -> nn.Module:
        """``net`` wrapped in ``lowres_prior`` (preconditioning around the conditioning image) when configured."""
        if self.lowres_prior is None:
            return net
        return self.lowres_prior(net, schedule=self.schedule, aug_schedule=self.aug_schedule)

    # --- training ---

    def conditioning(
        self, images: Tensor, k: Tensor | None, blur: Tensor, sigma: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """The training conditioning of hi-res images (B, 3, H, W): downsample → blur → q_sample at s → upsample.

        ``k`` (B,): augmentation levels (positions in ``aug_schedule``; None without noise
        augmentation: no corruption, no draw); ``blur`` (B,) bool and ``sigma`` (B,): which
        images are blurred and how much (low-res pixels). The noise ε is drawn from
        ``generator``. Returns (B, 3, H, W).
        """
        lowres = downsample(images, self.factor)  # (B, 3, h, w)
        lowres = gaussian_blur(lowres, blur, sigma, self.blur_kernel_size)  # (B, 3, h, w)
        if k is not None:
            noise = torch.randn(lowres.shape, generator=generator, device=lowres.device)  # (B, 3, h, w)
            lowres = q_sample(self.aug_schedule, lowres, k, noise)  # (B, 3, h, w) √ᾱ_s x_lr + √(1−ᾱ_s) ε
        return upsample(lowres, self.factor, self.lowres_upsample)  # (B, 3, H, W)

    def training_inputs(self, images: Tensor, generator: torch.Generator | None) -> TrainingInputs:
        """Make a batch's targets and conditioning (:meth:`conditioning`), cropped when ``crop_size`` is set.

        ``images`` (B, 3, R, R) in [−1, 1] at the stage resolution, or with crop training (B, 3, W, W)
        windows of :attr:`training_window` px (:meth:`training_data`), of which the central crop is taken.
        Computed in float32 even under autocast. Random draws, in order: blur flags, blur σ, levels s
        (with noise augmentation), crop offsets (whole images only), then ε (per example when cropping: the
        conditioning of a crop is computed on a window around it, see :func:`windowed_crops`, and equals
        the crop of the full image's conditioning).
        """
        batch, device = images.shape[0], images.device
        side = images.shape[-2:]
        if side != (self.resolution, self.resolution) and (self.crop_size is None or side != (self.training_window,) * 2):
            windows = "" if self.crop_size is None else f" or {self.training_window}px windows (crop_windows)"
            raise ValueError(f"stage {self.name!r} trains on {self.resolution}px images{windows}; got {tuple(side)}")
        with torch.autocast(device.type, enabled=False):
            images = images.float()
            blur = torch.rand(batch, generator=generator, device=device) < self.blur_prob  # (B,)
            low, high = self.blur_sigma
            sigma = low + (high - low) * torch.rand(batch, generator=generator, device=device)  # (B,)
            k = None
            if self.noise_augmentation:
                k = torch.randint(0, self.aug_max_level + 1, (batch,), generator=generator, device=device)  # (B,)
            offsets = None
            if self.crop_size is None:
                cond = self.conditioning(images, k, blur, sigma, generator)  # (B, 3, R, R)
            else:
                crop, f, context = self.crop_size // self.factor, self.factor, self.crop_context
                if side == (self.resolution, self.resolution):
                    offsets = random_crop_offsets(batch, (side[0] // f, side[1] // f), crop, generator, device)
                else:  # windows from training_data: the crop is each one's centre
                    offsets = torch.full((batch, 2), context, dtype=torch.long, device=device)
                images, cond = windowed_crops(  # (B, 3, c, c) each
                    images,
                    offsets,
                    crop,
                    f,
                    context,
                    lambda window, b: self.conditioning(
                        window, None if k is None else k[b : b + 1], blur[b : b + 1], sigma[b : b + 1], generator
                    ),
                )
        aug_level = None if k is None else self.aug_schedule.timesteps.to(device)[k]  # (B,)
        return TrainingInputs(images, cond, aug_level, blur, offsets)

    def _cond(self, lowres: Tensor, aug_level: Tensor | None) -> dict[str, Tensor]:
        """The network's conditioning keywords: the low-res image and, with noise augmentation, its level."""
        return {"lowres": lowres} if aug_level is None else {"lowres": lowres, "aug_level": aug_level}

    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Per-example diffusion loss of the hi-res (crop) at uniformly drawn t, given the augmented low-res."""
        inputs = self.training_inputs(images, generator)
        weight = None
        if self.lowres_prior is not None and isinstance(net, nn.Module):
            # The built network holds the prior, possibly inside DDP / torch.compile wrappers; a bare network
            # (a benchmark's twin) or model function trains unweighted.
            prior = next((m for m in net.modules() if isinstance(m, LowresPrior)), None)
            if prior is not None and prior.detail_weighting:
                weight = partial(prior.loss_weight, aug_level=inputs.aug_level)
        cond = self._cond(inputs.lowres, inputs.aug_level)
        return self.diffusion_loss(net, inputs.images, labels, generator, loss_weight=weight, **cond)

    # --- sampling ---

    def sampling_condition(self, lowres: Tensor, aug_level: int | None, generator: rng.Generator) -> tuple[Tensor, Tensor | None]:
        """The conditioning at sampling: ``lowres`` (B, 3, h, w) corrupted at the fixed level s, resized up.

        No blur (blur is a training augmentation only). Without noise augmentation the input is
        only resized up (``aug_level`` must be None). Returns (B, 3, f·h, f·w) and s (B,) or None.
        """
        if not self.noise_augmentation:
            if aug_level is not None:
                raise ValueError(
                    f"stage {self.name!r} was trained without noise conditioning augmentation: it takes no "
                    f"aug_level (got {aug_level}); leave it unset"
                )
            return upsample(lowres.float(), self.factor, self.lowres_upsample), None
        if aug_level is None or not 0 <= aug_level <= self.aug_max_level:
            raise ValueError(
                f"aug_level must be in 0..{self.aug_max_level} (the levels this stage was trained on), got {aug_level}"
            )
        batch, device = lowres.shape[0], lowres.device
        k = torch.full((batch,), int(aug_level), dtype=torch.long, device=device)  # (B,)
        noise = rng.randn(lowres.shape, generator, device=device)  # (B, 3, h, w)
        z = q_sample(self.aug_schedule, lowres.float(), k, noise)  # (B, 3, h, w)
        return upsample(z, self.factor, self.lowres_upsample), self.aug_schedule.timesteps.to(device)[k]

    @torch.no_grad()
    def sample(
        self,
        net: nn.Module,
        lowres: Tensor,
        class_labels: Tensor | None = None,
        *,
        aug_level: int | None = None,
        sampler: SamplerName = "dpmpp_2m",
        steps: int = 25,
        spacing: Spacing | None = None,
        cfg_scale: float = 1.0,
        enforce_consistency: bool | None = None,
        generator: rng.Generator = None,
        progress: bool = True,
    ) -> Tensor:
        """Super-resolve ``lowres`` (B, 3, h, w) in [−1, 1] to (B, 3, f·h, f·w) in [−1, 1].

        Any size works (the networks are convolutional; attention-free ones exactly as trained
        on crops). ``class_labels`` (B,): the classes; ``None`` on a class-conditional stage uses
        the null class (the unconditional model trained through ``p_uncond``). ``aug_level``:
        the fixed noise-augmentation level s (default ``sample_aug_level``; refused on a stage
        without noise augmentation). ``enforce_consistency`` (default: the stage's): project the
        output onto the images whose downsample is ``lowres`` itself (not its augmented copy), then
        clamp. Random draws (through :func:`cascade.utils.rng.randn`, per image with
        :class:`~cascade.utils.rng.ImageGenerators`), in order: the augmentation noise, x_T, then
        the sampler's.
        """
        if lowres.ndim != 4 or lowres.shape[1] != 3:
            raise ValueError(f"lowres must be a (B, 3, H, W) batch, got shape {tuple(lowres.shape)}")
        if self.noise_augmentation and aug_level is None:
            aug_level = self.sample_aug_level
        cond_image, s_vec = self.sampling_condition(lowres, aug_level, generator)  # (B, 3, H, W), (B,) or None
        cond = self._cond(cond_image, s_vec)
        batch = lowres.shape[0]
        if self.class_conditional:
            if class_labels is None:
                class_labels = torch.full((batch,), self.null_label(net), dtype=torch.long, device=lowres.device)  # null class
            top = network_classes(net)  # None for a bare model function: its embedding checks the range itself
            if class_labels.shape != (batch,):
                raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
            last = None if top is None else (top if self.null_class else top - 1)
            if last is not None and bool(((class_labels < 0) | (class_labels > last)).any()):
                null = f" (or {top}, the null class)" if self.null_class else ""
                raise ValueError(f"class labels must be in 0..{top - 1}{null}, got {class_labels.tolist()}")
            cond["class_labels"] = class_labels.to(lowres.device)
        elif class_labels is not None:
            raise ValueError(f"stage {self.name!r} is not class-conditional; give no class")
        options = SamplingOptions(sampler=sampler, steps=steps, spacing=spacing, cfg_scale=cfg_scale, progress=progress)
        x_T = rng.randn(cond_image.shape, generator, device=lowres.device)  # (B, 3, H, W)
        out = self.run_sampler(net, x_T, cond, options, generator)  # (B, 3, H, W)
        if self.consistency_in_effect(enforce_consistency):
            out = self.make_consistent(out, lowres)
        return out

    def make_consistent(self, images: Tensor, lowres: Tensor) -> Tensor:
        """``images`` (B, 3, f·h, f·w) projected onto downsample(·) = ``lowres`` (B, 3, h, w), clamped to [−1, 1].

        The projection keeps what downsampling cannot see and replaces the rest by ``lowres``'s
        (:func:`~cascade.diffusion.consistency.project_onto_observation`); the clamp moves only pixels
        the projection pushed past the range.
        """
        return project_onto_observation(images, lowres, partial(downsample, factor=self.factor)).clamp(-1.0, 1.0)


# --- Super-resolving a user's image -----------------------------------------------------------------


def load_image(path: str | Path) -> Tensor:
    """An image file as float32 (3, H, W) in [−1, 1]; a clear error when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image_to_tensor(image)
    except OSError as error:
        raise ValueError(f"cannot read {path} as an image ({error})") from None


def prepare_lowres(image: Tensor, size: int) -> tuple[Tensor, list[str]]:
    """Fit a (3, H, W) image in [−1, 1] to the stage's (3, size, size) input; notes say what was changed.

    Non-square images are centre-cropped to a square; other sizes are resized with kornia
    (antialiased when shrinking, bicubic when enlarging).
    """
    notes: list[str] = []
    h, w = image.shape[-2:]
    if h != w:
        side = min(h, w)
        image = central_crop(image, side)
        notes.append(f"centre-cropped {w}x{h} to {side}x{side}")
    side = image.shape[-1]
    if side != size:
        image = kornia.geometry.transform.resize(
            image[None],
            (size, size),
            interpolation="bicubic" if side < size else "bilinear",
            align_corners=False,
            antialias=side > size,
        )[0].clamp(-1, 1)
        notes.append(
            f"resized {side}x{side} to the stage's low-res input {size}x{size}"
            + (" (antialiased)" if side > size else " (bicubic; the input had fewer pixels than the stage expects)")
        )
    return image, notes


def super_resolve(
    stage: UpsamplerStage,
    net: nn.Module,
    image: Tensor,
    *,
    class_label: int | None = None,
    aug_level: int | None = None,
    sampler: SamplerName = "dpmpp_2m",
    steps: int = 25,
    cfg_scale: float = 1.0,
    enforce_consistency: bool | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> tuple[Tensor, list[str]]:
    """Super-resolve one image (3, H, W) in [−1, 1] with a trained upsampler: (3, R, R) in [−1, 1] and notes.

    The image is first fitted to the stage's low-res input (:func:`prepare_lowres`).
    """
    device = next(net.parameters()).device
    lowres, notes = prepare_lowres(image.float(), stage.lowres_resolution)
    labels = None if class_label is None else torch.tensor([class_label], device=device)
    out = stage.sample(
        net,
        lowres[None].to(device),
        labels,
        aug_level=aug_level,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        enforce_consistency=enforce_consistency,
        generator=generator,
        progress=progress,
    )
    return out[0], notes
