"""Command-line plumbing shared by the scripts: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``error: …``) and exit code 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
