"""Score a batch of samples (.npz or folder) against a reference: FID, sFID (or why not), IS, precision/recall, FD_DINOv2.

    python scripts/score_samples.py samples/base/samples_50000x64x64x3.npz --ref VIRTUAL_imagenet64_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out metrics.json
    torchrun --nproc_per_node 8 scripts/score_samples.py samples.npz --ref /data/imagenet/train_folder_64px/ ...
    python scripts/score_samples.py samples.npz --ref configs/data/shapes.yaml --num-samples 1000 ...  # our data set
    ... --dinov2-weights dinov2_vitl14_pretrain.pth        # adds FD_DINOv2 (EDM2)

The reference is an ADM reference batch .npz (mu/sigma used for FID when present; images arr_0 for
precision/recall and the other features), a folder of images, or a data config (configs/data/*.yaml,
its train split at the samples' resolution). Reference statistics computed from images are cached
in --cache-dir. Under torchrun each rank extracts features of its share; statistics are all-reduced.
See cascade/evaluation/scoring.py for the protocol.
"""

from __future__ import annotations

from cascade.evaluation.score_command import main, parser, run  # noqa: F401 (parser, run: for callers that import the script)

if __name__ == "__main__":
    main()
