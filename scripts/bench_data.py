"""Throughput of the built-in ShapesDataset (one process): images/s at 64, 256 and 1024 px, and 80px windows of 1024.

Usage: python scripts/bench_data.py [--threads 1] [--seconds 2.0]
"""

from __future__ import annotations

import argparse
import time

import torch

from cascade.data import ShapesDataset
from cascade.data.windows import AlignedWindows


def images_per_second(resolution: int, seconds: float) -> tuple[float, int]:
    """Render consecutive items for about ``seconds``; return (images/s, items rendered)."""
    ds = ShapesDataset(resolution=resolution)
    ds[0]  # warm-up: grid cache, first-call overheads
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        ds[count % len(ds)]
        count += 1
    return count / elapsed, count


def windows_per_second(resolution: int, size: int, seconds: float) -> tuple[float, int]:
    """Render random aligned ``size``px windows of consecutive items (AlignedWindows) for about ``seconds``."""
    windows = AlignedWindows(ShapesDataset(resolution=resolution), size, 4)
    windows[0]
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        windows[count % len(windows)]
        count += 1
    return count / elapsed, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = one core)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per resolution")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"ShapesDataset, torch {torch.__version__}, {args.threads} thread(s)")
    for resolution in (64, 256, 1024):
        rate, count = images_per_second(resolution, args.seconds)
        print(f"{resolution:>5} px: {rate:9.1f} images/s  {1e3 / rate:8.2f} ms/image  ({count} images)")
    rate, count = windows_per_second(1024, 80, args.seconds)
    print(f" 80px windows of 1024 px (the tiny sr1024's crop_windows): {rate:9.1f} windows/s  {1e3 / rate:8.2f} ms/window")


if __name__ == "__main__":
    main()
