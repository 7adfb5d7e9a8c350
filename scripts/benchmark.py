"""Training and sampling speed of every stage, and our U-Net against diffusers' UNet2DModel side by side.

    python scripts/benchmark.py                               # tiny preset, all stages, this machine
    python scripts/benchmark.py --stages base --preset default --batch-size 64 --compile   # a GPU

For each stage config: training throughput (images/s: forward + backward + AdamW step of the
stage's real loss) in fp32 / bf16 autocast / channels-last / gradient checkpointing (and
torch.compile with --compile, TF32 on CUDA), peak memory, model FLOPs per image and, on a GPU
with a known peak, model FLOPs utilisation; sampling latency per step and per image. For the
U-Net stages the same step is timed, interleaved in the same process, with diffusers'
UNet2DModel configured like ours (matched parameters; ``pip install -e .[dev]``), and the ratio
is printed. Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from functools import partial
from pathlib import Path

# oneDNN caches 1,024 compiled convolution primitives by default; the interleaved variants (fp32/bf16 × NCHW/NHWC ×
# forward/backward × every layer shape × two networks) need more, and a thrashing cache recompiles kernels inside the
# timed steps (sr1024: diffusers' bf16 step measured 259 ms instead of 130). One variant alone, as in training, fits.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from cascade.diffusion.guidance import classifier_log_prob, log_prob_gradient  # noqa: E402
from cascade.tools.benchmark import StageBench, benchmark_stage, cpu_features, describe_cpu  # noqa: E402
from cascade.utils.device import bf16_autocast, resolve_device  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("base", "classifier", "sr256", "sr1024")


def compose_stage(name: str, preset: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=[f"stage={name}", f"preset={preset}", *overrides])


def sampler_for(stage, name: str, batch: int, num_classes: int, device: torch.device, bf16: bool):
    """One sampling run of ``batch`` images with ``steps`` solver steps (classifier: one guidance gradient per step)."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)

    def run(net, steps: int) -> None:
        with bf16_autocast(device, bf16):
            if name == "classifier":
                r = stage.resolution
                x = torch.randn(batch, 3, r, r, generator=g).to(device)
                t = torch.full((batch,), 500, device=device)
                for _ in range(steps):
                    log_prob_gradient(classifier_log_prob(net), x, t, labels)
            elif name == "base":
                stage.sample(net, labels, steps=steps, generator=torch.Generator(device).manual_seed(0), progress=False)
            else:
                low = stage.lowres_resolution
                lowres = (torch.rand(batch, 3, low, low, generator=g) * 2 - 1).to(device)
                stage.sample(
                    net,
                    lowres,
                    labels if stage.class_conditional else None,
                    steps=steps,
                    generator=torch.Generator(device).manual_seed(0),
                    progress=False,
                )

    return run


