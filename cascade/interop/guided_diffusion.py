"""OpenAI's guided-diffusion (ADM) checkpoints as cascade stage checkpoints (Dhariwal & Nichol 2021).

OpenAI released ImageNet models of "Diffusion Models Beat GANs on Image Synthesis" as bare
``state_dict`` files: class-conditional bases at 64, 128, 256 and 512px, an unconditional 256px
base, noisy classifiers at the same four resolutions, and 64→256 and 128→512 upsamplers. A file
holds tensors only; the flags it was trained with are in guided-diffusion's README. This module

1. recognises which release a file is from its own tensors (:func:`recognise`): the kind of
   network from the tensor names (a classifier's attention pool, an upsampler's 6-channel input
   conv, a class table or none), the width from the time embedding, the depth from the number of
   blocks, and the release whose flags give exactly the file's set of names and shapes;
2. renames the tensors to our :class:`~cascade.nn.UNet` / :class:`~cascade.nn.EncoderClassifier`
   (:func:`convert_state`): the same layers in the same order, and the same q/k/v layout through
   ``attention_order`` (ADM's "new" order for the 64px base, its legacy per-head order for every
   other released network; a classifier's attention pool always in the new order);
3. writes one of our self-describing stage checkpoints (:func:`convert`) whose config rebuilds the
   architecture and the noise process (T = 1000, ADM's schedule, learned-range Σ, no label dropout:
   no null class), with ImageNet's class names in ADM's label order (sorted synsets: 207 = golden
   retriever) and the source file's name and sha256.

Loading a source file never runs code (``torch.load(weights_only=True)``). A missing, damaged or
foreign file is a :class:`ConversionError` whose message says what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cascade.nn.layers import AttentionOrder

__all__ = [
    "RELEASES",
    "Release",
    "Recognised",
    "ConversionError",
    "read_state_dict",
    "recognise",
    "convert_state",
    "stage_config",
    "build_network",
    "imagenet_label_names",
    "convert",
]

Kind = Literal["generator", "upsampler", "classifier"]


@dataclass(frozen=True)
class Release:
    """One released file's architecture and noise process (guided-diffusion README flags)."""

    file: str  # the released file name
    kind: Kind
    stage_name: str  # our stage name for it
    resolution: int  # output (upsampler: hi-res) resolution
    channel_mult: tuple[float, ...]  # ADM's default multipliers for that resolution
    attention_resolutions: tuple[int, ...]
    schedule: Literal["cosine", "linear"]
    model_channels: int  # released width (num_channels / classifier_width)
    num_res_blocks: int  # released depth (num_res_blocks / classifier_depth)
    num_heads: int = 1  # heads where head_channels is None (num_heads)
    head_channels: int | None = 64  # num_head_channels
    attention_order: AttentionOrder = "legacy"  # use_new_attention_order=False is ADM's default
    class_conditional: bool = True
    dropout: float = 0.0
    lowres_resolution: int | None = None  # upsamplers: small_size


_M64, _M128, _M256, _M512 = (1, 2, 3, 4), (1, 1, 2, 3, 4), (1, 1, 2, 2, 4, 4), (0.5, 1, 1, 2, 2, 4, 4)
_A3 = (32, 16, 8)

RELEASES: tuple[Release, ...] = (
    Release("64x64_diffusion.pt", "generator", "base", 64, _M64, _A3, "cosine", 192, 3, attention_order="new", dropout=0.1),
    Release("128x128_diffusion.pt", "generator", "base128", 128, _M128, _A3, "linear", 256, 2, num_heads=4, head_channels=None),
    Release("256x256_diffusion.pt", "generator", "base256", 256, _M256, _A3, "linear", 256, 2),
    Release(
        "256x256_diffusion_uncond.pt", "generator", "base256_uncond", 256, _M256, _A3, "linear", 256, 2, class_conditional=False
    ),
    Release("512x512_diffusion.pt", "generator", "base512", 512, _M512, _A3, "linear", 256, 2),
    Release(
        "64_256_upsampler.pt",
        "upsampler",
        "sr256",
        256,
        _M256,
        _A3,
        "linear",
        192,
        2,
        num_heads=4,
        head_channels=None,
        lowres_resolution=64,
    ),
    Release("128_512_upsampler.pt", "upsampler", "sr512", 512, _M256, (32, 16), "linear", 192, 2, lowres_resolution=128),
    Release("64x64_classifier.pt", "classifier", "classifier", 64, _M64, _A3, "cosine", 128, 4),
    Release("128x128_classifier.pt", "classifier", "classifier128", 128, _M128, _A3, "linear", 128, 2),
    Release("256x256_classifier.pt", "classifier", "classifier256", 256, _M256, _A3, "linear", 128, 2),
    Release("512x512_classifier.pt", "classifier", "classifier512", 512, _M512, _A3, "linear", 128, 2),
)

