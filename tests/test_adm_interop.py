"""OpenAI's guided-diffusion (ADM) releases through our converter, checked against OpenAI's own code.

The oracle is the ``guided_diffusion`` module of the pip package ``guided-diffusion-sdk`` (dev
extra). For every released family its model is built with the release's flags (heads, attention
resolutions, multipliers, q/k/v order, learned Σ) at reduced width and depth, every tensor
re-randomised (ADM zero-initialises its output layers), saved as a ``.pt`` file, converted by
:func:`cascade.interop.guided_diffusion.convert` from that file, rebuilt as our network from the
converted checkpoint alone, and both are run on the same x_t, t, y (and low-res image).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchvision.utils import save_image

gd_unet = pytest.importorskip("guided_diffusion.unet")
from guided_diffusion import script_util  # noqa: E402
from guided_diffusion.respace import space_timesteps  # noqa: E402

from cascade.data.resize import upsample  # noqa: E402
from cascade.diffusion.denoiser import network_model_fn  # noqa: E402
from cascade.diffusion.guidance import classifier_guidance, classifier_log_prob  # noqa: E402
from cascade.diffusion.samplers import sample_ddim, sample_ddpm  # noqa: E402
from cascade.diffusion.schedules import NoiseSchedule, adm_respacing, cosine_schedule, linear_schedule, respace  # noqa: E402
from cascade.interop.guided_diffusion import RELEASES, ConversionError, build_network, convert, recognise, stage_config  # noqa: E402
from cascade.training.checkpoint import load_checkpoint  # noqa: E402
from tests.helpers import Ran, run_script  # noqa: E402

# --- guided-diffusion's models with each release's flags, at a given width and depth -----------------------


def adm_generator(size: int, width: int, depth: int, **flags) -> torch.nn.Module:
    return script_util.create_model(
        size,
        width,
        depth,
        learn_sigma=True,
        attention_resolutions="32,16,8",
        use_scale_shift_norm=True,
        resblock_updown=True,
        **flags,
    )


def adm_upsampler(large: int, small: int, width: int, depth: int, **flags) -> torch.nn.Module:
    return script_util.sr_create_model(
        large,
        small,
        width,
        depth,
        learn_sigma=True,
        class_cond=True,
        use_checkpoint=False,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        dropout=0.0,
        resblock_updown=True,
        use_fp16=False,
        **flags,
    )


def adm_classifier(size: int, width: int, depth: int) -> torch.nn.Module:
    return script_util.create_classifier(size, False, width, depth, "32,16,8", True, True, "attention")


# Family → (builder at (width, depth), x_t side, low-res factor or None). The README flags of each release.
# x_t is as small as the level count allows (the networks are convolutional); a classifier's pool fixes its size.
FAMILIES: dict[str, tuple[Callable[[int, int], torch.nn.Module], int, int | None]] = {
    "64x64_diffusion": (
        lambda w, d: adm_generator(64, w, d, class_cond=True, num_head_channels=64, dropout=0.1, use_new_attention_order=True),
        16,
        None,
    ),
    "128x128_diffusion": (lambda w, d: adm_generator(128, w, d, class_cond=True, num_heads=4), 16, None),
    "256x256_diffusion": (lambda w, d: adm_generator(256, w, d, class_cond=True, num_head_channels=64), 32, None),
    "256x256_diffusion_uncond": (lambda w, d: adm_generator(256, w, d, class_cond=False, num_head_channels=64), 32, None),
    "512x512_diffusion": (lambda w, d: adm_generator(512, w, d, class_cond=True, num_head_channels=64), 64, None),
    "64_256_upsampler": (
        lambda w, d: adm_upsampler(256, 64, w, d, attention_resolutions="32,16,8", num_heads=4, num_head_channels=-1),
        32,
        4,
    ),
    "128_512_upsampler": (
        lambda w, d: adm_upsampler(512, 128, w, d, attention_resolutions="32,16", num_heads=4, num_head_channels=64),
        32,
        4,
    ),
    "64x64_classifier": (lambda w, d: adm_classifier(64, w, d), 64, None),
    "128x128_classifier": (lambda w, d: adm_classifier(128, w, d), 128, None),
    "256x256_classifier": (lambda w, d: adm_classifier(256, w, d), 256, None),
    "512x512_classifier": (lambda w, d: adm_classifier(512, w, d), 512, None),
}
FULL_SIZE = {r.file.removesuffix(".pt"): (r.model_channels, r.num_res_blocks) for r in RELEASES}
FORWARD_FAMILIES = [f for f in FAMILIES if f not in ("256x256_classifier", "512x512_classifier")]  # 2 classifiers suffice
# Reduced width (depth 1): the smallest at which the release's heads and 32-group norms still split every level
# (64-channel heads need 64·mult divisible by 64 at (1, 2, 3, 4) levels; 0.5 × width needs 32 channels).
WIDTH = {"64x64_diffusion": 64, "512x512_diffusion": 64, "64x64_classifier": 64, "128x128_classifier": 64}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random and non-zero: weights ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        noise[noise == 0] = 1.0  # a draw can be exactly 0.0 in float32
        if name == "label_emb.weight":
            p.copy_(noise)
        elif p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_((1.0 if bool((p == 1).all()) else 0.0) + 0.1 * noise)
    assert all(bool(p.ne(0).all()) for p in model.parameters())
    return model.eval()


_CONVERTED: dict[tuple, tuple[torch.nn.Module, torch.nn.Module, dict]] = {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the random ADM files and their conversions are written (once per module)."""
    return tmp_path_factory.mktemp("adm")