def table(results: list[StageBench]) -> str:
    lines = [
        "| stage | model | params | variant | images/s (best) | images/s (median) | step ms | peak MB | GFLOP/img | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bench in results:
        s = bench.summary()
        for row in s["variants"]:
            params = s["params"] if row["model"] == "ours" else s["twin_params"]
            gflop = s["train_gflops_per_image"] if row["model"] == "ours" else bench.twin_flops_per_image / 1e9
            mfu = f"{row['mfu']:.1%}" if "mfu" in row else "–"
            lines.append(
                f"| {s['stage']} | {row['model']} | {params / 1e6:.2f}M | {row['variant']} | {row['images_per_s']:.1f} | "
                f"{row['images_per_s_median']:.1f} | {row['step_s_best'] * 1e3:.0f} | {row['peak_memory_mb']:.0f} | "
                f"{gflop:.2f} | {row['achieved_tflops']:.3f} | {mfu} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), help=f"any of {', '.join(STAGES)}")
    parser.add_argument("--preset", default="tiny", help="config preset (tiny: CPU-sized; default: the full configs)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: the preset's trainer.batch_size)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--sample-steps", type=int, default=5)
    parser.add_argument("--sample-batch", type=int, default=None, help="images per sampling run (default: 8, 1 at 1024px)")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile, NCHW and channels-last (minutes of compilation)"
    )
    parser.add_argument("--no-diffusers", action="store_true", help="skip the UNet2DModel comparison")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="outputs/benchmark")
    args = parser.parse_args()
    try:
        unknown = sorted(set(args.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        if min(args.rounds, args.sample_steps, args.batch_size or 1, args.num_classes) < 1 or args.warmup < 0:
            raise ValueError("--rounds, --sample-steps, --batch-size and --num-classes must be >= 1, --warmup >= 0")
        if not (CONFIGS / "preset" / f"{args.preset}.yaml").exists():
            raise ValueError(f"unknown preset {args.preset!r}; see configs/preset/")
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "cpu_features": cpu_features(),
    }
    machine["cpu"] = describe_cpu(machine["cpu_features"])
    print(f"benchmark: preset {args.preset}, device {machine['device']}, {machine['threads']} threads, torch {torch.__version__}")
    print(f"benchmark: CPU {machine['cpu']}")

    results: list[StageBench] = []
    for name in args.stages:
        cfg = compose_stage(name, args.preset, [])
        stage = instantiate(cfg.stage)
        batch = args.batch_size or int(cfg.trainer.batch_size)
        ckpt_stage = instantiate(compose_stage(name, args.preset, ["++stage.net.grad_checkpointing=true"]).stage)
        ckpt_net = ckpt_stage.build(num_classes=args.num_classes).to(device)
        sample_batch = args.sample_batch or (1 if stage.resolution >= 1024 else 8)
        models = 1 if name == "classifier" or args.no_diffusers else 2
        variants = models * (4 + 2 * int(args.compile)) + 1  # + ours with gradient checkpointing
        bar = tqdm(
            total=variants * (args.rounds + args.warmup + 1), desc=f"{name} training steps", unit="step", dynamic_ncols=True
        )  # + 1: the untimed peak-memory round
        bench = benchmark_stage(
            stage,
            num_classes=args.num_classes,
            batch_size=batch,
            device=device,
            rounds=args.rounds,
            warmup=args.warmup,
            compile=args.compile,
            compare=not args.no_diffusers,
            ckpt_net=ckpt_net,
            sample=sampler_for(stage, name, sample_batch, args.num_classes, device, bf16=True),
            sample_batch=sample_batch,
            sample_steps=args.sample_steps,
            optimizer=partial(instantiate(cfg.trainer.optimizer), lr=float(cfg.trainer.lr)),
            on_step=lambda: bar.update(1),
        )
        bar.close()
        results.append(bench)
        s = bench.summary()
        sampled = s["sampling"]
        by_layout = sampled["s_per_step_by_layout"]
        other = "".join(
            f", {layout} {seconds * 1e3:.0f} ms/step ({seconds / sampled['s_per_step']:.2f}x as long)"
            for layout, seconds in by_layout.items()
            if layout != sampled["layout"]
        )
        print(
            f"[{name}] {s['params'] / 1e6:.2f}M params, {s['train_gflops_per_image']:.2f} GFLOP/image (train step), "
            f"sampling {sampled['batch']} image(s) {sampled['layout']}: {sampled['s_per_step'] * 1e3:.0f} ms/step, "
            f"{sampled['s_per_image'] * 1e3:.0f} ms/image for {sampled['steps']} steps{other}"
        )
        for label, ratio in s["speedups"].items():
            print(f"[{name}]   {label}: {ratio:.2f}x")

    machine["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (
        f"Device: {machine['device']}; CPU: {machine['cpu']}; {machine['threads']} threads; torch {machine['torch']}; "
        f"load average {machine['load_average_start'][0]:.1f} → {machine['load_average_end'][0]:.1f}\n\n" + table(results)
    )
    print("\n" + text)
    (out / "benchmark.md").write_text(text + "\n")
    (out / "benchmark.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "stages": [b.summary() for b in results]}, indent=2) + "\n"
    )
    print(f"\nwrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")


if __name__ == "__main__":
    main()
