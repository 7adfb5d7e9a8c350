"""The built-in data set: procedurally rendered, class-conditional coloured shapes.

Every image is a *scene* described by a few numbers (:class:`ShapeParams`) drawn from a
``torch.Generator`` seeded by ``(seed, split, index)``; :func:`render_shape` turns a scene
into pixels at any resolution. Geometry lives in normalised coordinates ([-1, 1] across
the image), so the same index rendered at 64, 256 and 1024 px shows the same scene.

Rendering is analytic and antialiased: every edge is a signed-distance function (SDF)
passed through a one-pixel linear ramp (≈ a box filter of the edge), and every periodic
texture fades to its exact area mean as its frequency approaches the pixel Nyquist
limit. Rendering at a low resolution therefore approximates the antialiased
downsampling of a high-resolution render, with no supersampling.

Structure at every scale, so each cascade stage has something to learn:

* 64 px: the object's **shape** and **colour** give the class (10 classes);
* 256 px: a class-specific **texture** inside the object (period ≈ 1/48 of the image,
  ~5 px at 256, above Nyquist at 64 so it renders as its mean colour there);
* 1024 px: a thin **outline** (~3 px at 1024) and a **fine hatching** on the background
  and inside the object (period ≈ 5 px at 1024, above Nyquist at 256).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cascade.data.domain import ImageDomain
from cascade.data.windows import WindowSource
from cascade.utils.rng import keyed_seed

__all__ = ["ShapesDataset", "ShapeParams", "sample_shape_params", "redraw_unresolved", "render_shape", "SHAPE_CLASSES"]

Split = Literal["train", "test"]
RGB = tuple[float, float, float]
Window = tuple[int, int, int, int]  # (top, left, height, width) in pixels

# (colour name, base RGB, shape, texture) per class; the class name is "<colour> <shape> with <texture>".
SHAPE_CLASSES: tuple[tuple[str, RGB, str, str], ...] = (
    ("red", (0.86, 0.16, 0.16), "disc", "stripes"),
    ("orange", (0.98, 0.55, 0.10), "square", "checks"),
    ("yellow", (0.96, 0.86, 0.18), "triangle", "dots"),
    ("green", (0.20, 0.68, 0.26), "ring", "waves"),
    ("cyan", (0.16, 0.76, 0.86), "cross", "grid"),
    ("blue", (0.20, 0.36, 0.92), "star", "concentric rings"),
    ("purple", (0.58, 0.28, 0.82), "hexagon", "bricks"),
    ("pink", (0.96, 0.48, 0.72), "ellipse", "chevrons"),
    ("brown", (0.58, 0.36, 0.17), "diamond", "circles"),
    ("white", (0.93, 0.93, 0.90), "crescent", "dashes"),
)

# Frequencies in cycles per normalised unit (the image spans 2 units).
_TEXTURE_FREQ = (20.0, 28.0)  # period 4.6–6.4 px at 256 px, 1.1–1.6 px at 64 px (aliased → mean)
_HATCH_FREQ = (90.0, 115.0)  # period 4.5–5.7 px at 1024 px, 1.1–1.4 px at 256 px (→ mean)
_OUTLINE_WIDTH = (0.005, 0.007)  # 2.6–3.6 px at 1024 px
_HATCH_AMP = 0.12  # relative brightness modulation of the fine hatching
_FADE = (0.22, 0.42)  # texture fades to its mean between these cycles-per-pixel
_SPLIT_IDS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class ShapeParams:
    """One scene, in normalised image coordinates (x right, y down, both in [-1, 1])."""

    label: int  # class index into SHAPE_CLASSES
    center: tuple[float, float]  # object centre (x, y)
    size: float  # object radius (circumradius-like), normalised units
    angle: float  # object rotation, radians
    aspect: float  # minor/major ratio for ellipse / diamond, in (0, 1]
    color: RGB  # object main colour, [0, 1]
    pattern_color: RGB  # texture colour, [0, 1]
    outline_color: RGB  # outline band colour, [0, 1]
    bg_colors: tuple[RGB, RGB]  # background gradient end colours, [0, 1]
    bg_angle: float  # gradient direction, radians
    texture_freq: float  # cycles per unit of the class texture
    texture_phase: tuple[float, float]  # texture offset in periods, [0, 1)^2
    hatch_freq: float  # cycles per unit of the fine hatching
    hatch_angle: float  # background hatching direction, radians
    outline_width: float  # outline band width, normalised units


# ----------------------------------------------------------------------------- sampling


def _generator_for(seed: int, split: Split, index: int) -> torch.Generator:
    """A generator seeded by a stable hash of (seed, split, index) — never the global RNG."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return torch.Generator().manual_seed(keyed_seed(b"shapes-v1", seed, _SPLIT_IDS[split], index))