def converted(family: str, folder: Path, width: int | None = None, depth: int = 1, seed: int = 0):
    """(ADM model, our network rebuilt from the converted checkpoint alone, checkpoint) for a random ``family`` model.

    Made once per session (every family's model is built, randomised, saved and converted once) and shared between
    tests: they run both networks without changing them, and take a copy to change one (dtype, config).
    """
    width = width or WIDTH.get(family, 32)
    key = (family, width, depth, seed)
    if key not in _CONVERTED:
        adm = randomise(FAMILIES[family][0](width, depth), seed)
        where = folder / "_".join(map(str, key))
        where.mkdir(parents=True)
        torch.save(adm.state_dict(), where / f"{family}.pt")
        rec, out = convert(where / f"{family}.pt", where / "last.pt")
        assert rec.release.file == f"{family}.pt"
        payload = load_checkpoint(out)
        ours = build_network(payload["config"]["stage"], len(payload["class_names"]))
        ours.load_state_dict(payload["ema"])
        _CONVERTED[key] = adm.eval(), ours.eval(), payload
    return _CONVERTED[key]


def converted_files(family: str, folder: Path) -> tuple[Path, Path]:
    """(the random ADM ``.pt`` file, its conversion) of :func:`converted`'s ``family`` model at its default width."""
    converted(family, folder)
    where = folder / "_".join(map(str, (family, WIDTH.get(family, 32), 1, 0)))
    return where / f"{family}.pt", where / "last.pt"


