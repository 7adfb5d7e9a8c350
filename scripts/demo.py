"""The one-command demo: train tiny versions of all four stages on the built-in data, then sample a class to 1024px.

    python scripts/demo.py [--class "blue star with concentric rings"] [--device auto]

Runs, and prints, the very commands a user would type:
``scripts/train_stage.py stage=<base|classifier|sr256|sr1024> preset=tiny`` (into runs/<stage>),
then ``scripts/cascade_sample.py``. A stage already trained to its last step is reused, not
retrained, so running the demo again only samples. README (Quickstart) gives its measured duration.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cascade.utils.cli import OneLineParser

SCRIPTS = Path(__file__).resolve().parent
STAGES = ("base", "classifier", "sr256", "sr1024")


def run(command: list[str]) -> None:
    """Run one step of the demo, showing its command; stop the demo with its exit code if it fails."""
    shown = ["python", os.path.relpath(command[1]), *command[2:]]  # as the user would type it from here
    print(f"\n$ {shlex.join(shown)}", flush=True)
    code = subprocess.call(command)
    if code:
        print(
            f"error: the step above failed (exit code {code}); fix what it says and run the demo again: finished stages are kept",
            file=sys.stderr,
        )
        sys.exit(code)


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--class", dest="class_", default="blue star with concentric rings", help="class index or name")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default="outputs/demo", help="where the pictures go")
    args = parser.parse_args()

    start = time.perf_counter()
    for stage in STAGES:
        run([sys.executable, str(SCRIPTS / "train_stage.py"), f"stage={stage}", "preset=tiny", f"device={args.device}"])
    # 10 solver steps at 1024px: a full-size step of the tiny sr1024 is the costliest part of the demo on a CPU.
    run(
        [
            sys.executable,
            str(SCRIPTS / "cascade_sample.py"),
            "--class",
            args.class_,
            "--num",
            "1",
            "--sr1024-steps",
            "10",
            "--device",
            args.device,
            "--out",
            args.out,
        ]
    )
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\ndemo finished in {minutes:.1f} min. Pictures: {args.out}/000_strip.png (64 → 256 → 1024 side by side), "
        f"{args.out}/000_1024px.png; training curves and sample grids: runs/<stage>/loss.png, runs/<stage>/samples/"
    )


if __name__ == "__main__":
    main()
