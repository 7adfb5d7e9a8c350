"""The sampling settings path (cascade.pipeline.settings, cascade.pipeline.job): layers, schema, chains of any length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cascade.evaluation.tuned import tuned_path, write_tuned
from cascade.pipeline.job import settings_from_argv
from cascade.training.checkpoint import save_checkpoint
from tests.helpers import CONFIGS, compose_train, run_script

CONFIG = CONFIGS / "cascade.yaml"


def sampling(*argv: str, config: Path = CONFIG):
    return settings_from_argv(list(argv), config)


def replay_record(path: Path, *, sr256_ckpt: str, aug_level: int) -> Path:
    """A minimal cascade.json of a 64→256 run, as cascade_sample.py writes it (the keys --replay reads)."""
    record = {
        "class": {"index": 3, "name": "x"},
        "num": 2,
        "seed": 9,
        "bf16": False,
        "device": "cpu",
        "stages": [
            {
                "name": "base",
                "path": "b.pt",
                "sha256": "0" * 64,
                "resolution": 64,
                "sampler": "ddim",
                "steps": 7,
                "batch_size": 16,
                "cfg_scale": 1.0,
                "classifier_scale": 2.0,
                "spacing": None,
            },
            {
                "name": "sr256",
                "path": sr256_ckpt,
                "sha256": "1" * 64,
                "resolution": 256,
                "sampler": "dpmpp_2m",
                "steps": 5,
                "batch_size": 4,
                "cfg_scale": 1.0,
                "classifier_scale": 0.0,
                "aug_level": aug_level,
                "spacing": None,
            },
        ],
        "classifier": None,
    }
    path.write_text(json.dumps(record))
    return path


# --- the layers ----------------------------------------------------------------------------------------


def test_each_layer_overrides_the_one_before_and_is_named_as_the_source(tmp_path):
    ckpt = str(tmp_path / "sr256.pt")
    flags = ["--class", "1", "--sr256-ckpt", ckpt]
    config_only = sampling(*flags)
    assert config_only.config.upsamplers["sr256"].settings.aug_level is None
    assert config_only.source("sr256", "aug_level") == "configs/cascade.yaml"
    write_tuned(ckpt, {"aug_level": 120}, chosen_by="lowest fid", step=1, report="m.json")
    tuned = sampling(*flags)
    assert tuned.config.upsamplers["sr256"].settings.aug_level == 120
    assert tuned.source("sr256", "aug_level") == f"{tuned_path(ckpt)} (lowest fid)" and "sr256" in tuned.tuned
    replay = replay_record(tmp_path / "cascade.json", sr256_ckpt=ckpt, aug_level=40)
    replayed = sampling("--replay", str(replay))
    cfg = replayed.config
    assert cfg.upsamplers["sr256"].settings.aug_level == 40 and replayed.source("sr256", "aug_level") == f"--replay {replay}"
    assert (cfg.class_query, cfg.num, cfg.seed, cfg.bf16, cfg.stop_at, cfg.classifier) == ("3", 2, 9, False, 256, None)
    assert (cfg.base.settings.sampler, cfg.base.settings.steps, cfg.base.settings.classifier_scale) == ("ddim", 7, 2.0)
    assert list(cfg.upsamplers) == ["sr256"]  # the replayed chain, not the config's
    assert replayed.explicit("upsamplers.sr256.ckpt") and replayed.expected_sha256["b.pt"] == "0" * 64
    flagged = sampling("--replay", str(replay), "--sr256-aug-level", "30", "--seed", "4", "--fp32")
    assert flagged.config.upsamplers["sr256"].settings.aug_level == 30 and flagged.config.seed == 4
    assert flagged.source("sr256", "aug_level") == "--sr256-aug-level"
    assert not sampling("--class", "1").explicit("upsamplers.sr256.ckpt")


def test_a_config_that_does_not_fit_the_schema_is_one_line(tmp_path):
    config = OmegaConf.to_container(OmegaConf.load(CONFIG))
    config["base"]["settings"]["aug_level"] = 3  # a generator has no aug level
    bad = tmp_path / "bad.yaml"
    bad.write_text(OmegaConf.to_yaml(config))
    with pytest.raises(ValueError, match=r"do not fit: Key 'aug_level' not in 'GeneratorSettings'") as error:
        sampling("--class", "1", config=bad)
    assert "\n" not in str(error.value)
    config["base"]["settings"].pop("aug_level")
    config["upsamplers"]["sr256"]["settings"]["steps"] = "many"
    bad.write_text(OmegaConf.to_yaml(config))
    with pytest.raises(ValueError, match="'many' of type 'str' could not be converted to Integer"):
        sampling("--class", "1", config=bad)


# --- the chain comes from the config, a replay or --stage, never from fixed names --------------------------


def test_flags_are_made_from_the_stage_names(tmp_path):
    config = OmegaConf.to_container(OmegaConf.load(CONFIG))
    config["upsamplers"] = {
        "sr128": {"ckpt": "a.pt", "settings": {"batch_size": 2}},
        "sr512": {"ckpt": "b.pt", "settings": {"batch_size": 1}},
    }
    other = tmp_path / "other.yaml"
    other.write_text(OmegaConf.to_yaml(config))
    resolved = sampling("--class", "1", "--sr512-steps", "3", "--sr128-aug-level", "10", config=other)
    assert list(resolved.config.upsamplers) == ["sr128", "sr512"]
    assert (
        resolved.config.upsamplers["sr512"].settings.steps == 3 and resolved.config.upsamplers["sr128"].settings.aug_level == 10
    )
    staged = sampling("--class", "1", "--stage", "sr128=x.pt", "--stage", "sr512=y.pt", "--sr512-batch-size", "2")
    assert [(n, s.ckpt) for n, s in staged.config.upsamplers.items()] == [("sr128", "x.pt"), ("sr512", "y.pt")]
    assert staged.config.upsamplers["sr512"].settings.batch_size == 2 and staged.explicit("upsamplers.sr128.ckpt")
    assert staged.config.upsamplers["sr128"].settings.batch_size == 4  # not in the config: the schema's default
    with pytest.raises(ValueError, match=r"--sr1024-steps: stage 'sr1024' is not in this cascade \(its upsamplers: sr128\)"):
        sampling("--class", "1", "--stage", "sr128=x.pt", "--sr1024-steps", "2")


def test_bad_stage_flag_is_one_line_and_exit_code_2(tmp_path):
    result = run_script("cascade_sample.py", "--class", "1", "--stage", "sr512", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: --stage sr512: give NAME=PATH")
    assert result.stderr.strip().count("\n") == 0


# --- cascades other than 64→256→1024, through the same code -------------------------------------------------


def write_stage(path: Path, stage: str, *overrides: str) -> Path:
    """A random-weight stage checkpoint from the tiny preset's config with ``overrides`` of ``stage.*`` (resolutions, name)."""
    cfg = compose_train([f"stage={stage}", "preset=tiny", *[f"stage.{o}" for o in overrides]])
    from hydra.utils import instantiate

    torch.manual_seed(0)
    built = instantiate(cfg.stage)
    net = built.build(num_classes=10)
    for p in net.parameters():  # output layers start at zero: give every weight a value so the outputs depend on the input
        if p.dim() > 1 and p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)
    state = net.state_dict()
    payload = {
        "stage": built.name,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": [f"class {i}" for i in range(10)],
        "resolution": built.resolution,
        "step": 0,
        "model": state,
        "ema": state,
    }
    return save_checkpoint(payload, path)