class Float64Oracle:
    """Run guided-diffusion's model in float64: its code casts to float32 in GroupNorm, softmax, the timestep
    embedding and its input (``.float()``, ``self.dtype``). Within this context ``.float()`` leaves float64
    tensors alone, the embedding (float32, as ours computes it) is cast to float64, and the model's dtype is float64."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> None:
        original_float, original_embedding = torch.Tensor.float, gd_unet.timestep_embedding
        monkeypatch.setattr(
            torch.Tensor, "float", lambda self, *a, **k: self if self.dtype == torch.float64 else original_float(self, *a, **k)
        )
        monkeypatch.setattr(
            gd_unet, "timestep_embedding", lambda t, dim, max_period=10000: original_embedding(t, dim, max_period).double()
        )
        model.double().dtype = torch.float64


def inputs(family: str, batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 1):
    _, side, factor = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, side, side, generator=g, dtype=dtype)
    t = torch.tensor([3, 871][:batch])
    y = torch.tensor([207, 1][:batch])
    lowres = None if factor is None else torch.rand(batch, 3, side // factor, side // factor, generator=g, dtype=dtype) * 2 - 1
    return x, t, y, lowres


def run_both(
    family: str, adm: torch.nn.Module, ours: torch.nn.Module, dtype: torch.dtype, batch: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, y, lowres = inputs(family, batch, dtype=dtype)
    with torch.no_grad():
        if "classifier" in family:
            return adm(x, t), ours(x, t)
        if lowres is not None:  # ADM resizes the low-res image bilinearly inside SuperResModel; our stage does it outside
            return adm(x, t, low_res=lowres, y=y), ours(
                x, t, class_labels=y, lowres=upsample(lowres, FAMILIES[family][2], "bilinear")
            )
        if "uncond" in family:
            return adm(x, t), ours(x, t)
        return adm(x, t, y=y), ours(x, t, class_labels=y)


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> tuple[float, float]:
    scale = reference.abs().max().item()
    return (reference - value).abs().max().item() / scale, scale


# --- outputs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FORWARD_FAMILIES)
def test_converted_network_reproduces_guided_diffusion(family: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adm, ours, payload = converted(family, folder)
    rel32, scale = relative_error(*run_both(family, adm, ours, torch.float32))
    assert scale > 0.1 and rel32 <= 1e-5, f"{family} fp32: max|Δ| = {rel32:.2e} × {scale:.3g}"
    adm, ours = copy.deepcopy(adm), copy.deepcopy(ours)  # float64 copies: the float32 models are shared
    Float64Oracle(monkeypatch, adm)
    rel64, _ = relative_error(*run_both(family, adm, ours.double(), torch.float64, batch=1))  # float64 convs are slow
    print(f"\n{family}: fp32 max|Δ| = {rel32:.2e} × output scale {scale:.3g}, fp64 {rel64:.2e}")
    assert rel64 <= 1e-10, f"{family} fp64: max|Δ| = {rel64:.2e} × {scale:.3g}"
    stage = payload["config"]["stage"]
    assert payload["source"]["file"] == f"{family}.pt" and len(payload["source"]["sha256"]) == 64
    assert payload["class_names"][207] == "golden retriever" and not payload["source"]["released_size"]
    if "classifier" not in family:
        assert stage["p_uncond"] == 0.0 and stage["net"]["null_class"] is False and stage["objective"]["learned_variance"]


@pytest.mark.parametrize(
    "family, wrong", [("64x64_diffusion", "legacy"), ("128x128_diffusion", "new"), ("64x64_classifier", "new")]
)
def test_wrong_qkv_order_fails_the_comparison(family: str, wrong: str, folder: Path) -> None:
    """Negative control: the same weights read with the other q/k/v layout are a different function."""
    adm, _, payload = converted(family, folder)
    stage = copy.deepcopy(payload["config"]["stage"])
    assert stage["net"]["attention_order"] != wrong
    stage["net"]["attention_order"] = wrong
    wrong_net = build_network(stage, len(payload["class_names"])).eval()
    wrong_net.load_state_dict(payload["ema"])
    rel, scale = relative_error(*run_both(family, adm, wrong_net, torch.float32))
    print(f"\n{family} read in {wrong} order: max|Δ| = {rel:.2e} × {scale:.3g}")
    assert rel > 1e-3


# --- full-size architectures -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_size_parameter_counts(family: str) -> None:
    with torch.device("meta"):
        adm = FAMILIES[family][0](*FULL_SIZE[family])
        rec = recognise(adm.state_dict())
        ours = build_network(stage_config(rec), 1000)
    count = sum(p.numel() for p in adm.parameters())
    print(f"\n{family}: {count / 1e6:.1f}M parameters")
    assert rec.release.file == f"{family}.pt" and rec.released_size
    assert sum(p.numel() for p in ours.parameters()) == count
    paper = {"64x64_diffusion": 295.9, "64x64_classifier": 65.4, "64_256_upsampler": 311.8}
    if family in paper:
        assert round(count / 1e6, 1) == paper[family]


# --- sampling: ADM's respacing and one step of each sampler -------------------------------------------------


@pytest.mark.parametrize("spec", ["250", "ddim25", "ddim50", "10,15,20", "27"])
def test_respacing_strings_match_adm(spec: str) -> None:
    for other in (spec, "1", "999", "ddim1000", "7,1"):  # "27", "999": ADM's rounding differs from linspace's
        assert adm_respacing(1000, other).tolist() == sorted(space_timesteps(1000, other)), other
    diffusion = script_util.create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="linear", timestep_respacing=spec
    )
    ours = respace(linear_schedule(1000), spec)
    assert ours.timesteps.tolist() == diffusion.timestep_map
    torch.testing.assert_close(ours.betas, torch.from_numpy(diffusion.betas), rtol=1e-12, atol=1e-15)
    assert respace(linear_schedule(1000), 25, "stride").timesteps.tolist() == list(range(0, 1000, 40))
    for bad in ("ddim999", "ddimx", "2,x", "600,600", "0"):  # no stride gives 999 steps; not numbers; too many; none
        with pytest.raises(ValueError):
            adm_respacing(1000, bad)


def one_step(sampler, fn, schedule: NoiseSchedule, k: int, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """Our sampler's first step from position k of ``schedule``: the state it hands to the model at its second call."""
    seen = []

    class Stop(Exception):
        pass

    def recording(x_t, t, **cond):
        seen.append(x_t.clone())
        if len(seen) == 2:
            raise Stop
        return fn(x_t, t, **cond)

    prefix = NoiseSchedule(schedule.timesteps[: k + 1], schedule.alphas_cumprod[: k + 1])  # same β of the kept steps
    with pytest.raises(Stop):
        sampler(recording, x, prefix, cond={"class_labels": y}, generator=torch.Generator().manual_seed(seed), progress=False)
    return seen[1]


