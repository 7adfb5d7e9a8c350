"""Sampling settings of a cascade: typed per role, merged in one place from four layers.

The layers, later ones winning (:func:`merge_settings`)::

    OmegaConf.merge(structured CascadeConfig, configs/cascade.yaml, tuned files, --replay cascade.json, flags)

* ``configs/cascade.yaml``: the defaults, validated against :class:`CascadeConfig` (unknown keys and
  wrong types are errors).
* tuned files: what ``evaluate_stage.py`` chose for the checkpoint a stage samples with
  (``<ckpt>.tuned.json``, :mod:`cascade.evaluation.tuned`), e.g. an upsampler's aug level.
* ``--replay``: every setting of an earlier run's ``cascade.json``; its checkpoints become required.
* flags: only the ones given.

Every leaf remembers the layer it came from (:attr:`ResolvedSettings.sources`): ``cascade.json``
says where an aug level came from, and a checkpoint path that did not come from the config file
was asked for and must exist.

The chain of upsamplers is not fixed here: it is the config's ``upsamplers`` in order, or the
stages of a replayed run, or the ``--stage NAME=PATH`` list (see :func:`chain_names`); the
orchestrator then checks that the checkpoints chain. Each stage's role fixes its settings type:
:class:`GeneratorSettings` for the first stage, :class:`UpsamplerSettings` for the others.

``spacing: null`` leaves the respacing to the sampler's own default (decided in one place, with
the sampler: ``cascade.diffusion.samplers``' registry, via the stage's sampler run).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade.evaluation.tuned import read_tuned, tuned_path

__all__ = [
    "GeneratorSettings",
    "UpsamplerSettings",
    "GeneratorSlot",
    "UpsamplerSlot",
    "CascadeConfig",
    "Override",
    "ResolvedSettings",
    "CONFIG_SOURCE",
    "chain_names",
    "read_replay",
    "merge_settings",
]

CONFIG_SOURCE = "configs/cascade.yaml"
DEFAULT_SOURCE = "default"


# OmegaConf validates these types on every merge; it knows no Literal, so the sampler name is checked
# against the sampler registry by the orchestrator (cascade.pipeline.orchestrator.check_settings).
@dataclass
class GeneratorSettings:
    """How the first stage (a generator: labels → images) samples."""

    sampler: str = "dpmpp_2m"  # a name of cascade.diffusion.samplers.SAMPLERS
    steps: int = 25  # sampler steps (= model evaluations, ×2 with CFG)
    batch_size: int = 16  # images per sampler call (bounds memory)
    cfg_scale: float = 1.0  # classifier-free guidance w (1 = the conditional model)
    classifier_scale: float = 0.0  # classifier guidance s (needs a noisy classifier)
    guide_scale: float = 1.0  # autoguidance w (needs the cascade's guide: an earlier checkpoint of the base); 1 = off
    spacing: Optional[str] = None  # respacing of the training process; null: the sampler's default


@dataclass
class UpsamplerSettings:
    """How an upsampler (low-res image → image) samples."""

    sampler: str = "dpmpp_2m"
    steps: int = 25
    batch_size: int = 4  # 1024px wants small batches
    cfg_scale: float = 1.0  # classifier-free guidance w of a class-conditional upsampler
    aug_level: Optional[int] = None  # noise-augmentation level s of the low-res input; null: the checkpoint's sample_aug_level
    enforce_consistency: Optional[bool] = None  # project outputs onto downsample(output) = input; null: the checkpoint's
    spacing: Optional[str] = None


@dataclass
class GeneratorSlot:
    ckpt: str = MISSING
    settings: GeneratorSettings = field(default_factory=GeneratorSettings)


@dataclass
class UpsamplerSlot:
    ckpt: str = MISSING
    settings: UpsamplerSettings = field(default_factory=UpsamplerSettings)


@dataclass
class CascadeConfig:
    """Everything one run of ``cascade_sample.py`` needs (the schema of ``configs/cascade.yaml``)."""

    class_query: Optional[str] = None  # a class index or name (--class)
    num: int = 4  # samples
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # bf16 autocast where native
    out: Optional[str] = None  # null → outputs/<class>_seed<seed>
    stop_at: Optional[int] = None  # last resolution to produce; null: every stage of the chain
    classifier: Optional[str] = None  # noisy classifier checkpoint for classifier guidance of the base
    guide: Optional[str] = None  # autoguidance guide of the base: an earlier checkpoint of the same run (used if guide_scale ≠ 1)
    base: GeneratorSlot = field(default_factory=GeneratorSlot)
    upsamplers: Dict[str, UpsamplerSlot] = field(default_factory=dict)  # in chain order


@dataclass(frozen=True)
class Override:
    """One setting given on the command line: its dotted key in :class:`CascadeConfig`, value, and the flag that set it."""

    key: str
    value: Any
    source: str


@dataclass
class ResolvedSettings:
    """The merged settings, and for every dotted key the layer it came from."""

    config: CascadeConfig
    sources: dict[str, str]
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name → the <ckpt>.tuned.json record applied
    expected_sha256: dict[str, str] = field(default_factory=dict)  # path → hash recorded by a replayed run

    def stages(self) -> list[tuple[str, GeneratorSlot | UpsamplerSlot]]:
        """(name, slot) of the base then every upsampler, in chain order."""
        return [("base", self.config.base), *self.config.upsamplers.items()]

    def prefix(self, name: str) -> str:
        return "base" if name == "base" else f"upsamplers.{name}"

    def source(self, name: str, key: str) -> str:
        """Where setting ``key`` of stage ``name`` came from."""
        return self.sources.get(f"{self.prefix(name)}.settings.{key}", DEFAULT_SOURCE)

    def explicit(self, key: str) -> bool:
        """Was dotted ``key`` asked for (a flag, ``--stage`` or ``--replay``), rather than a config default or a tuned file?"""
        source = self.sources.get(key, DEFAULT_SOURCE)
        return source.startswith("--")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of every leaf of a nested dict (dicts of settings are walked, other values are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _nested(pairs: dict[str, Any]) -> dict[str, Any]:
    """The nested dict of dotted ``pairs`` (the inverse of :func:`_leaves`)."""
    tree: dict[str, Any] = {}
    for key, value in pairs.items():
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def read_replay(path: str | Path) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """A ``cascade.json`` as a settings layer: (nested settings, upsampler names in order, path → sha256)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--replay {path} does not exist; pass the cascade.json of an earlier run")
    try:
        record = json.loads(path.read_text())
        layer: dict[str, Any] = {
            "class_query": str(record["class"]["index"]),
            "num": int(record["num"]),
            "seed": int(record["seed"]),
            "bf16": bool(record["bf16"]),
            "device": record["device"].split(":")[0],
            "stop_at": int(record["stages"][-1]["resolution"]),
        }
        expected: dict[str, str] = {}
        names: list[str] = []
        for index, entry in enumerate(record["stages"]):
            name = "base" if index == 0 else str(entry["name"])
            kind = GeneratorSettings if index == 0 else UpsamplerSettings
            settings = {f.name: entry[f.name] for f in fields(kind) if f.name in entry}
            slot = {"ckpt": entry["path"], "settings": settings}
            if index == 0:
                layer["base"] = slot
            else:
                layer.setdefault("upsamplers", {})[name] = slot
                names.append(name)
            expected[entry["path"]] = entry["sha256"]
        clf = record.get("classifier")
        layer["classifier"] = clf["path"] if clf else None
        if clf:
            expected[clf["path"]] = clf["sha256"]
        guide = record.get("guide")  # absent from records written before autoguidance: no guide
        layer["guide"] = guide["path"] if guide else None
        if guide:
            expected[guide["path"]] = guide["sha256"]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, json.JSONDecodeError) as error:
        raise ValueError(f"--replay {path} is not a cascade.json written by cascade_sample.py ({error})") from None
    return layer, names, expected


