"""DINOv2 ViT-L/14 features for FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"; EDM2).

EDM2's ``calculate_metrics.py`` (after dgm-eval) feeds uint8 images resized to 224×224 (bicubic,
antialiased), scaled to [0, 1] and normalised with ImageNet's mean and std, to
``dinov2_vitl14`` from torch hub, and takes its output: the final-norm class token, 1024-d.

Here the architecture is timm's ``vit_large_patch14_dinov2`` built with ``pretrained=False`` at
224px and the weights come from a file the user supplies (nothing is downloaded): either the
original DINOv2 checkpoint (``dinov2_vitl14_pretrain.pth``: keys as in facebookresearch/dinov2,
with ``mask_token`` and a 37×37 position grid for 518px) or a timm state dict. The original's
position embeddings are resampled once to the 16×16 grid of 224px inputs the way DINOv2 does it
at run time (bicubic, scale factor (16 + 0.1) / 37, no antialiasing), so the features follow the
hub model's computation.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.evaluation.features import FeatureError

__all__ = ["DINOV2_ARCH", "DINOV2_FILE", "DinoV2Features", "dinov2_network", "convert_dinov2_state"]

DINOV2_ARCH = "vit_large_patch14_dinov2"
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
INPUT = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_OFFSET = 0.1  # DINOv2's interpolate_offset


def _resample_grid(pos_embed: Tensor, grid: int) -> Tensor:
    """Position embeddings (1, 1 + M², D) → (1, 1 + grid², D) as DINOv2's ``interpolate_pos_encoding`` resizes them."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    m = int(round(patches.shape[1] ** 0.5))
    if m * m != patches.shape[1]:
        raise FeatureError(f"position embeddings of {patches.shape[1]} patches do not form a square grid")
    if m == grid:
        return pos_embed
    scale = (grid + _OFFSET) / m
    resized = F.interpolate(
        patches.reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(scale, scale), mode="bicubic", antialias=False
    )  # (1, D, grid, grid)
    if resized.shape[-1] != grid:
        raise FeatureError(f"resampling a {m}x{m} position grid gave {resized.shape[-1]}x{resized.shape[-1]}, not {grid}x{grid}")
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


def convert_dinov2_state(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A DINOv2 (original or timm) state dict → ``model``'s keys and position grid; the head and ``mask_token`` dropped."""
    state = dict(state.get("model", state)) if isinstance(state.get("model", None), dict) else dict(state)
    state.pop("mask_token", None)  # masked-image-modelling token: unused for features
    for key in [k for k in state if k.startswith("head.")]:
        state.pop(key)
    renamed = {}
    for key, value in state.items():  # SwiGLU variants (ViT-g) name their MLP w12 / w3
        renamed[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    if "pos_embed" in renamed:
        grid = model.patch_embed.grid_size[0]
        renamed["pos_embed"] = _resample_grid(renamed["pos_embed"], grid)
    return renamed


def dinov2_network(
    weights: str | Path, *, arch: str = DINOV2_ARCH, device: torch.device | str = "cpu", **model_kwargs: object
) -> nn.Module:
    """timm's ``arch`` at 224px without a head, with the weights of ``weights`` (strict: every key must match)."""
    fix = f"pass the DINOv2 ViT-L/14 weights file ({DINOV2_FILE}, from {DINOV2_URL} on a connected machine)"
    if not Path(weights).is_file():
        raise FeatureError(f"dinov2 weights {weights} do not exist; {fix}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # not a tensor file
        raise FeatureError(f"{weights} is not a loadable weights file ({type(error).__name__}); {fix}") from None
    if not isinstance(state, dict):
        raise FeatureError(f"{weights} holds a {type(state).__name__}, not a state dict; {fix}")
    net = timm.create_model(arch, pretrained=False, num_classes=0, img_size=INPUT, **model_kwargs)
    converted = convert_dinov2_state(state, net)
    missing, unexpected = net.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise FeatureError(
            f"{weights} does not fit {arch}: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); {fix}"
        )
    return net.to(device).eval()


class DinoV2Features:
    """The DINOv2 class token (B, 1024) of images in [−1, 1], preprocessed as EDM2 does; no class probabilities."""

    input_size = None

    def __init__(self, net: nn.Module, *, description: str) -> None:
        self.net, self.description = net.eval(), description
        self.device = next(net.parameters()).device

    @classmethod
    def from_file(cls, weights: str | Path, device: torch.device, arch: str = DINOV2_ARCH) -> DinoV2Features:
        net = dinov2_network(weights, arch=arch, device=device)
        return cls(net, description=f"dinov2: {arch} (timm) class token at 224px, weights {weights}")

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()  # (B, 3, H, W) the uint8 values, as float
        x = F.interpolate(pixels.to(self.device), size=(INPUT, INPUT), mode="bicubic", antialias=True) / 255  # (B, 3, 224, 224)
        mean = torch.tensor(MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device).reshape(1, 3, 1, 1)
        features = self.net((x - mean) / std)  # (B, D)
        return features.float().cpu(), torch.zeros(len(images), 0)
