"""Convert another project's released weights into a cascade stage checkpoint.

    python scripts/convert_checkpoint.py --from guided-diffusion 64x64_diffusion.pt --out runs/adm64/checkpoints/last.pt
        [--name STAGE_NAME]

``--from guided-diffusion``: OpenAI's ADM ImageNet releases (64x64_diffusion.pt, 64x64_classifier.pt,
128x128_{diffusion,classifier}.pt, 256x256_{diffusion,classifier}.pt, 256x256_diffusion_uncond.pt,
512x512_{diffusion,classifier}.pt, 64_256_upsampler.pt, 128_512_upsampler.pt). The release is
recognised from the file's tensors; the checkpoint's config reproduces its architecture and noise
process, and records the source file's name and sha256. The file is loaded with
``weights_only=True`` (no code in it runs).
"""

from __future__ import annotations

import sys
import time

from cascade.interop.guided_diffusion import ConversionError, convert
from cascade.utils.cli import OneLineParser

SOURCES = ("guided-diffusion",)


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the project the file comes from")
    parser.add_argument("path", help="the released .pt file")
    parser.add_argument("--out", required=True, help="checkpoint to write, e.g. runs/adm64/checkpoints/last.pt")
    parser.add_argument("--name", default=None, help="stage name (default: the release's, e.g. base, classifier, sr256)")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        rec, out = convert(args.path, args.out, name=args.name, progress=True)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: cannot write {args.out} ({error.strerror or error}); choose a writable --out path", file=sys.stderr)
        sys.exit(2)
    print(f"{args.path}: {rec.describe()}")
    print(f"wrote {out}: {rec.release.kind} stage {args.name or rec.release.stage_name!r} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