@pytest.fixture(scope="module")
def small_chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    write_stage(root / "base32.pt", "base", "resolution=32")
    write_stage(root / "sr128.pt", "sr256", "name=sr128", "resolution=128", "lowres_resolution=32")
    # Narrower than the tiny sr1024 (8 channels at 512px): the test is about the chain, not the pictures.
    write_stage(
        root / "sr512.pt",
        "sr1024",
        "name=sr512",
        "resolution=512",
        "lowres_resolution=128",
        "net.model_channels=8",
        "net.norm_groups=4",
    )
    write_stage(root / "base64.pt", "base")
    write_stage(root / "sr256.pt", "sr256")
    return root


@pytest.mark.slow
def test_a_32_128_512_cascade_runs_and_replays_bit_identically(small_chain):
    args = [
        "--device",
        "cpu",
        "--class",
        "2",
        "--num",
        "1",
        "--base-ckpt",
        "base32.pt",
        "--classifier-ckpt",
        "none",
        "--stage",
        "sr128=sr128.pt",
        "--stage",
        "sr512=sr512.pt",
        "--base-steps",
        "2",
        "--sr128-steps",
        "1",
        "--sr512-steps",
        "1",
        "--sr512-batch-size",
        "1",
        "--fp32",
    ]
    first = run_script("cascade_sample.py", *args, "--out", "a", cwd=small_chain)
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((small_chain / "a" / "cascade.json").read_text())
    assert [(s["name"], s["resolution"]) for s in record["stages"]] == [("base", 32), ("sr128", 128), ("sr512", 512)]
    assert (
        record["stages"][2]["batch_size"] == 1 and record["stages"][1]["aug_level_source"] == "the checkpoint's sample_aug_level"
    )
    for size in (32, 128, 512):
        assert Image.open(small_chain / "a" / f"000_{size}px.png").size == (size, size)
    replay = run_script("cascade_sample.py", "--replay", "a/cascade.json", "--out", "b", cwd=small_chain)
    assert replay.returncode == 0, replay.stderr[-2000:]
    for name in ["000_32px.png", "000_128px.png", "000_512px.png"]:
        a, b = (np.asarray(Image.open(small_chain / d / name)) for d in ("a", "b"))
        assert np.array_equal(a, b)
    assert np.asarray(Image.open(small_chain / "a" / "000_512px.png")).std() > 0


@pytest.mark.slow
def test_a_64_256_cascade_and_a_chain_that_does_not_fit(small_chain):
    common = ["--device", "cpu", "--class", "0", "--num", "1", "--classifier-ckpt", "none", "--base-steps", "1"]
    short = run_script(
        "cascade_sample.py",
        *common,
        "--base-ckpt",
        "base64.pt",
        "--stage",
        "sr256=sr256.pt",
        "--sr256-steps",
        "1",
        "--out",
        "c",
        cwd=small_chain,
    )
    assert short.returncode == 0, short.stderr[-2000:]
    record = json.loads((small_chain / "c" / "cascade.json").read_text())
    assert [s["resolution"] for s in record["stages"]] == [64, 256]
    wrong = run_script("cascade_sample.py", *common, "--base-ckpt", "base64.pt", "--stage", "sr128=sr128.pt", cwd=small_chain)
    assert wrong.returncode == 2 and "sr128 upsamples 32px images but base makes 64px ones" in wrong.stderr
