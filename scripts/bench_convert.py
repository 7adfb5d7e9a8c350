"""Time and memory of converting and sampling full-size guided-diffusion (ADM) models with our code.

    python scripts/bench_convert.py [--out bench_convert] [--base-steps 4] [--sr-steps 2] [--device cpu]

Builds OpenAI's own networks (the ``guided_diffusion`` module of ``guided-diffusion-sdk``, dev extra) with
the release flags of ``64x64_diffusion.pt``, ``64x64_classifier.pt`` and ``64_256_upsampler.pt``
(guided-diffusion README) and random weights, saves each as a ``.pt`` file the size of the released one,
converts it with ``cascade.interop.guided_diffusion.convert``, then samples one image of class 207 as
cascade_sample.py does: the 64px base with classifier guidance (s = 1, ADM's ancestral sampler), then the
64→256 upsampler on that image. Random weights cost the same arithmetic as the released ones, so the figures
are those of the real files (which cannot be downloaded here).

Every measured phase runs in a fresh child process, which reports its wall time and its peak resident
memory (``ru_maxrss``: the whole process, Python and torch included; the baseline of a process that has
only imported torch and our package is printed too). Writes ``<out>/bench_convert.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("64x64_diffusion", "64x64_classifier", "64_256_upsampler")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads): the figure a machine shared with other jobs keeps."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _adm_network(family: str):
    """guided-diffusion's network of ``family`` at the released size, with the README's flags."""
    from guided_diffusion import script_util

    if family == "64x64_diffusion":
        return script_util.create_model(
            64, 192, 3, learn_sigma=True, class_cond=True, attention_resolutions="32,16,8", num_head_channels=64,
            dropout=0.1, use_new_attention_order=True, use_scale_shift_norm=True, resblock_updown=True,
        )  # fmt: skip
    if family == "64x64_classifier":
        return script_util.create_classifier(64, False, 128, 4, "32,16,8", True, True, "attention")
    return script_util.sr_create_model(
        256, 64, 192, 2, learn_sigma=True, class_cond=True, use_checkpoint=False, attention_resolutions="32,16,8",
        num_heads=4, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
        resblock_updown=True, use_fp16=False,
    )  # fmt: skip


def phase(name: str, folder: Path, family: str, steps: int, device: str) -> dict:
    """One measured phase, in this (child) process."""
    import torch

    import cascade.interop.guided_diffusion as gd

    torch.manual_seed(0)
    report: dict = {"phase": name, "family": family}
    if name == "baseline":
        report["peak_rss_mib"] = _peak_rss_mib()
        return report
    if name == "make":
        net = _adm_network(family)
        report["parameters"] = sum(p.numel() for p in net.parameters())
        torch.save(net.state_dict(), folder / f"{family}.pt")
        report["file_mib"] = (folder / f"{family}.pt").stat().st_size / 2**20
        return report
    if name == "convert":
        start, cpu = time.perf_counter(), _cpu_seconds()
        rec, out = gd.convert(folder / f"{family}.pt", folder / family / "last.pt")
        report |= {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu}
        report |= {"peak_rss_mib": _peak_rss_mib(), "recognised": rec.describe()}
        return report
    from cascade.training.checkpoint import open_stage

    dev = torch.device(device)
    start, cpu = time.perf_counter(), _cpu_seconds()
    loaded = open_stage(folder / family / "last.pt", dev)
    classifier = open_stage(folder / "64x64_classifier" / "last.pt", dev) if family == "64x64_diffusion" else None
    loaded_at, loaded_cpu = time.perf_counter(), _cpu_seconds()
    labels = torch.tensor([207], device=dev)
    generator = torch.Generator(dev).manual_seed(0)
    from cascade.tools.benchmark import PeakMemory

    with torch.no_grad(), PeakMemory(dev) as working:  # sampling's memory above the loaded networks
        if family == "64x64_diffusion":
            image = loaded.stage.sample(
                loaded.net, labels, sampler="ddpm", steps=steps, classifier=classifier.net,
                classifier_schedule=classifier.stage.schedule, classifier_scale=1.0, generator=generator, progress=False,
            )  # fmt: skip
            torch.save(image.cpu(), folder / "base_64px.pt")  # (1, 3, 64, 64)
        else:
            lowres = torch.load(folder / "base_64px.pt", weights_only=True).to(dev)  # (1, 3, 64, 64)
            image = loaded.stage.sample(
                loaded.net, lowres, labels, sampler="ddpm", steps=steps, generator=generator, progress=False
            )
    if dev.type == "cuda":
        torch.cuda.synchronize()
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    done = time.perf_counter()
    report |= {
        "load_seconds": loaded_at - start,
        "load_cpu_seconds": loaded_cpu - cpu,
        "sample_seconds": done - loaded_at,
        "sample_cpu_seconds": _cpu_seconds() - loaded_cpu,
        "steps": steps,
        "seconds_per_step": (done - loaded_at) / steps,
        "peak_rss_mib": _peak_rss_mib(),
        "sampling_working_set_mib": working.peak_bytes / 2**20,
        "parameters": sum(p.numel() for p in loaded.net.parameters())
        + (sum(p.numel() for p in classifier.net.parameters()) if classifier else 0),
        "output_shape": list(image.shape),
    }
    return report


def _child(name: str, folder: Path, family: str, steps: int, device: str) -> dict:
    command = [sys.executable, __file__, "--phase", name, "--family", family, "--out", str(folder)]
    command += ["--steps", str(steps), "--device", device]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"error: phase {name} of {family} failed:\n{result.stderr}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_convert", help="folder for the .pt files, checkpoints and the report")
    parser.add_argument("--base-steps", type=int, default=4)
    parser.add_argument("--sr-steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--family", default=FAMILIES[0], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.out).resolve()
    if args.phase:
        print(json.dumps(phase(args.phase, folder, args.family, args.steps, args.device)))
        return
    folder.mkdir(parents=True, exist_ok=True)
    import torch

    from cascade.tools.benchmark import cpu_features, describe_cpu

    reports = {"cpu": describe_cpu(cpu_features()), "threads": torch.get_num_threads(), "torch": torch.__version__}
    reports["python"] = platform.python_version()
    reports["baseline"] = _child("baseline", folder, FAMILIES[0], 0, args.device)
    print(f"{reports['cpu']}; {reports['threads']} threads; torch {torch.__version__}")
    print(f"baseline (python + torch + cascade imported): peak RSS {reports['baseline']['peak_rss_mib']:.0f} MiB")
    for family in FAMILIES:
        made = _child("make", folder, family, 0, args.device)
        converted = _child("convert", folder, family, 0, args.device)
        reports[family] = {"make": made, "convert": converted}
        print(
            f"{family}: {made['parameters'] / 1e6:.1f}M parameters, {made['file_mib']:.0f} MiB file; convert "
            f"{converted['seconds']:.1f} s ({converted['cpu_seconds']:.1f} CPU s; process {converted['process_seconds']:.1f} s), "
            f"peak RSS {converted['peak_rss_mib']:.0f} MiB"
        )
    for family, steps in (("64x64_diffusion", args.base_steps), ("64_256_upsampler", args.sr_steps)):
        sampled = _child("sample", folder, family, steps, args.device)
        reports[family]["sample"] = sampled
        guided = " with classifier guidance (64x64_classifier)" if family == "64x64_diffusion" else ""
        print(
            f"{family}: 1 image, {steps} ddpm steps{guided}: load {sampled['load_seconds']:.1f} s, sample "
            f"{sampled['sample_seconds']:.1f} s ({sampled['seconds_per_step']:.2f} s/step; {sampled['sample_cpu_seconds']:.1f} CPU s), "
            f"peak RSS {sampled['peak_rss_mib']:.0f} MiB"
            + (f", CUDA peak {sampled['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in sampled else "")
        )
    (folder / "bench_convert.json").write_text(json.dumps(reports, indent=2))
    print(f"wrote {folder / 'bench_convert.json'}")


if __name__ == "__main__":
    main()