NUM_TRAIN_STEPS = 1000  # every release: diffusion_steps 1000, no timestep rescaling
CLASSIFIER_POOL_HEAD_CHANNELS = 64  # create_classifier: num_head_channels=64, pool heads = channels // 64


class ConversionError(ValueError):
    """A file that cannot be converted; the message names the problem and the fix."""


@dataclass(frozen=True)
class Recognised:
    """What a file is: its release's flags, and the width, depth and heads read from its tensors."""

    release: Release
    model_channels: int
    num_res_blocks: int
    num_classes: int | None  # None: unconditional
    out_channels: int  # 6: learned Σ (ε, then the variance interpolation v)
    in_channels: int = field(default=3)  # channels of x_t (upsamplers: plus 3 low-res channels)

    @property
    def released_size(self) -> bool:
        """Whether width and depth are those of the released file (reduced copies convert too)."""
        return (self.model_channels, self.num_res_blocks) == (self.release.model_channels, self.release.num_res_blocks)

    def describe(self) -> str:
        r = self.release
        size = "the released size" if self.released_size else "NOT the released size"
        classes = f"{self.num_classes} classes" if self.num_classes is not None else "unconditional"
        return (
            f"{r.file} architecture ({r.kind}, {r.resolution}px, width {self.model_channels}, {self.num_res_blocks} res blocks: "
            f"{size}; {classes}; {r.attention_order} q/k/v order; {r.schedule} schedule)"
        )


# --- reading a file ---------------------------------------------------------------------------------------


def _sha256(path: Path, progress: bool) -> str:
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    bar = tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256", disable=None if progress else True, leave=False
    )
    with path.open("rb") as f, bar:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def read_state_dict(path: str | Path, *, progress: bool = False) -> tuple[dict[str, Tensor], str]:
    """A guided-diffusion file's tensors (loaded with ``weights_only=True``: no code runs) and the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; pass the path of a downloaded guided-diffusion .pt file")
    digest = _sha256(path, progress)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, not a torch file, or pickled code
        raise ConversionError(
            f"{path} cannot be read as a weights-only torch file ({type(error).__name__}); "
            f"it is damaged or not a checkpoint: download it again"
        ) from None
    if isinstance(state, dict) and "format" in state and "config" in state:
        raise ConversionError(f"{path} is already a cascade checkpoint; use it directly, it needs no conversion")
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise ConversionError(
            f"{path} is not a guided-diffusion state dict (a flat mapping of names to tensors); "
            f"pass one of OpenAI's released .pt files"
        )
    return state, digest


# --- recognising a file -----------------------------------------------------------------------------------


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """How many numbered children ``prefix.<i>.…`` the names show."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    indices = [int(m.group(1)) for name in state if (m := pattern.match(name))]
    return max(indices) + 1 if indices else 0


def _kind_of(state: dict[str, Tensor]) -> Literal["unet", "classifier"]:
    if "time_embed.0.weight" not in state or "input_blocks.0.0.weight" not in state:
        raise ConversionError(
            "the file holds no guided-diffusion network (no time_embed / input_blocks tensors); "
            "pass one of OpenAI's released ADM .pt files"
        )
    if "out.2.c_proj.weight" in state and "out.2.positional_embedding" in state:
        return "classifier"
    if "out.2.weight" in state and "output_blocks.0.0.in_layers.0.weight" in state:
        return "unet"
    raise ConversionError(
        "the file is an ADM network of a kind that was not released (no U-Net output blocks, no attention-pool "
        "classifier head); only the released ImageNet models convert"
    )