@pytest.mark.parametrize("spec, guided", [("250", False), ("250", True), ("ddim25", True)])
def test_one_sampler_step_matches_guided_diffusion(spec: str, guided: bool, folder: Path) -> None:
    adm, ours, _ = converted("64x64_diffusion", folder)
    adm_clf, our_clf, _ = converted("64x64_classifier", folder)
    diffusion = script_util.create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing=spec
    )
    sampling = respace(cosine_schedule(1000), spec)
    scale = 300.0  # large, so that the guidance shift of a random classifier is far above the tolerance

    def cond_fn(x, t, y=None):  # classifier_sample.py's gradient of log p(y | x_t, t), times the scale
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(adm_clf(x_in, t), dim=-1)
            return torch.autograd.grad(log_probs[range(len(y)), y].sum(), x_in)[0] * scale

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.tensor([207, 3])
    k = len(sampling) // 2
    fn = network_model_fn(ours, cosine_schedule(1000), variance="learned", clip_x0=True)
    ddim = spec.startswith("ddim")
    if guided:
        fn = classifier_guidance(fn, classifier_log_prob(our_clf), sampling, scale, mode="eps" if ddim else "mean")
    step = diffusion.ddim_sample if ddim else diffusion.p_sample
    torch.manual_seed(11)
    with torch.no_grad():
        theirs = step(
            adm, x, torch.tensor([k, k]), clip_denoised=True, cond_fn=cond_fn if guided else None, model_kwargs={"y": y}
        )
    mine = one_step(sample_ddim if ddim else sample_ddpm, fn, sampling, k, x, y, seed=11)
    rel, size = relative_error(theirs["sample"], mine)
    print(
        f"\n{spec} {'guided' if guided else 'unguided'} step at t = {int(sampling.timesteps[k])}: max|Δ| = {rel:.2e} × {size:.3g}"
    )
    assert rel <= 1e-5
    if guided:  # the guidance moved the step by far more than the tolerance
        torch.manual_seed(11)
        with torch.no_grad():
            plain = step(adm, x, torch.tensor([k, k]), clip_denoised=True, model_kwargs={"y": y})["sample"]
        assert relative_error(plain, mine)[0] > 100 * 1e-5


# --- the command line -----------------------------------------------------------------------------------------


