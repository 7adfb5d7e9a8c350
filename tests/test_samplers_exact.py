"""Samplers and guidance against the exact model of a Gaussian mixture (closed forms, no golden numbers).

With the exact ε-predictor plugged in, every sampler must reproduce the mixture: the
component weights and each component's per-pixel mean and standard deviation. With the
exact log p(y | x_t) as the classifier, guidance at scale 1 on the *unconditional* model
must sample the requested component. Autoguidance by a model with the same error, larger, must
undo part of the smaller model's error.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cascade.diffusion.guidance import autoguidance, classifier_free_guidance, classifier_guidance
from cascade.diffusion.samplers import REGISTRY, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde
from cascade.diffusion.schedules import cosine_schedule, linear_schedule, respace
from tests.mixture import GaussianMixture, MixtureModel

NUM_SAMPLES = 3000
# 3×4×4 pixels: components stay far apart (squared mean gaps ≥ 78 times the larger component variance), the pixel-averaged std
# ratio keeps a sampling error of ≈ 0.4 %, far inside every tolerance below, and a DDPM-1000 run costs a
# quarter of the 3×8×8 one (the suite runs three of them).
MIXTURE = GaussianMixture(shape=(3, 4, 4))
SCHEDULES = {"linear": linear_schedule(1000), "cosine": cosine_schedule(1000)}
# (sampler, steps = model evaluations, spacing, tolerance on the std ratio).
# DDIM is first order: on a Gaussian of std s each step contracts the deviation by cos Δθ,
# θ = atan(σ_t / (√ᾱ_t s)), so 50 steps lose ≥ 2.4 % of the spread even with ideal spacing
# (Σ Δθ² ≥ (π/2)²/50); we allow 8 %. DDPM-1000 and DPM-Solver++(2M)-20 must be within 4 %, and so must its SDE
# form at 30 steps (a stochastic step's discretisation error is larger than the ODE's: 25 steps reach 4 % on the cosine schedule).
SAMPLER_CASES = [
    (sample_ddpm, 1000, "uniform", 0.04),
    (sample_ddim, 50, "logsnr", 0.08),
    (sample_dpmpp_2m, 20, "logsnr", 0.04),
    (sample_dpmpp_2m_sde, 30, "logsnr", 0.04),
]
CASE_IDS = [f"{s.__name__}-{n}" for s, n, _, _ in SAMPLER_CASES]


def component_statistics(samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Assign samples to components by p(k | x_0) and compare each component with the truth."""
    ones = torch.ones(len(samples))
    labels = MIXTURE.component_posterior(samples, ones).argmax(1)  # (N,)
    fractions, mean_err, std_ratio = [], [], []
    for k in range(MIXTURE.num_classes):
        xs = samples[labels == k]
        if len(xs) < 2:  # a component nobody sampled (e.g. under guidance towards another)
            fractions.append(len(xs) / len(samples))
            mean_err.append(torch.tensor(float("inf")))
            std_ratio.append(torch.tensor(float("inf")))
            continue
        fractions.append(len(xs) / len(samples))
        # Mean error in units of the component's std, RMS over pixels; std ratio averaged over pixels.
        mean_err.append((((xs.mean(0) - MIXTURE.means[k]) / MIXTURE.stds[k]) ** 2).mean().sqrt())
        std_ratio.append((xs.std(0) / MIXTURE.stds[k]).mean())
    return {
        "labels": labels,
        "fractions": torch.tensor(fractions),
        "mean_err": torch.stack(mean_err),
        "std_ratio": torch.stack(std_ratio),
    }


