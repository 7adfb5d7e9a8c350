"""Classification Accuracy Score (CDM §4.1) of a batch of samples: train a classifier on them, test it on real held-out images.

    python scripts/cas_score.py samples/c256/samples_50000x256x256x3.npz --ckpt runs/base/checkpoints/last.pt
    python scripts/cas_score.py samples.npz --ckpt ... --arch resnet50 --steps 20000 --eval-images 50000

The samples are an ADM-format .npz with labels (arr_1), e.g. sample_shards.py's final file; the real
data are the held-out images of the checkpoint's data set at the samples' resolution. Writes
<samples>.cas.json. See cascade/evaluation/cas.py.
"""

from __future__ import annotations

from cascade.evaluation.cas import main

if __name__ == "__main__":
    main()
