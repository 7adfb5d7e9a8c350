"""Sample N images of the base or of the whole cascade, sharded over ranks and resumable (ADM / CDM protocol).

    python scripts/sample_shards.py --base-ckpt runs/base/checkpoints/last.pt --num-samples 50000 --out samples/base
    torchrun --nproc_per_node 8 scripts/sample_shards.py --base-ckpt ... --sr256-ckpt ... --num-samples 50000 --out samples/c256
    python scripts/sample_shards.py ... --classes random --seed 1      # ADM: uniformly random classes
    python scripts/sample_shards.py ... --class 207 --num-samples 1000         # one class

Stage settings come the way cascade_sample.py takes them: configs/cascade.yaml (or --config), then
each checkpoint's tuned file (<ckpt>.tuned.json, e.g. an upsampler's aug level), then the flags.
The same command on 1 process or K ranks gives bit-identical images (same machine and kind of
device); run it again after a kill or preemption and it samples only the missing shards. Writes
``samples_{N}x{R}x{R}x3.npz`` per stage (ADM evaluator format: ``arr_0`` uint8 images, ``arr_1``
labels) and/or ``png/{R}px/``, and ``manifest.json``. See cascade/pipeline/shards.py and
cascade/pipeline/shard_command.py.
"""

from __future__ import annotations

from cascade.pipeline.shard_command import main

if __name__ == "__main__":
    main(description=__doc__.split("\n\n")[0])