def draw(sampler, steps, schedule_name, model_fn=None, cond=None, spacing="uniform", seed=0) -> torch.Tensor:
    schedule = SCHEDULES[schedule_name]
    steps_schedule = respace(schedule, steps, spacing)
    model_fn = model_fn or MixtureModel(MIXTURE, schedule)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((NUM_SAMPLES, *MIXTURE.shape), generator=g)
    return sampler(model_fn, x_T, steps_schedule, cond=cond, generator=g, progress=False)


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("sampler,steps,spacing,std_tol", SAMPLER_CASES, ids=CASE_IDS)
def test_sampler_reproduces_mixture(sampler, steps, spacing, std_tol, schedule_name):
    stats = component_statistics(draw(sampler, steps, schedule_name, spacing=spacing))
    # Component weights within 3 points (sampling s.e. ≈ 0.9 points at N = 3000).
    torch.testing.assert_close(stats["fractions"], MIXTURE.weights, atol=0.03, rtol=0)
    # Per-pixel means within 0.15 std (sampling s.e. ≈ 0.03–0.06 std for 600–1500 samples).
    assert (stats["mean_err"] < 0.15).all(), stats["mean_err"]
    # Per-pixel standard deviations on average within the sampler's tolerance.
    assert ((stats["std_ratio"] - 1).abs() < std_tol).all(), stats["std_ratio"]


def test_dpm_solver_uses_one_evaluation_per_step():
    model = MixtureModel(MIXTURE, SCHEDULES["cosine"])
    draw(sample_dpmpp_2m, 20, "cosine", model_fn=model)
    assert model.calls == 20
    counted = MixtureModel(MIXTURE, SCHEDULES["linear"])  # counts its calls: the model's evaluations
    draw(sample_dpmpp_2m, 25, "linear", model_fn=counted, spacing="logsnr")
    steps = len(respace(SCHEDULES["linear"], 25, "logsnr"))  # log-SNR respacing keeps its distinct steps: all 25 here
    assert counted.calls == steps == 25


GUIDANCE_MODES = {spec.fn: spec.guidance_mode for spec in REGISTRY.values()}  # how each sampler takes classifier guidance
GUIDED_CASES = [(*case, GUIDANCE_MODES[case[0]]) for case in SAMPLER_CASES]


@pytest.mark.parametrize(
    "sampler,steps,spacing,std_tol,mode", GUIDED_CASES, ids=[f"{i}-{c[-1]}" for i, c in zip(CASE_IDS, GUIDED_CASES)]
)
def test_classifier_guidance_samples_requested_component(sampler, steps, spacing, std_tol, mode):
    schedule = SCHEDULES["cosine"]
    steps_schedule = respace(schedule, steps, spacing)
    unconditional = MixtureModel(MIXTURE, schedule)
    target = 2  # the rarest component (π = 0.2)
    guided = classifier_guidance(lambda x, t, **_: unconditional(x, t), unconditional.log_prob, steps_schedule, 1.0, mode=mode)
    labels = torch.full((NUM_SAMPLES,), target)
    cond = {"class_labels": labels}
    stats = component_statistics(draw(sampler, steps, "cosine", model_fn=guided, cond=cond, spacing=spacing))
    assert stats["fractions"][target] >= 0.99, stats["fractions"]
    assert stats["mean_err"][target] < 0.15, stats["mean_err"]
    assert abs(float(stats["std_ratio"][target]) - 1) < std_tol, stats["std_ratio"]


CFG_CASES = [(sample_ddpm, 100, "uniform"), (sample_ddim, 50, "logsnr"), (sample_dpmpp_2m, 20, "logsnr")]


@pytest.mark.parametrize("sampler,steps,spacing", CFG_CASES, ids=[f"{s.__name__}-{n}" for s, n, _ in CFG_CASES])
def test_classifier_free_guidance_at_one_is_the_conditional_sampler(sampler, steps, spacing):
    schedule = SCHEDULES["linear"]
    model = MixtureModel(MIXTURE, schedule)
    labels = torch.arange(NUM_SAMPLES) % MIXTURE.num_classes
    cond = {"class_labels": labels}
    conditional = draw(sampler, steps, "linear", model_fn=model, cond=cond, spacing=spacing)
    cfg_fn = classifier_free_guidance(model, 1.0, MIXTURE.num_classes)
    cfg = draw(sampler, steps, "linear", model_fn=cfg_fn, cond=cond, spacing=spacing)
    torch.testing.assert_close(cfg, conditional, atol=1e-4, rtol=1e-4)
    # And the conditional sampler really draws each requested component.
    assert (component_statistics(conditional)["labels"] == labels).float().mean() > 0.99