def test_convert_command(tmp_path: Path, folder: Path, run_main: Callable[..., Ran]) -> None:
    source = tmp_path / "64x64_classifier.pt"
    shutil.copy(converted_files("64x64_classifier", folder)[0], source)
    result = run_script(
        "convert_checkpoint.py", "--from", "guided-diffusion", str(source), "--out", "runs/clf/checkpoints/last.pt", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    payload = load_checkpoint(tmp_path / "runs/clf/checkpoints/last.pt")
    assert payload["stage"] == "classifier" and payload["config"]["stage"]["net"]["attention_order"] == "legacy"

    blob = source.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    cases = {"truncated.pt": "cannot be read", "runs/clf/checkpoints/last.pt": "already a cascade checkpoint"}
    for name, message in cases.items():
        result = run_main("convert_checkpoint.py", "--from", "guided-diffusion", name, "--out", "out.pt", cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith("error:") and message in lines[0], (name, result.stderr)
    assert not (tmp_path / "out.pt").exists()


TRIO = (("64x64_diffusion", "base"), ("64x64_classifier", "classifier"), ("64_256_upsampler", "sr256"))
SYNSETS = ("n01440764", "n02099601", "n15075141")  # ImageNet classes 0 (tench), 207 (golden retriever), 999 (toilet tissue)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Path:
    """A folder with the 64px base, its classifier and the 64→256 upsampler converted from random ADM weights (those
    the exactness tests compare) in cascade_sample.py's default slots (runs/<slot>/checkpoints/last.pt), and ``val/``:
    a few ImageNet synset folders of small random images (ImageFolderDataset upscales them to each stage's size)."""
    root = tmp_path_factory.mktemp("trio")
    for family, slot in TRIO:
        (root / f"runs/{slot}/checkpoints").mkdir(parents=True)
        shutil.copy(converted_files(family, folder)[1], root / f"runs/{slot}/checkpoints/last.pt")
    g = torch.Generator().manual_seed(0)
    for synset in SYNSETS:
        (root / "val" / synset).mkdir(parents=True)
        for i in range(5):  # 15 images: the fixed 10 % the base and upsampler are measured on is 2
            image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=72, mode="bilinear")[0]
            save_image(image, root / "val" / synset / f"{i}.png")
    return root


@pytest.mark.slow
def test_converted_trio_samples_a_golden_retriever_through_the_cascade_cli(
    trio: Path, tmp_path: Path, run_main: Callable[..., Ran]
) -> None:
    """64px base + its classifier + the 64→256 upsampler, converted from random ADM weights, run through
    ``cascade_sample.py --class 207 --stop-at 256`` (classifier guidance s = 1, the default) from the default slots."""
    out = tmp_path / "out"
    args = ("--class", "207", "--num", "1", "--stop-at", "256", "--base-steps", "2", "--sr256-steps", "1", "--out", str(out))
    result = run_main("cascade_sample.py", *args, cwd=trio)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "cascade.json").read_text())
    assert record["class"] == {"index": 207, "name": "golden retriever"}  # ADM's label order: sorted synsets
    assert [s["stage"] for s in record["stages"]] == ["base", "sr256"] and record["stages"][0]["classifier_scale"] == 1.0
    assert (out / "000_256px.png").is_file() and (out / "000_64px.png").is_file()
    refused = run_main("cascade_sample.py", *args[:-2], "--cfg-scale", "2", "--out", str(tmp_path / "cfg"), cwd=trio)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and lines[-1].startswith("error:") and "needs a null class" in lines[-1], refused.stderr
    assert len(lines) == 1  # refused before anything is sampled