def chain_names(config: dict[str, Any], replay_names: list[str] | None, stage_flags: list[str]) -> list[str]:
    """The upsamplers of this run, in order: ``--stage`` names if any, else a replayed run's, else the config's."""
    if stage_flags:
        return list(dict.fromkeys(stage_flags))
    if replay_names is not None:
        return list(replay_names)
    return list((config.get("upsamplers") or {}).keys())


def merge_settings(
    config: dict[str, Any] | DictConfig,
    overrides: Sequence[Override] = (),
    *,
    replay: str | Path | None = None,
    chain: list[str] | None = None,
    config_source: str = CONFIG_SOURCE,
) -> ResolvedSettings:
    """Merge the four layers (module docstring) into a typed :class:`CascadeConfig`.

    ``config``: the config file's contents; ``overrides``: the flags given; ``replay``: a
    ``cascade.json``; ``chain``: the upsampler names of this run (default: :func:`chain_names`).
    ValueError (one line) for settings that do not fit the schema or name a stage outside the chain.
    """
    file_layer = (
        OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else json.loads(json.dumps(config))
    )
    replay_layer, replay_names, expected = read_replay(replay) if replay else ({}, None, {})
    names = chain if chain is not None else chain_names(file_layer, replay_names, [])
    configured = file_layer.get("upsamplers") or {}
    file_layer["upsamplers"] = {name: configured[name] for name in names if name in configured}  # the chain's order
    if replay_layer:
        replay_layer["upsamplers"] = {n: s for n, s in replay_layer.get("upsamplers", {}).items() if n in names}
    flag_layer = _nested({o.key: o.value for o in overrides})
    for name in flag_layer.get("upsamplers", {}):
        if name not in names:
            flags = ", ".join(sorted({o.source.split("=")[0] for o in overrides if o.key.startswith(f"upsamplers.{name}.")}))
            raise ValueError(
                f"{flags}: stage {name!r} is not in this cascade (its upsamplers: {', '.join(names) or 'none'}); "
                f"add it with --stage {name}=PATH"
            )

    layers: list[tuple[str | dict[str, str], dict[str, Any]]] = [
        (config_source, file_layer),
        (f"--replay {replay}", replay_layer),
        ({o.key: o.source for o in overrides}, flag_layer),
    ]
    schema = OmegaConf.structured(CascadeConfig)

    def merged(with_layers: list[tuple[str | dict[str, str], dict[str, Any]]]) -> DictConfig:
        try:
            return OmegaConf.merge(schema, *[layer for _, layer in with_layers])
        except OmegaConfBaseException as error:
            where = " or ".join(s if isinstance(s, str) else "the flags" for s, layer in with_layers if layer)
            raise ValueError(f"the settings of {where} do not fit: {str(error).splitlines()[0]}") from None

    # The tuned layer depends on the checkpoints the other layers chose: find them first, then merge all in order.
    first = merged(layers)
    tuned_layer: dict[str, Any] = {}
    tuned_sources: dict[str, str] = {}
    tuned_records: dict[str, dict[str, Any]] = {}
    for name, prefix, kind in [
        ("base", "base", GeneratorSettings),
        *[(n, f"upsamplers.{n}", UpsamplerSettings) for n in first.upsamplers],
    ]:
        ckpt = OmegaConf.select(first, f"{prefix}.ckpt", throw_on_missing=False)
        record = read_tuned(ckpt) if ckpt and ckpt != MISSING else None
        if record is None:
            continue
        known = {f.name for f in fields(kind)}
        applied = {k: v for k, v in record["settings"].items() if k in known}
        if applied:
            tuned_records[name] = record
            for key, value in applied.items():
                tuned_layer[f"{prefix}.settings.{key}"] = value
                tuned_sources[f"{prefix}.settings.{key}"] = f"{tuned_path(ckpt)} ({record.get('chosen_by', 'evaluate_stage.py')})"
    layers.insert(1, (tuned_sources, _nested(tuned_layer)))
    final = merged(layers)
    missing = [
        f"{k}"
        for k in ["base.ckpt", *[f"upsamplers.{n}.ckpt" for n in final.upsamplers]]
        if OmegaConf.is_missing(final, k) or OmegaConf.select(final, k) is None
    ]
    if missing:
        raise ValueError(f"no checkpoint for {', '.join(missing)}: give it in {config_source} or with a flag")

    sources: dict[str, str] = {}
    for source, layer in layers:
        for key in _leaves(layer):
            sources[key] = source if isinstance(source, str) else source.get(key, "the flags")
    return ResolvedSettings(config=OmegaConf.to_object(final), sources=sources, tuned=tuned_records, expected_sha256=expected)
