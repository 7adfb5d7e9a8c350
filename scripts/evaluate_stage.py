"""Evaluate one stage checkpoint: writes metrics.json and PNG plots.

    python scripts/evaluate_stage.py ckpt=runs/classifier/checkpoints/last.pt
    python scripts/evaluate_stage.py ckpt=runs/base/checkpoints/last.pt classifier_ckpt=runs/classifier/checkpoints/last.pt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import timm
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cascade.checkpoint import CheckpointError, load_stage  # noqa: E402
from cascade.device import resolve_device  # noqa: E402
from cascade.evaluate import classifier_noise_accuracy, guidance_sweep  # noqa: E402
from cascade.metrics import top1_accuracy, train_reference_classifier  # noqa: E402


def reference_classifier(cfg: DictConfig, train_data, val_data, out_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Load the reference judge from ``reference.ckpt``/``out_dir``, or train and save it."""
    path = Path(cfg.ckpt) if cfg.ckpt else out_dir / f"reference_{cfg.arch}.pt"
    net = timm.create_model(cfg.arch, pretrained=False, num_classes=train_data.num_classes)
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        net = net.to(device).eval()
    else:
        net = train_reference_classifier(train_data, num_classes=train_data.num_classes, arch=cfg.arch, steps=cfg.steps,
                                         batch_size=cfg.batch_size, lr=cfg.lr, device=device)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"arch": cfg.arch, "model": net.state_dict()}, path)
    return net, {"arch": cfg.arch, "path": str(path), "held_out_accuracy": top1_accuracy(net, val_data, limit=1000)}


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        device = resolve_device(cfg.device)
        stage, net, ckpt = load_stage(cfg.ckpt, device=device)
        out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.ckpt).resolve().parents[1] / "eval"
        data = ckpt["config"]["data"]
        val_data = instantiate(data["val"] or data["train"], resolution=stage.resolution)
        report = {"ckpt": str(cfg.ckpt), "stage": ckpt["stage"], "step": ckpt["step"], "settings": OmegaConf.to_container(cfg)}
        if ckpt["stage"] == "classifier":
            report |= classifier_noise_accuracy(stage, net, val_data, out_dir=out_dir, buckets=cfg.eval_buckets,
                                                num_images=cfg.eval_images, device=device, seed=cfg.seed)
        elif ckpt["stage"] == "base":
            train_data = instantiate(data["train"], resolution=stage.resolution)
            reference, report["reference"] = reference_classifier(cfg.reference, train_data, val_data, out_dir, device)
            classifier, classifier_schedule = None, None
            if cfg.classifier_ckpt:
                clf_stage, classifier, _ = load_stage(cfg.classifier_ckpt, device=device)
                classifier_schedule = clf_stage.schedule
            report |= guidance_sweep(stage, net, reference=reference, class_names=ckpt["class_names"], out_dir=out_dir,
                                     classifier=classifier, classifier_schedule=classifier_schedule,
                                     classifier_scales=list(cfg.classifier_scales), cfg_scales=list(cfg.cfg_scales),
                                     num_samples=cfg.num_samples, batch_size=cfg.batch_size, sampler=cfg.sampler,
                                     steps=cfg.steps, device=device, seed=cfg.seed)
        else:
            raise ValueError(f"evaluation of stage {ckpt['stage']!r} is not available yet; evaluate a base or classifier checkpoint")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
        print(f"wrote {out_dir / 'metrics.json'} and plots in {out_dir}")
    except (ValueError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