@pytest.mark.slow
def test_converted_trio_evaluates_through_evaluate_stage_cli(trio: Path, tmp_path: Path, run_main: Callable[..., Ran]) -> None:
    """``evaluate_stage.py`` on each converted stage, with evaluation images named by ``data=imagefolder``: the
    classifier's accuracy by noise level, the base's guidance sweep (classifier guidance by the converted classifier,
    whose t = 0 features measure FID), the upsampler's single pass (ADM's upsamplers have no augmentation level)."""
    common = ["preset=tiny", "device=cpu", "progress=false", "data=imagefolder", f"data.root={trio / 'val'}"]
    clf = f"{trio}/runs/classifier/checkpoints/last.pt"
    features = ["features=classifier", f"features_path={clf}", "tiles_per_image=1", "pr_k=1", "is_splits=1"]
    runs = {
        "classifier": ["eval_buckets=2", "eval_images=15"],
        "base": [
            f"classifier_ckpt={clf}", "steps=1", "num_samples=3", "batch_size=3", "num_real=13", "classifier_scales=[0,1]",
            "reference.steps=1", "reference.batch_size=4", "reference.eval_images=1", "cas.steps=1", "cas.batch_size=4",
            "shape_judge.steps=1", "shape_judge.batch_size=4",
            "cas.real_baseline=false", *features,
        ],
        "sr256": ["num_images=2", "sr_steps=1", "sr_batch_size=2", "sr_crop=64", *features],
    }  # fmt: skip
    for slot, extra in runs.items():
        out = tmp_path / slot
        result = run_main(
            "evaluate_stage.py", f"ckpt=runs/{slot}/checkpoints/last.pt", *common, *extra, f"out_dir={out}", cwd=trio
        )
        assert result.returncode == 0, (slot, result.stderr[-3000:])
        report = json.loads((out / "metrics.json").read_text())
        assert report["source"]["format"] == "guided-diffusion" and "named" in report["held_out"], report["held_out"]
        if slot == "classifier":
            assert report["num_images"] == 15 and len(report["accuracy_by_t"]) == 2
        elif slot == "base":  # only the classes the images show are requested, by their ImageNet (ADM) labels
            assert report["requested_classes"] == [0, 207, 999]
            assert [r["classifier_scale"] for r in report["guidance"]] == [0.0, 1.0] and "cas" in report
        else:
            assert report["noise_augmentation"] is False and [r["aug_level"] for r in report["levels"]] == [None]
            assert report["num_images"] == 2 and not list((trio / "runs/sr256/checkpoints").glob("*.tuned.json"))
    refused = run_main("evaluate_stage.py", "ckpt=runs/base/checkpoints/last.pt", "preset=tiny", cwd=trio)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), refused.stderr
    assert "64x64_diffusion.pt" in lines[0] and "data=imagefolder data.root=" in lines[0]


def test_foreign_files_are_refused(tmp_path: Path, folder: Path) -> None:
    """What the command turns into its one error line (the line itself is checked in test_convert_command)."""
    torch.save({"weight": torch.randn(3, 3)}, tmp_path / "random.pt")
    torch.save([torch.randn(3)], tmp_path / "list.pt")
    adm = converted("64x64_classifier", folder)[0].state_dict()
    torch.save({**adm, "extra.weight": torch.randn(2)}, tmp_path / "modified.pt")
    torch.save({k: v for k, v in adm.items() if not k.startswith("middle_block.1.")}, tmp_path / "incomplete.pt")
    cases = {
        "random.pt": "holds no guided-diffusion network",
        "list.pt": "not a guided-diffusion state dict",
        "modified.pt": "match no released",
        "incomplete.pt": "match no released",
        "missing.pt": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(ConversionError, match=message):
            convert(tmp_path / name, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


# --- the real released files (opt-in) -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CASCADE_ADM_WEIGHTS"),
    reason="set CASCADE_ADM_WEIGHTS to a folder with OpenAI's released 64x64_{diffusion,classifier}.pt",
)
def test_released_64px_samples_are_classified_as_requested(tmp_path: Path) -> None:
    """64x64_diffusion.pt sampled for class 207 (DDIM, ddim25, classifier guidance 1.0 with 64x64_classifier.pt):
    the released classifier at t = 0 calls most samples class 207."""
    folder = Path(os.environ["CASCADE_ADM_WEIGHTS"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nets = {}
    for name in ("64x64_diffusion", "64x64_classifier"):
        _, out = convert(folder / f"{name}.pt", tmp_path / name / "last.pt")
        payload = load_checkpoint(out)
        net = build_network(payload["config"]["stage"], len(payload["class_names"]))
        net.load_state_dict(payload["ema"])
        nets[name] = net.to(device).eval()
    schedule = cosine_schedule(1000)
    sampling = respace(schedule, "ddim25")
    fn = network_model_fn(nets["64x64_diffusion"], schedule, variance="learned", clip_x0=True)
    fn = classifier_guidance(fn, classifier_log_prob(nets["64x64_classifier"]), sampling, 1.0, mode="eps")
    n = 8
    y = torch.full((n,), 207, device=device)
    g = torch.Generator(device).manual_seed(0)
    x = sample_ddim(fn, torch.randn(n, 3, 64, 64, generator=g, device=device), sampling, cond={"class_labels": y}, progress=False)
    with torch.no_grad():
        predicted = nets["64x64_classifier"](x.clamp(-1, 1), torch.zeros(n, dtype=torch.long, device=device)).argmax(-1)
    assert (predicted == 207).sum().item() > n // 2, predicted.tolist()
