"""Our DPM-Solver++(2M) samplers against diffusers' own scheduler, step for step (peer code as the oracle).

diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++`` and ``sde-dpmsolver++``, order 2, midpoint) is run on the
same model function (the exact ε-predictor of a Gaussian mixture), the same training schedule, the same kept
timesteps and, for the SDE, the same noise draws; both must end on the same samples. diffusers' second order
keeps its second-to-last step second order (its ``lower_order_final`` lowers only the jump to σ = 0, which ours
always takes as x̂_0), so ours runs with ``lower_order_final=False`` here.
"""

from __future__ import annotations

import pytest
import torch

from cascade.diffusion.samplers import sample_dpmpp_2m, sample_dpmpp_2m_sde
from cascade.diffusion.schedules import cosine_schedule, linear_schedule, respace
from cascade.utils.rng import randn
from tests.mixture import GaussianMixture, MixtureModel

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 builds its sigmas with np.array(tensor, copy=False), which NumPy 2 warns about: theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MIXTURE = GaussianMixture(shape=(3, 4, 4))
STEPS = 10
BATCH = 64


def diffusers_samples(model: MixtureModel, schedule, kept, x_T: torch.Tensor, noises: list[torch.Tensor] | None) -> torch.Tensor:
    """x_0 by diffusers' scheduler over the kept timesteps (descending), with ``noises`` for its SDE steps."""
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=len(schedule),
        trained_betas=schedule.betas.tolist(),
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++" if noises is None else "sde-dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,  # with 10 < 15 steps: the last step first order, the one before it second
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=kept.flip(0).tolist())
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        eps = model(x, torch.full((len(x),), int(t), dtype=torch.long)).eps  # (B, C, H, W)
        noise = None if noises is None else (noises[i] if i < len(noises) else torch.zeros_like(x))
        x = scheduler.step(eps, t, x, variance_noise=noise).prev_sample
    return x


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde"])
def test_dpmpp_2m_matches_diffusers_scheduler(schedule_name: str, stochastic: bool) -> None:
    schedule = linear_schedule(1000) if schedule_name == "linear" else cosine_schedule(1000)
    steps = respace(schedule, STEPS, "logsnr")
    model = MixtureModel(MIXTURE, schedule)
    x_T = torch.randn((BATCH, *MIXTURE.shape), generator=torch.Generator().manual_seed(3))
    sampler = sample_dpmpp_2m_sde if stochastic else sample_dpmpp_2m

    def run(seed: int) -> torch.Tensor:
        return sampler(model, x_T, steps, generator=torch.Generator().manual_seed(seed), progress=False, lower_order_final=False)

    ours = run(7)
    noises = None
    if stochastic:  # the draws ours made: one per step but the last (which returns x̂_0), from the same stream
        g = torch.Generator().manual_seed(7)
        noises = [randn(x_T.shape, g, device="cpu") for _ in range(len(steps) - 1)]
    theirs = diffusers_samples(model, schedule, steps.timesteps, x_T, noises)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    if stochastic:  # and the noise matters: another stream gives other samples
        assert (run(8) - ours).abs().mean() > 1e-2
