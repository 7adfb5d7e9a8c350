"""A prepared speed and correctness check on one CUDA GPU (≤ 8 minutes), JSON + Markdown out.

    python scripts/gpu_check.py                      # on a CUDA machine: full-size stages, bf16
    python scripts/gpu_check.py --tiny --device cpu  # the CPU mode the test suite runs (tiny configs, seconds per part)

Measures, for base 64px, classifier, sr256 and sr1024 (crop training): bf16 training throughput, MFU against the
device's dense bf16 peak and peak memory at the largest batch of a ladder that fits, eager and torch.compile;
sampling of the base with classifier guidance (25 steps, batch 64) and of one 1024px image through the whole
cascade (25 + 20 + 10 steps); and checks a 2-step train + resume of every stage is bit-identical under
deterministic kernels, that attention runs on a fused SDPA backend, and DDP over NCCL where more than one GPU is
visible. A time budget (--budget-s) skips, with the reason recorded, whatever would not fit. See
cascade/tools/gpu_check.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# cuBLAS needs this before its first use for deterministic matmuls (the resume check); harmless otherwise.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from cascade.tools.gpu_check import STAGES, TimeUp, markdown, run_gpu_check, write  # noqa: E402
from cascade.utils.device import resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny preset configs and batches (the CPU mode of the tests)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu needs --tiny)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="wall-clock budget of the measurements (start-up and imports come on top; 420 s keeps the whole run under "
        "8 minutes); sections that would not fit are skipped, one that overruns is cut 15 s after it",
    )
    parser.add_argument("--stages", nargs="+", default=list(STAGES), help=f"any of {', '.join(STAGES)} (sampling needs all)")
    parser.add_argument("--out", default="outputs/gpu_check")
    args = parser.parse_args()
    try:
        unknown = sorted(set(args.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        if args.budget_s <= 0:
            raise ValueError(f"--budget-s must be > 0, got {args.budget_s}")
        device = resolve_device(args.device)
        if device.type != "cuda" and not args.tiny:
            raise ValueError("no CUDA GPU here: the full-size check needs one; pass --tiny --device cpu for the CPU mode")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    def time_up(signum: int, frame: object) -> None:
        raise TimeUp

    # The hard limit: a section that overruns its estimate is cut 15 s after the budget, and the report is still written.
    signal.signal(signal.SIGALRM, time_up)
    signal.alarm(int(args.budget_s) + 15)
    report = run_gpu_check(
        "tiny" if args.tiny else "gpu",
        device,
        budget_s=args.budget_s,
        stages=args.stages,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    signal.alarm(0)
    text = markdown(report)
    json_path, md_path = write(report, Path(args.out))
    print(text)
    print(f"wrote {json_path} and {md_path}")
    failed = [c for c in report.correctness if not c["passed"]]
    if failed:
        print(
            f"error: {len(failed)} correctness check(s) failed: " + "; ".join(f"{c['stage']}: {c['check']}" for c in failed),
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