def _hypotheses(state: dict[str, Tensor]) -> list[Recognised]:
    """Every release whose level count fits the file's block count, with the width and depth read from the tensors."""
    kind = _kind_of(state)
    model_channels = int(state["time_embed.0.weight"].shape[1])
    in_channels = int(state["input_blocks.0.0.weight"].shape[1])
    found = []
    for release in RELEASES:
        if (release.kind == "classifier") != (kind == "classifier"):
            continue
        levels = len(release.channel_mult)
        blocks = _count(state, "output_blocks") if kind == "unet" else _count(state, "input_blocks")
        if blocks % levels or blocks // levels < 2:  # U-Net: levels·(N + 1) output blocks; encoder: levels·(N + 1) input blocks
            continue
        if kind == "classifier":
            num_classes: int | None = int(state["out.2.c_proj.weight"].shape[0])
            out_channels = num_classes
        else:
            num_classes = int(state["label_emb.weight"].shape[0]) if "label_emb.weight" in state else None
            if (num_classes is not None) != release.class_conditional:
                continue
            out_channels = int(state["out.2.weight"].shape[0])
        x_channels = in_channels - 3 if release.kind == "upsampler" else in_channels
        found.append(Recognised(release, model_channels, blocks // levels - 1, num_classes, out_channels, x_channels))
    return found


_RESBLOCK = {
    "in_layers.0.": "in_norm.",
    "in_layers.2.": "in_conv.",
    "emb_layers.1.": "emb_proj.",
    "out_layers.0.": "out_norm.",
    "out_layers.3.": "out_conv.",
    "skip_connection.": "skip.",
}
_LAYER = {**_RESBLOCK, "norm.": "norm.", "qkv.": "qkv.", "proj_out.": "proj.", "op.": "op.", "conv.": "conv."}


def _layer_name(rest: str) -> str | None:
    for adm, ours in _LAYER.items():
        leaf = rest[len(adm) :]
        if rest.startswith(adm) and leaf in ("weight", "bias"):
            return ours + leaf
    return None


def _our_name(name: str, classifier: bool) -> str | None:
    """Our parameter name for an ADM one, or None when the name is not one the released networks have."""
    fixed = {
        "time_embed.0.weight": "time_embed.mlp.0.weight",
        "time_embed.0.bias": "time_embed.mlp.0.bias",
        "time_embed.2.weight": "time_embed.mlp.2.weight",
        "time_embed.2.bias": "time_embed.mlp.2.bias",
        "input_blocks.0.0.weight": "encoder.input_conv.weight",
        "input_blocks.0.0.bias": "encoder.input_conv.bias",
    }
    if classifier:
        fixed |= {
            "out.0.weight": "norm.weight",
            "out.0.bias": "norm.bias",
            "out.2.positional_embedding": "pool.pos_emb",
            "out.2.qkv_proj.weight": "pool.qkv.weight",
            "out.2.qkv_proj.bias": "pool.qkv.bias",
            "out.2.c_proj.weight": "pool.out.weight",
            "out.2.c_proj.bias": "pool.out.bias",
        }
    else:
        fixed |= {
            "label_emb.weight": "class_embed.weight",
            "out.0.weight": "out.0.weight",
            "out.0.bias": "out.0.bias",
            "out.2.weight": "out.2.weight",
            "out.2.bias": "out.2.bias",
        }
    if name in fixed:
        return fixed[name]
    patterns = [
        (r"input_blocks\.(\d+)\.(\d+)\.(.+)", lambda i, j: f"encoder.blocks.{int(i) - 1}.{j}."),
        (r"middle_block\.(\d+)\.(.+)", lambda j: f"encoder.middle.{j}."),
    ]
    if not classifier:
        patterns.append((r"output_blocks\.(\d+)\.(\d+)\.(.+)", lambda i, j: f"decoder.{i}.{j}."))
    for pattern, prefix in patterns:
        if (m := re.fullmatch(pattern, name)) and not name.startswith("input_blocks.0."):
            *index, rest = m.groups()
            layer = _layer_name(rest)
            return None if layer is None else prefix(*index) + layer
    return None


def _adapt(name: str, tensor: Tensor) -> Tensor:
    """ADM's 1×1 Conv1d projections of the attention pool are our Linear layers; its positional embedding is (C, T+1)."""
    if name == "out.2.positional_embedding":
        return tensor.t().contiguous()  # (T + 1, C)
    if name in ("out.2.qkv_proj.weight", "out.2.c_proj.weight"):
        return tensor[..., 0]  # (out, C)
    return tensor


def convert_state(state: dict[str, Tensor], classifier: bool) -> dict[str, Tensor]:
    """The tensors under our names (values shared with ``state`` where no reshaping is needed)."""
    out = {}
    for name, tensor in state.items():
        ours = _our_name(name, classifier)
        if ours is None:
            raise ConversionError(
                f"tensor {name!r} is not part of any released guided-diffusion network; "
                f"the file is not an unmodified ADM checkpoint"
            )
        out[ours] = _adapt(name, tensor)
    return out


def recognise(state: dict[str, Tensor]) -> Recognised:
    """The release a state dict is from: the one hypothesis whose network has exactly the file's names and shapes."""
    hypotheses = _hypotheses(state)
    classifier = _kind_of(state) == "classifier"
    try:
        shapes = {name: tuple(t.shape) for name, t in convert_state(state, classifier).items()}
    except ConversionError:
        shapes = None
    matches = []
    for rec in hypotheses:
        try:
            with torch.device("meta"):
                net = build_network(stage_config(rec), rec.num_classes or 1000)
        except ValueError:  # e.g. widths this release's heads or groups cannot split
            continue
        if shapes is not None and {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes:
            matches.append(rec)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        tried = ", ".join(sorted({h.release.file for h in hypotheses})) or "none fits its block count"
        raise ConversionError(
            f"the file's tensors match no released guided-diffusion architecture (tried {tried}); "
            f"only OpenAI's released ImageNet .pt files (or copies with other widths/depths) convert"
        )
    raise ConversionError(
        f"the file's tensors fit several releases ({', '.join(m.release.file for m in matches)}); cannot tell which"
    )


# --- our configuration ------------------------------------------------------------------------------------


def _schedule(rec: Recognised) -> dict[str, Any]:
    return {"_target_": f"cascade.diffusion.schedules.{rec.release.schedule}_schedule", "num_steps": NUM_TRAIN_STEPS}


def stage_config(rec: Recognised, name: str | None = None) -> dict[str, Any]:
    """The stage config (hydra ``_target_`` form) that rebuilds the release's network and noise process.

    Generators and upsamplers: ε prediction with learned-range Σ (ADM's hybrid loss: λ = 0.001
    on the summed VLB) or a fixed large Σ when the file has 3 output channels; no label dropout,
    so the network has no null-class row. Upsamplers: no noise-conditioning augmentation, low-res
    input resized bilinearly (ADM's ``SuperResModel``).
    """
    r = rec.release
    net: dict[str, Any] = {
        "_partial_": True,
        "model_channels": rec.model_channels,
        "channel_mult": list(r.channel_mult),
        "num_res_blocks": rec.num_res_blocks,
        "attention_resolutions": list(r.attention_resolutions),
        "num_heads": r.num_heads,
        "head_channels": r.head_channels,
        "attention_order": r.attention_order,
        "dropout": r.dropout,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
        "grad_checkpointing": False,
        "middle_attention": True,
        "norm_groups": 32,
    }
    if r.kind == "classifier":
        net = {"_target_": "cascade.nn.EncoderClassifier", **net, "pool_head_channels": CLASSIFIER_POOL_HEAD_CHANNELS}
        return {
            "_target_": "stages.classifier.ClassifierStage",
            "name": name or r.stage_name,
            "resolution": r.resolution,
            "net": net,
            "schedule": _schedule(rec),
        }
    net = {"_target_": "cascade.nn.UNet", **net, "null_class": False}
    learned = rec.out_channels == 2 * rec.in_channels
    objective = {
        "_target_": "cascade.diffusion.losses.DiffusionLoss",
        "parameterization": "eps",
        "learned_variance": learned,
        "vb_weight": 0.001,
    }
    config: dict[str, Any] = {
        "_target_": "stages.base.BaseStage",
        "name": name or r.stage_name,
        "resolution": r.resolution,
        "class_conditional": r.class_conditional,
        "p_uncond": 0.0,
        "fixed_variance": "large",
        "net": net,
        "schedule": _schedule(rec),
        "objective": objective,
    }
    if r.kind == "upsampler":
        config |= {
            "_target_": "stages.upsampler.UpsamplerStage",
            "lowres_resolution": r.lowres_resolution,
            "noise_augmentation": False,
            "lowres_upsample": "bilinear",
        }
    return config


_KINDS: dict[str, Kind] = {
    "stages.base.BaseStage": "generator",
    "stages.upsampler.UpsamplerStage": "upsampler",
    "stages.classifier.ClassifierStage": "classifier",
}


def build_network(config: dict[str, Any], num_classes: int) -> nn.Module:
    """The network a converted stage config describes, built from ``cascade.nn`` alone (no stage objects).

    What the stage fills in at build time (resolution, classes, output and low-res channels) is
    derived here from the same config, so converted checkpoints can be checked and used at the
    network level.
    """
    kind = _KINDS.get(config["_target_"])
    if kind is None:
        raise ValueError(f"not a converted guided-diffusion stage config: {config['_target_']!r}")
    from cascade.nn import EncoderClassifier, UNet

    net = {k: v for k, v in config["net"].items() if k not in ("_target_", "_partial_")}
    if kind == "classifier":
        return EncoderClassifier(resolution=config["resolution"], num_classes=num_classes, **net)
    out_channels = 6 if config["objective"]["learned_variance"] else 3
    return UNet(
        resolution=config["resolution"],
        num_classes=num_classes if config["class_conditional"] else None,
        out_channels=out_channels,
        lowres_channels=3 if kind == "upsampler" else 0,
        aug_level_embedding=False,
        **net,
    )


def imagenet_label_names() -> list[str]:
    """ImageNet-1k class names in ADM's label order: the sorted synsets (index 207 = "golden retriever")."""
    from timm.data import ImageNetInfo

    from cascade.data.imagefolder import imagenet_class_names

    names = imagenet_class_names(sorted(ImageNetInfo("imagenet-1k").label_names()))
    if names is None or len(names) != 1000:
        raise ConversionError("the ImageNet class names are unavailable (timm's synset list); reinstall timm")
    return names


# --- the whole conversion ---------------------------------------------------------------------------------


def convert(path: str | Path, out: str | Path, *, name: str | None = None, progress: bool = False) -> tuple[Recognised, Path]:
    """Convert one guided-diffusion file into a cascade stage checkpoint at ``out``; returns what it was and the path.

    The checkpoint holds the stage config (``config["stage"]``), ImageNet class names in ADM's
    order, the weights as both ``model`` and ``ema`` (the same tensors, stored once), and
    ``source`` = {format, file, sha256, release, released_size}.
    """
    from cascade.training.checkpoint import save_checkpoint

    path = Path(path)
    state, digest = read_state_dict(path, progress=progress)
    rec = recognise(state)
    weights = convert_state(state, rec.release.kind == "classifier")
    class_names = imagenet_label_names()
    if rec.num_classes is not None and rec.num_classes != len(class_names):
        raise ConversionError(
            f"the file has {rec.num_classes} classes, not ImageNet's {len(class_names)}; it is not a released model"
        )
    source = {
        "format": "guided-diffusion",
        "file": path.name,
        "sha256": digest,
        "release": rec.release.file,
        "released_size": rec.released_size,
    }
    stage = stage_config(rec, name)
    payload = {
        "stage": stage["name"],
        "config": {"stage": stage, "source": source},
        "class_names": class_names,
        "resolution": rec.release.resolution,
        "step": 0,
        "model": weights,
        "ema": weights,
        "source": source,
    }
    return rec, save_checkpoint(payload, out)
