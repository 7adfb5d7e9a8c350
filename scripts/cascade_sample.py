"""Sample a class through the whole cascade: base (guided) → upsampler → upsampler … (64 → 256 → 1024px by default).

    python scripts/cascade_sample.py --class 207 [--num 4] [--seed 0] [--guidance-scale 1.0] [--out DIR]
    python scripts/cascade_sample.py --class "golden retriever" --sr1024-steps 50 --sr256-aug-level 100
    python scripts/cascade_sample.py --replay outputs/golden_retriever_seed0/cascade.json   # the same images again
    python scripts/cascade_sample.py --class 3 --base-ckpt b32.pt --stage sr128=a.pt --stage sr512=b.pt   # another chain

Defaults come from configs/cascade.yaml (or --config). A stage whose default checkpoint is absent ends
the cascade at the previous resolution. Writes one PNG per sample per stage, a side-by-side strip per
sample, and cascade.json with every setting and seed needed to reproduce the images.
"""

from __future__ import annotations

from pathlib import Path

from cascade.pipeline.job import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cascade.yaml"

if __name__ == "__main__":
    main(CONFIG, description=__doc__.split("\n\n")[0])