def _luminance(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _clip(c: tuple[float, ...]) -> RGB:
    return tuple(min(max(x, 0.0), 1.0) for x in c)  # type: ignore[return-value]


def _background_value(u: float, avoid: float) -> float:
    """A value in [0.08, 0.92] at least 0.28 away from the object's luminance ``avoid``."""
    lo, hi, gap = 0.08, 0.92, 0.28
    first = max(0.0, avoid - gap - lo)  # length of [lo, avoid - gap]
    second = max(0.0, hi - (avoid + gap))  # length of [avoid + gap, hi]
    t = u * (first + second)
    return lo + t if t < first else avoid + gap + (t - first)


def sample_shape_params(*, seed: int, split: Split, index: int, num_classes: int = 10) -> ShapeParams:
    """Draw the scene of item ``index``: label = index % num_classes, the rest from the generator."""
    label = index % num_classes
    _, base, shape, _ = SHAPE_CLASSES[label]
    r = torch.rand(24, generator=_generator_for(seed, split, index), dtype=torch.float64).tolist()
    size = 0.40 + 0.22 * r[0]
    reach = 0.92 - 1.15 * size  # keep the (rotated) object inside the frame
    center = (reach * (2 * r[1] - 1), reach * (2 * r[2] - 1))
    angle = 2 * math.pi * r[3]
    aspect = 0.50 + 0.20 * r[4] if shape in ("ellipse", "diamond") else 1.0
    gain = 0.88 + 0.20 * r[5]
    color = _clip(tuple(gain * c + 0.06 * (r[6 + k] - 0.5) for k, c in enumerate(base)))
    lum = _luminance(color)
    # texture: a lighter tint of dark colours, a darker shade of light ones
    pattern = _clip(tuple(c * 0.55 for c in color) if lum > 0.5 else tuple(c + 0.55 * (1 - c) for c in color))
    outline = _clip(tuple(c * 0.30 for c in color))
    hue, sat = r[9], 0.06 + 0.22 * r[10]
    v1 = _background_value(r[11], lum)
    v2 = min(max(v1 + (0.10 + 0.15 * r[12]) * (1 if v1 < 0.5 else -1), 0.04), 0.96)
    bg = (colorsys.hsv_to_rgb(hue, sat, v1), colorsys.hsv_to_rgb((hue + 0.1 * r[13]) % 1, sat, v2))
    return ShapeParams(
        label=label,
        center=center,
        size=size,
        angle=angle,
        aspect=aspect,
        color=color,
        pattern_color=pattern,
        outline_color=outline,
        bg_colors=bg,  # type: ignore[arg-type]
        bg_angle=2 * math.pi * r[14],
        texture_freq=_TEXTURE_FREQ[0] + (_TEXTURE_FREQ[1] - _TEXTURE_FREQ[0]) * r[15],
        texture_phase=(r[16], r[17]),
        hatch_freq=_HATCH_FREQ[0] + (_HATCH_FREQ[1] - _HATCH_FREQ[0]) * r[18],
        hatch_angle=math.pi * (0.15 + 0.2 * r[19]) * (1 if r[20] < 0.5 else -1),
        outline_width=_OUTLINE_WIDTH[0] + (_OUTLINE_WIDTH[1] - _OUTLINE_WIDTH[0]) * r[21],
    )


# ----------------------------------------------------------------------------- SDF helpers


def _ramp(d: Tensor, px: float) -> Tensor:
    """Coverage of the region d < 0 by a pixel of width px: a one-pixel linear edge ramp."""
    return (0.5 - d / px).clamp_(0.0, 1.0)


def _bands(t: Tensor, freq: float, duty: float, px: float) -> Tensor:
    """Antialiased parallel bands of width duty/freq centred on the multiples of 1/freq of t."""
    ft = t * freq
    dist = (ft - ft.round()).abs_().div_(freq)  # distance to the nearest band centre
    return _ramp(dist - duty / (2 * freq), px)


def _fade(freq: float, px: float) -> float:
    """Contrast left to a texture of ``freq`` cycles/unit at pixel size ``px`` (1 → full, 0 → mean)."""
    x = (freq * px - _FADE[0]) / (_FADE[1] - _FADE[0])
    x = min(max(x, 0.0), 1.0)
    return 1.0 - x * x * (3 - 2 * x)


def _box(u: Tensor, v: Tensor, a: float, b: float) -> Tensor:
    """Exact SDF of the axis-aligned box with half-sizes (a, b)."""
    qu, qv = u.abs() - a, v.abs() - b
    outside = torch.hypot(qu.clamp(min=0), qv.clamp(min=0))
    return outside + torch.maximum(qu, qv).clamp_(max=0)


def _polygon(u: Tensor, v: Tensor, n: int, apothem: float, phase: float) -> Tensor:
    """SDF (exact inside and on edges) of a regular convex n-gon: max over edge half-planes."""
    d = None
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        e = u * math.cos(a) + v * math.sin(a) - apothem
        d = e if d is None else torch.maximum(d, e)
    assert d is not None
    return d


def _star(u: Tensor, v: Tensor, outer: float, inner: float, n: int = 5) -> Tensor:
    """SDF of an n-pointed star (tips at radius ``outer``, notches at ``inner``) by angular folding."""
    sector = math.pi / n
    theta = torch.atan2(u, -v)  # angle from the up (−y) direction, where a tip points
    k = torch.round(theta * (0.5 / sector)).long().remainder_(n)  # nearest tip, (h, w)
    tips = torch.arange(n, dtype=torch.float64) * (2 * sector)
    c, s = torch.cos(tips).float()[k], torch.sin(tips).float()[k]  # table look-up, no per-pixel trig
    qx = s * u - c * v  # rotate the point onto the tip at +x
    qy = (c * u + s * v).abs_()  # and mirror into the half sector [0, sector]
    ax, bx, by = outer, inner * math.cos(sector), inner * math.sin(sector)
    ex, ey = bx - ax, by
    h = (((qx - ax) * ex + qy * ey) * (1 / (ex * ex + ey * ey))).clamp_(0, 1)
    dist = torch.hypot(qx - ax - h * ex, qy - h * ey)
    side = ((qx - ax) * ey - qy * ex).sign_()  # < 0 inside (left of the tip→notch edge)
    return dist * side


def _shape_sdf(shape: str, u: Tensor, v: Tensor, s: float, aspect: float) -> Tensor:
    """Signed distance (normalised units, < 0 inside) of the class shape with radius s."""
    if shape == "disc":
        return torch.hypot(u, v) - s
    if shape == "square":
        return _box(u, v, 0.78 * s, 0.78 * s)
    if shape == "triangle":
        return _polygon(u, v, 3, 0.55 * s, math.pi / 2)  # a vertex points up
    if shape == "ring":
        return (torch.hypot(u, v) - 0.74 * s).abs_() - 0.26 * s
    if shape == "cross":
        return torch.minimum(_box(u, v, s, 0.32 * s), _box(u, v, 0.32 * s, s))
    if shape == "star":
        return _star(u, v, 1.05 * s, 0.48 * s)
    if shape == "hexagon":
        return _polygon(u, v, 6, 0.88 * s, 0.0)
    if shape == "ellipse":  # first-order distance k−1 / |∇k| of k = |(u/a, v/b)|
        a, b = s, aspect * s
        k = torch.hypot(u / a, v / b)
        grad = torch.hypot(u / (a * a), v / (b * b)).clamp_(min=1e-6)
        return (k - 1) * k / grad
    if shape == "diamond":
        a, b = s, aspect * s
        return (u.abs() / a + v.abs() / b - 1) / math.hypot(1 / a, 1 / b)
    if shape == "crescent":
        disc = torch.hypot(u, v) - s
        bite = torch.hypot(u - 0.45 * s, v + 0.10 * s) - 0.82 * s
        return torch.maximum(disc, -bite)
    raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------- textures

# A texture maps object-local coordinates (u, v), its base frequency (cycles/unit), a phase
# (periods) and the pixel size to an antialiased coverage in [0, 1] (0 → object colour,
# 1 → pattern colour); its exact area mean is listed beside it in _TEXTURES.
Texture = Callable[[Tensor, Tensor, float, tuple[float, float], float], Tensor]


def _lattice(u: Tensor, v: Tensor, f: float, phase: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Offsets (units) from the nearest node of the square lattice of period 1/f."""
    fu, fv = u * f + phase[0], v * f + phase[1]
    return (fu - fu.round()) / f, (fv - fv.round()) / f


def _tex_stripes(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    return _bands(u + ph[0] / f, f, 0.5, px)


def _tex_checks(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    a, b = _bands(u + ph[0] / f, f, 0.5, px), _bands(v + ph[1] / f, f, 0.5, px)
    return a + b - 2 * a * b  # soft XOR


def _tex_dots(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    du, dv = _lattice(u, v, f, ph)
    return _ramp(torch.hypot(du, dv) - 0.32 / f, px)


def _tex_waves(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    k = 2 * math.pi * f / 3  # one wave every three band periods
    amp = 0.35 / f  # sideways swing of the bands
    w = u + amp * torch.sin(v * k) + ph[0] / f
    slope = math.sqrt(1 + 0.5 * (amp * k) ** 2)  # RMS |∇w|: widen the ramp to ~1 px in image space
    return _bands(w, f, 0.5, px * slope)


def _tex_grid(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    a, b = _bands(u + ph[0] / f, f, 0.3, px), _bands(v + ph[1] / f, f, 0.3, px)
    return a + b - a * b


def _tex_rings(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    return _bands(torch.hypot(u, v) + ph[0] / f, f, 0.5, px)


def _tex_bricks(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    rows = v * f + ph[1]  # one brick row per period
    shift = 0.5 * torch.remainder(rows.floor(), 2.0)  # every other row shifted half a brick
    mortar_h = _bands(v + ph[1] / f, f, 0.25, px)
    mortar_v = _bands(u + (ph[0] + shift) * (2 / f), f / 2, 0.125, px)
    return mortar_h + mortar_v - mortar_h * mortar_v


def _tex_chevrons(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    tv = v * (f / 2) + ph[1]
    zig = (tv - tv.round()).abs_() * (2 / f)  # triangle wave, slope ±1
    return _bands((u + zig) * math.sqrt(0.5) + ph[0] / f, f, 0.5, px)


def _tex_circles(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    du, dv = _lattice(u, v, f * 0.6, ph)
    return _ramp((torch.hypot(du, dv) - 0.50 / f).abs_() - 0.13 / f, px)


def _tex_dashes(u: Tensor, v: Tensor, f: float, ph: tuple[float, float], px: float) -> Tensor:
    return _bands(u + ph[0] / f, f, 0.5, px) * _bands(v + ph[1] / f * 3, f / 3, 0.6, px)


# texture name → (function, exact area mean of its coverage): what it fades to past Nyquist
_TEXTURES: dict[str, tuple[Texture, float]] = {
    "stripes": (_tex_stripes, 0.5),
    "checks": (_tex_checks, 0.5),
    "dots": (_tex_dots, math.pi * 0.32**2),  # disc area / cell area
    "waves": (_tex_waves, 0.5),
    "grid": (_tex_grid, 1 - 0.7**2),  # 1 − (1 − line duty)²
    "concentric rings": (_tex_rings, 0.5),
    "bricks": (_tex_bricks, 1 - 0.75 * 0.875),  # 1 − brick area fraction
    "chevrons": (_tex_chevrons, 0.5),
    "circles": (_tex_circles, 2 * math.pi * 0.50 * 0.26 * 0.6**2),  # annulus area / cell area
    "dashes": (_tex_dashes, 0.5 * 0.6),
}


# ----------------------------------------------------------------------------- rendering


@lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> Tensor:
    """Normalised coordinates of the pixel centres along one axis, (R,)."""
    return (torch.arange(resolution, dtype=torch.float32) + 0.5) * (2.0 / resolution) - 1.0


def _colour(c: RGB) -> Tensor:
    return torch.tensor(c, dtype=torch.float32).view(3, 1, 1)


def _hatch(x: Tensor, y: Tensor, p: ShapeParams, angle: float, px: float) -> Tensor | None:
    """Brightness factor of the fine hatching, mean exactly 1, or None where it is invisible."""
    fade = _fade(p.hatch_freq, px)
    if fade == 0.0:
        return None
    lines = _bands(x * math.cos(angle) + y * math.sin(angle), p.hatch_freq, 0.35, px)  # (H, W)
    return 1.0 - (_HATCH_AMP * fade) * (lines - 0.35)


def _background(x: Tensor, y: Tensor, p: ShapeParams, px: float) -> Tensor:
    """Linear two-colour gradient with fine hatching, (3, H, W) from x (1, W), y (H, 1)."""
    t = (x * math.cos(p.bg_angle) + y * math.sin(p.bg_angle)) * (0.5 / math.sqrt(2)) + 0.5  # (H, W)
    c0, c1 = _colour(p.bg_colors[0]), _colour(p.bg_colors[1])
    bg = c0 + (c1 - c0) * t  # (3, H, W)
    hatch = _hatch(x, y, p, p.hatch_angle, px)
    return bg if hatch is None else bg * hatch


def _bbox(p: ShapeParams, resolution: int, window: Window) -> tuple[slice, slice]:
    """Pixel rows/cols of ``window`` that may touch the object (shape, outline and edge ramp), relative to the window."""
    reach = 1.2 * p.size + p.outline_width + 4.0 / resolution
    top, left, height, width = window

    def span(c: float, start: int, length: int) -> slice:
        lo = math.floor((c - reach + 1) * resolution / 2) - start
        hi = math.ceil((c + reach + 1) * resolution / 2) - start
        return slice(min(max(lo, 0), length), min(max(hi, 0), length))

    return span(p.center[1], top, height), span(p.center[0], left, width)


def _paint_object(img: Tensor, x: Tensor, y: Tensor, p: ShapeParams, px: float) -> None:
    """Composite the textured, outlined object over ``img`` (3, h, w) in place."""
    _, _, shape, texture = SHAPE_CLASSES[p.label]
    ca, sa = math.cos(p.angle), math.sin(p.angle)
    dx, dy = x - p.center[0], y - p.center[1]  # (1, w), (h, 1)
    u, v = dx * ca + dy * sa, dy * ca - dx * sa  # object-local coordinates, (h, w)
    d = _shape_sdf(shape, u, v, p.size, p.aspect)  # (h, w)

    fn, mean = _TEXTURES[texture]
    fade = _fade(p.texture_freq, px)
    cov: Tensor | float = mean if fade == 0.0 else mean + fade * (fn(u, v, p.texture_freq, p.texture_phase, px) - mean)
    a, b = _colour(p.color), _colour(p.pattern_color)
    obj = a + (b - a) * cov  # (3, h, w) or (3, 1, 1)
    hatch = _hatch(x, y, p, p.hatch_angle + math.pi / 2, px)  # fine hatching, across the background's
    if hatch is not None:
        obj = obj * hatch

    fill = _ramp(d, px)  # (h, w)
    img.add_((obj - img) * fill)
    half = 0.5 * p.outline_width
    band = _ramp(d - half, px) - _ramp(d + half, px)  # box-filtered band |d| < half, (h, w)
    img.add_((_colour(p.outline_color) - img) * band)


def render_shape(params: ShapeParams, resolution: int, window: Window | None = None) -> Tensor:
    """Render a scene at ``resolution``² pixels: float32 (3, R, R) in [-1, 1]. Pure function.

    ``window`` = (top, left, height, width) renders only those pixels of the R×R image, (3, height, width):
    the same values as that crop of the whole render (each pixel is computed from its own centre alone), at
    the cost of the window — what crop training at 1024px needs instead of a million pixels per image.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    top, left, height, width = window = window or (0, 0, resolution, resolution)
    if not (0 <= top and 0 <= left and 0 < height and 0 < width and top + height <= resolution and left + width <= resolution):
        raise ValueError(f"window (top, left, height, width) = {window} is not inside the {resolution}x{resolution} image")
    coords = _pixel_centres(resolution)
    x, y = coords[left : left + width].view(1, -1), coords[top : top + height].view(-1, 1)  # (1, w), (h, 1)
    px = 2.0 / resolution  # pixel size, normalised units
    img = _background(x, y, params, px)  # (3, h, w)
    rows, cols = _bbox(params, resolution, window)
    if rows.start < rows.stop and cols.start < cols.stop:
        _paint_object(img[:, rows, cols], x[:, cols], y[rows, :], params, px)
    return img.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)


def redraw_unresolved(params: ShapeParams, lowres_resolution: int, generator: torch.Generator) -> ShapeParams:
    """The same scene with every periodic detail that a ``lowres_resolution`` render cannot show drawn afresh.

    A texture or hatching above the fade band at the low-res pixel size renders there as its exact mean
    (:func:`_fade` is 0), so the low-res image holds nothing of its phase (texture) or direction (hatching):
    the texture's phase is redrawn when it is invisible at ``lowres_resolution`` (at 64 px), the hatching's
    direction when it is (at 64 and 256 px). Everything the low-res image shows (shape, pose, colours, and the
    texture at 256 px) is kept, so the low-res renders of both scenes agree.

    Rendered at the high resolution, the redrawn scene is what a perfect *realistic* super-resolution model
    could output: the right kind of detail, at the truth's contrast, in a phase it cannot know. Its PSNR against
    the truth is the pixel fidelity that realism costs (README, "Evaluate a stage").
    """
    px = 2.0 / lowres_resolution  # low-res pixel size, normalised units
    r = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    texture_phase = (r[0], r[1]) if _fade(params.texture_freq, px) == 0.0 else params.texture_phase
    hatch_angle = 2 * math.pi * r[2] if _fade(params.hatch_freq, px) == 0.0 else params.hatch_angle
    return replace(params, texture_phase=texture_phase, hatch_angle=hatch_angle)


# ----------------------------------------------------------------------------- dataset


class ShapesDataset(Dataset[tuple[Tensor, int]], WindowSource):
    """Procedural class-conditional shapes: (image (3, R, R) float32 in [-1, 1], label).

    Item ``i`` is the scene :func:`sample_shape_params` draws for (seed, split, i),
    rendered by :func:`render_shape`: bit-identical on every call, and the same scene at
    every resolution. ``flip=True`` adds a random horizontal flip from torch's default
    RNG (data augmentation; the per-index determinism then holds up to that flip).
    """

    # What the images are (cascade.data.ImageDomain): procedural drawings, which ImageNet features say little about,
    # so evaluation measures them with a classifier trained on this data set (cascade.evaluation.run).
    domain: ClassVar[ImageDomain] = "synthetic"

    def __init__(
        self,
        *,
        resolution: int = 64,
        size: int = 50_000,
        seed: int = 0,
        split: Split = "train",
        flip: bool = False,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.resolution = resolution  # output side, pixels
        self.size = size  # number of items
        self.seed = seed  # base seed of the per-index generators
        self.split: Split = split  # train and test draw from disjoint seed streams
        self.flip = flip  # random horizontal flip (augmentation)
        self.class_names: list[str] = [f"{c} {s} with {t}" for c, _, s, t in SHAPE_CLASSES]
        self.num_classes: int = len(self.class_names)

    def __len__(self) -> int:
        return self.size

    def params(self, index: int) -> ShapeParams:
        """The scene of item ``index``."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        return sample_shape_params(seed=self.seed, split=self.split, index=index, num_classes=self.num_classes)

    def redrawn(self, index: int, lowres_resolution: int, generator: torch.Generator) -> Tensor:
        """Item ``index`` (unflipped) with the detail a ``lowres_resolution`` render cannot show redrawn
        (:func:`redraw_unresolved`), (3, R, R) in [-1, 1]."""
        return render_shape(redraw_unresolved(self.params(int(index)), lowres_resolution, generator), self.resolution)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        p = self.params(int(index))
        image = render_shape(p, self.resolution)  # (3, R, R)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, p.label

    def window(self, index: int, top: int, left: int, size: int) -> tuple[Tensor, int]:
        """Pixels [top, top+size) × [left, left+size) of item ``index`` and its label, rendered alone
        (:class:`cascade.data.windows.WindowSource`); the flip is drawn as in ``self[index]``."""
        p = self.params(int(index))
        if self.flip and torch.rand(()) < 0.5:  # the window of the flipped image: the mirrored window, flipped
            return render_shape(p, self.resolution, (top, self.resolution - left - size, size, size)).flip(-1), p.label
        return render_shape(p, self.resolution, (top, left, size, size)), p.label
