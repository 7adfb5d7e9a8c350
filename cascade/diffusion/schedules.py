"""Noise schedules of the discrete diffusion process, and timestep respacing.

A schedule is plain data: the kept timesteps and their ᾱ. Everything else (β, α, the
posterior variance) is derived from ᾱ, so a respaced schedule is itself a valid diffusion
process (Nichol & Dhariwal 2021, "Improved DDPM", §4 / ADM ``respace.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "linear_schedule",
    "cosine_schedule",
    "schedule_from_betas",
    "spaced_timesteps",
    "logsnr_spaced_timesteps",
    "adm_respacing",
    "Spacing",
    "respace",
    "check_same_schedule",
]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete forward process x_0 → x_{t_0} → … → x_{t_{K−1}}.

    ``timesteps`` are indices into the process the network was trained on (the network is
    always called with these); ``alphas_cumprod`` is ᾱ at those timesteps. The one-step
    β_k = 1 − ᾱ_k / ᾱ_{k−1} (with ᾱ_{−1} = 1) of the kept steps make this a diffusion of its
    own, so samplers never need to know whether a schedule was respaced.
    """

    timesteps: Tensor  # (K,) int64, strictly increasing
    alphas_cumprod: Tensor  # (K,) float64, strictly decreasing in (0, 1)

    def __post_init__(self) -> None:
        t, ab = self.timesteps, self.alphas_cumprod
        if t.ndim != 1 or ab.shape != t.shape or len(t) == 0:
            raise ValueError(f"timesteps {tuple(t.shape)} and alphas_cumprod {tuple(ab.shape)} must be equal, non-empty 1-D")
        if t.dtype != torch.int64 or ab.dtype != torch.float64:
            raise ValueError("timesteps must be int64 and alphas_cumprod float64")
        if len(t) > 1 and not bool((t[1:] > t[:-1]).all()):
            raise ValueError("timesteps must be strictly increasing")
        if not bool(((ab > 0) & (ab < 1)).all()) or (len(ab) > 1 and not bool((ab[1:] < ab[:-1]).all())):
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1)")

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def num_train_steps(self) -> int:
        """Length of the process the network was trained on (T), inferred from the last step."""
        return int(self.timesteps[-1]) + 1

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """ᾱ_{k−1}, with ᾱ_{−1} = 1 (the clean data)."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])  # (K,)

    @property
    def betas(self) -> Tensor:
        """One-step β_k = 1 − ᾱ_k / ᾱ_{k−1} of this (possibly respaced) process."""
        return 1.0 - self.alphas_cumprod / self.alphas_cumprod_prev  # (K,)

    @property
    def posterior_variance(self) -> Tensor:
        """β̃_k = (1 − ᾱ_{k−1}) / (1 − ᾱ_k) · β_k, the variance of q(x_{k−1} | x_k, x_0) (Ho et al. eq. 7)."""
        return (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas  # (K,)

    @property
    def posterior_log_variance_clipped(self) -> Tensor:
        """log β̃_k with β̃_0 = 0 replaced by β̃_1, so the log is finite (ADM's clipping)."""
        var = self.posterior_variance
        if len(var) > 1:
            var = torch.cat([var[1:2], var[1:]])
        else:  # a one-step process: β̃_0 = 0; use β_0 so the log stays finite
            var = self.betas
        return var.log()  # (K,)

    def positions(self, t: Tensor) -> Tensor:
        """Positions k in this schedule of the training timesteps ``t`` (any shape, long).

        On an accelerator the check that every t is a step runs on the device (an asynchronous assert), so that a
        sampler step never waits for the host; on CPU a miss is a ValueError naming the timesteps.
        """
        table = self.timesteps.to(t.device, non_blocking=True)
        k = torch.searchsorted(table, t.long()).clamp(max=len(table) - 1)
        if t.device.type != "cpu":
            torch._assert_async((table[k] == t).all(), "timesteps are not steps of this schedule")
            return k
        if not bool((table[k] == t).all()):
            missing = sorted(set(t.flatten().tolist()) - set(table.tolist()))[:5]
            raise ValueError(f"timesteps {missing} are not steps of this schedule")
        return k

    def to_dict(self) -> dict[str, list]:
        """Plain-container form, e.g. for a checkpoint or a JSON record."""
        return {"timesteps": self.timesteps.tolist(), "alphas_cumprod": self.alphas_cumprod.tolist()}


def schedule_from_betas(betas: Tensor) -> NoiseSchedule:
    """The full process t = 0 … T−1 with the given one-step β_t: ᾱ_t = ∏_{s≤t} (1 − β_s)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
    return NoiseSchedule(torch.arange(len(betas)), alphas_cumprod)


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """Linear β from ``beta_start`` to ``beta_end`` (Ho et al. 2020, §4).

    The end points are given for T = 1000 and scaled by 1000 / T, so a process of another
    length keeps the same overall noise (ADM ``get_named_beta_schedule``).
    """
    scale = 1000.0 / num_steps
    return schedule_from_betas(torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64))


def cosine_schedule(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999, shift: float = 1.0) -> NoiseSchedule:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T)+s)/(1+s)·π/2).

    β_t = 1 − ᾱ_t/ᾱ_{t−1} is clipped at ``max_beta`` to avoid the singularity at t = T.
    Index 0 here is the paper's t = 1.

    ``shift`` > 1 divides every step's signal-to-noise ratio ᾱ/(1−ᾱ) by shift², i.e. lowers its
    log-SNR by 2·log(shift) (Hoogeboom et al. 2023, "simple diffusion", §3.1: the shifted cosine
    schedule). An image whose pixels are redundant (large flat regions, or a high resolution) keeps
    its layout readable at noise levels where the plain schedule spends few of its steps; shifting
    moves training and sampling steps to the noise levels that decide the layout. 1: ADM's schedule.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive (1: the plain cosine schedule), got {shift}")
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # (T+1,) t/T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)  # (T,)
    schedule = schedule_from_betas(betas)
    if shift == 1.0:
        return schedule
    logit = schedule.alphas_cumprod.logit() - 2.0 * math.log(shift)  # (T,) log-SNR, shifted
    return NoiseSchedule(schedule.timesteps, torch.sigmoid(logit))


def spaced_timesteps(num_train_steps: int, num_steps: int) -> Tensor:
    """``num_steps`` evenly spaced training timesteps from 0 to T−1, both ends included."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    if num_steps == 1:
        return torch.tensor([num_train_steps - 1])
    kept = torch.linspace(0, num_train_steps - 1, num_steps, dtype=torch.float64).round().long()
    return torch.unique(kept)  # (num_steps,) sorted; unique is a no-op for num_steps ≤ T


def logsnr_spaced_timesteps(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """``num_steps`` distinct steps of ``schedule`` spaced evenly in log-SNR λ = log(ᾱ/(1−ᾱ))/2.

    Each target λ takes its nearest step; where the schedule is sparse in λ (the ends of the
    cosine schedule) neighbours are pushed apart by one step so that exactly ``num_steps``
    distinct steps come back. Spacing in λ suits the DPM-Solver family (Lu et al. 2022, §3.3).
    Returns training timesteps, increasing.
    """
    if not 1 <= num_steps <= len(schedule):
        raise ValueError(f"num_steps must be in [1, {len(schedule)}], got {num_steps}")
    ab = schedule.alphas_cumprod
    lam = 0.5 * (ab / (1.0 - ab)).log()  # (K,) decreasing
    targets = torch.linspace(float(lam[0]), float(lam[-1]), num_steps, dtype=torch.float64)  # (n,)
    positions = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # n positions, non-decreasing
    for i in range(1, num_steps):  # push duplicates up …
        positions[i] = max(positions[i], positions[i - 1] + 1)
    positions[-1] = min(positions[-1], len(schedule) - 1)
    for i in range(num_steps - 2, -1, -1):  # … and back down where that ran past the end
        positions[i] = min(positions[i], positions[i + 1] - 1)
    return schedule.timesteps[torch.tensor(positions)]


def adm_respacing(num_train_steps: int, spec: str) -> Tensor:
    """The training timesteps ADM keeps for a ``timestep_respacing`` string (ADM ``respace.py``, ``space_timesteps``).

    * ``"ddimN"``: every s-th step from 0, with the smallest stride s that gives exactly N steps
      (T = 1000: ``"ddim25"`` = 0, 40, …, 960; ``"ddim50"`` = 0, 20, …, 980).
    * ``"N"`` or ``"N1,N2,…"``: T is cut into as many equal sections as counts are given (the
      first T mod n one step longer); section i keeps N_i steps spaced by (size − 1)/(N_i − 1)
      from its start, each position rounded half to even, both section ends included
      (``"250"`` = 0, 4, 8, …, 999). ADM's 250-step ancestral sampling uses ``"250"``.

    Returns the kept timesteps (K,) int64, increasing. A malformed string or one asking for
    more steps than a section holds is a ValueError naming the fix.
    """
    text = spec.strip()
    if text.startswith("ddim"):
        try:
            count = int(text[len("ddim") :])
        except ValueError:
            raise ValueError(f"respacing {spec!r}: write ddimN with an integer N, e.g. ddim25") from None
        for stride in range(1, num_train_steps):
            if len(range(0, num_train_steps, stride)) == count:
                return torch.arange(0, num_train_steps, stride, dtype=torch.int64)
        raise ValueError(f"respacing {spec!r}: no stride gives exactly {count} of {num_train_steps} steps; pick another N")
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"respacing {spec!r} is neither ddimN nor comma-separated step counts (e.g. '250' or '10,15,20')"
        ) from None
    if not counts or min(counts) < 1:
        raise ValueError(f"respacing {spec!r}: every section needs at least one step")
    base, longer = divmod(num_train_steps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < longer else 0)
        if count > size:
            raise ValueError(f"respacing {spec!r}: section {i} has {size} steps, fewer than the {count} asked for")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0  # accumulated like ADM, so that every rounding falls the same way
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return torch.tensor(sorted(kept), dtype=torch.int64)


Spacing = Literal["uniform", "logsnr", "adm", "stride"]


def respace(schedule: NoiseSchedule, timesteps: Tensor | int | str, spacing: Spacing = "uniform") -> NoiseSchedule:
    """Keep a subset of ``schedule``'s steps (ADM ``respace.py``).

    ``timesteps`` lists the training timesteps to keep; or is a number of steps spaced
    ``uniform`` in t (both ends included), in ``logsnr`` (:func:`logsnr_spaced_timesteps`), as
    ADM's ``"N"`` (``adm``: its rounding differs from ``uniform`` for some N) or as ADM's
    ``"ddimN"`` (``stride``); or is an ADM respacing string itself (:func:`adm_respacing`:
    ``"250"``, ``"ddim25"``, ``"10,15,20"``), whatever ``spacing``.

    ᾱ at every kept step equals the original ᾱ there, and the kept steps' β are recomputed
    from ᾱ (see :class:`NoiseSchedule`), so the respaced chain is itself a valid diffusion.
    """
    if isinstance(timesteps, str):
        timesteps = adm_respacing(schedule.num_train_steps, timesteps)
    elif isinstance(timesteps, int) and spacing == "uniform":
        timesteps = spaced_timesteps(schedule.num_train_steps, timesteps)
    elif isinstance(timesteps, int) and spacing == "logsnr":
        timesteps = logsnr_spaced_timesteps(schedule, timesteps)
    elif isinstance(timesteps, int) and spacing in ("adm", "stride"):
        if not 1 <= timesteps <= schedule.num_train_steps:
            raise ValueError(f"num_steps must be in [1, {schedule.num_train_steps}], got {timesteps}")
        timesteps = adm_respacing(schedule.num_train_steps, f"ddim{timesteps}" if spacing == "stride" else str(timesteps))
    elif isinstance(timesteps, int):
        raise ValueError(f"unknown spacing {spacing!r}; use 'uniform', 'logsnr', 'adm' or 'stride'")
    timesteps = torch.unique(torch.as_tensor(timesteps, dtype=torch.int64))
    k = schedule.positions(timesteps)
    return NoiseSchedule(schedule.timesteps[k], schedule.alphas_cumprod[k])


def check_same_schedule(a: NoiseSchedule, b: NoiseSchedule, what: str) -> None:
    """Guidance needs the classifier to be trained on the very noise process of the model it steers."""
    if len(a) != len(b) or not torch.allclose(a.alphas_cumprod, b.alphas_cumprod, rtol=1e-6, atol=0):
        raise ValueError(
            f"{what} was trained on another noise schedule than the model it should guide; retrain it with the model's schedule"
        )