def test_classifier_free_guidance_at_zero_is_unconditional():
    schedule = SCHEDULES["cosine"]
    model = MixtureModel(MIXTURE, schedule)
    labels = torch.zeros(NUM_SAMPLES, dtype=torch.long)
    unconditional = draw(sample_ddim, 50, "cosine", model_fn=model)
    cfg = draw(sample_ddim, 50, "cosine", model_fn=classifier_free_guidance(model, 0.0, 3), cond={"class_labels": labels})
    torch.testing.assert_close(cfg, unconditional, atol=1e-4, rtol=1e-4)


def widened(mixture: GaussianMixture, factor: float) -> GaussianMixture:
    """The same mixture with every component's std × ``factor``: a model whose error is too much spread."""
    wide = copy.deepcopy(mixture)
    wide.stds = mixture.stds * factor
    return wide


def test_autoguidance_is_the_model_at_one_the_guide_at_zero_and_linear_in_between():
    schedule = SCHEDULES["cosine"]
    model, guide = MixtureModel(widened(MIXTURE, 1.2), schedule), MixtureModel(widened(MIXTURE, 1.5), schedule)
    x_t = torch.randn((16, *MIXTURE.shape), generator=torch.Generator().manual_seed(1))
    t = torch.full((16,), 500, dtype=torch.long)
    cond = {"class_labels": torch.arange(16) % MIXTURE.num_classes}
    guide.calls = 0
    torch.testing.assert_close(autoguidance(model, guide, 1.0)(x_t, t, **cond).eps, model(x_t, t, **cond).eps)
    assert guide.calls == 0  # w = 1 never evaluates the guide
    torch.testing.assert_close(autoguidance(model, guide, 0.0)(x_t, t, **cond).eps, guide(x_t, t, **cond).eps)
    e_model, e_guide = model(x_t, t, **cond).eps, guide(x_t, t, **cond).eps
    torch.testing.assert_close(autoguidance(model, guide, 2.5)(x_t, t, **cond).eps, e_guide + 2.5 * (e_model - e_guide))
    with pytest.raises(ValueError, match="autoguidance scale"):
        autoguidance(model, guide, -1.0)


def test_autoguidance_by_a_worse_model_corrects_the_shared_error():
    """Karras et al. 2024, section 3: a model whose components are 20 % too wide, guided away from one 50 % too wide,
    samples spreads nearer the truth; a guide equal to the model changes nothing."""
    schedule = SCHEDULES["cosine"]
    model, guide = MixtureModel(widened(MIXTURE, 1.2), schedule), MixtureModel(widened(MIXTURE, 1.5), schedule)
    labels = torch.arange(NUM_SAMPLES) % MIXTURE.num_classes
    cond = {"class_labels": labels}
    plain = component_statistics(draw(sample_dpmpp_2m, 20, "cosine", model_fn=model, cond=cond, spacing="logsnr"))
    guided = component_statistics(
        draw(sample_dpmpp_2m, 20, "cosine", model_fn=autoguidance(model, guide, 2.0), cond=cond, spacing="logsnr")
    )
    assert (plain["labels"] == labels).float().mean() > 0.99 and (guided["labels"] == labels).float().mean() > 0.99
    assert torch.all((plain["std_ratio"] - 1.2).abs() < 0.05), plain["std_ratio"]  # the model's own error
    assert torch.all((guided["std_ratio"] - 1).abs() < (plain["std_ratio"] - 1).abs() / 2), guided["std_ratio"]
    same = draw(sample_dpmpp_2m, 20, "cosine", model_fn=autoguidance(model, model, 3.0), cond=cond, spacing="logsnr")
    torch.testing.assert_close(same, draw(sample_dpmpp_2m, 20, "cosine", model_fn=model, cond=cond, spacing="logsnr"))
