"""Throughput of the built-in ShapesDataset (one process): images/s at 64, 256 and 1024 px.

Usage: python scripts/bench_data.py [--threads 1] [--seconds 2.0]
"""

from __future__ import annotations

import argparse
import time

import torch

from cascade.data import ShapesDataset


def images_per_second(resolution: int, seconds: float) -> tuple[float, int]:
    """Render consecutive items for about ``seconds``; return (images/s, items rendered)."""
    ds = ShapesDataset(resolution=resolution)
    ds[0]  # warm-up: grid cache, first-call overheads
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        ds[count % len(ds)]
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


if __name__ == "__main__":
    main()
